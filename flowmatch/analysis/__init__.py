"""Closed-form analysis of flow matching between Gaussians (the paper's Sec. 3, Lemma 1 and Prop. 1).

A leaf of the package: it imports the core (:mod:`flowmatch.gaussian` for the geometry, the models, the
gradient-variance instrument) and nothing in the core imports it.

``lemma1``: the Lemma-1 fields as callables, and the checks of ``evaluate.py task=lemma1`` (a random
non-isotropic target, dopri5 through the fields, the fit of an MLP / the affine model to v_OT).
``oracle``: exact per-t (and per-time-bin) loss and gradient-variance moments of the affine model.
``field_table``: Monte Carlo next to the closed form.
``stats``: mean and spread over seeds, the one-sided paired test (shared by the figure scripts).
``verdicts``: the criteria of the paper items 10 and 11, fixed before any run, on the figure scripts' records.
"""

from flowmatch.analysis.lemma1 import (
    AffineField,
    fit_rows,
    integrate_field,
    integration_rows,
    lemma1_field,
    random_target,
)
from flowmatch.analysis.oracle import (
    GaussianProblem,
    SingularFieldError,
    expected_grad_variance,
    expected_loss,
    expected_moments,
    field_gradvar_table,
    residual_coefficients,
)

__all__ = [
    "AffineField",
    "lemma1_field",
    "random_target",
    "integrate_field",
    "integration_rows",
    "fit_rows",
    "GaussianProblem",
    "SingularFieldError",
    "expected_grad_variance",
    "expected_loss",
    "expected_moments",
    "field_gradvar_table",
    "residual_coefficients",
]
