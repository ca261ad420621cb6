"""Velocity networks v(x, t): ``mlp`` (vectors), ``unet`` (images), ``gaussian_affine`` (closed form)."""
