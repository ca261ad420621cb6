"""Closed-form analysis of flow matching between Gaussians (the paper's Sec. 3 and Lemma 1, Prop. 1).

``gaussian``: W2-optimal Gaussian map, Bures W2, rotations, Lemma-1 affine fields.
``oracle``: exact per-t (and per-time-bin) loss and gradient-variance moments of the affine model.
Plain torch; no Lightning/Hydra/wandb.
"""
from flowmatch.analysis.gaussian import (
    AffineField,
    affine_velocity,
    coupling_map,
    field_params,
    gaussian_ot_map,
    gaussian_w2,
    lemma1_field,
    mean_cov,
    rotation_matrix,
    singular_times,
)
from flowmatch.analysis.oracle import (
    COUPLINGS,
    SingularFieldError,
    expected_grad_variance,
    expected_loss,
    expected_moments,
    field_gradvar_table,
    residual_coefficients,
)

__all__ = [
    "AffineField",
    "affine_velocity",
    "coupling_map",
    "field_params",
    "gaussian_ot_map",
    "gaussian_w2",
    "lemma1_field",
    "mean_cov",
    "rotation_matrix",
    "singular_times",
    "COUPLINGS",
    "SingularFieldError",
    "expected_grad_variance",
    "expected_loss",
    "expected_moments",
    "field_gradvar_table",
    "residual_coefficients",
]
