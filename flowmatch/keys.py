"""Every metric key flowmatch writes (``metrics.json``, the loggers), each with its one-line meaning.

Code never spells a key itself: it calls :func:`metric` (or :func:`gradvar_key`), which refuses a name that is
not registered here, and ``docs/DESIGN.md`` lists exactly these keys (``tests/test_design_doc.py`` checks it).
Keys are namespaced with ``/``: ``train/`` and ``val/`` from training, ``eval/`` from the evaluation of the
learned flow (end of training and ``evaluate.py``), ``protocol/`` describing how the ``eval/`` numbers were
made, ``gradvar/`` from the gradient-variance callback.
"""

from __future__ import annotations

__all__ = ["METRICS", "EULER_SUFFIX", "GRADVAR", "metric", "gradvar_key", "all_keys"]

METRICS: dict[str, str] = {
    "train/loss": "training loss (batch mean of the per-sample loss) at the last logged step",
    "train/global_step": "optimizer steps taken when training ended",
    "val/loss": "mean per-sample loss on the fixed validation pairs (sampling weights: EMA when on)",
    "test/loss": "mean per-sample loss on the fixed test pairs (trainer.test)",
    "eval/pair_acc": "fraction of training sources whose endpoint's nearest training target is its own partner",
    "eval/l2_partner": "mean ||x_hat1 - x1_partner|| over the training sources",
    "eval/l2_ot": "mean ||x_hat1 - T_OT(x0)||: training sources (or fresh sources without pairs) vs their OT partner",
    "eval/l2_partner_std": "std over the training sources of ||x_hat1 - x1_partner|| (configured solver)",
    "eval/l2_ot_std": "std over the training sources of ||x_hat1 - T_OT(x0)|| (configured solver)",
    "eval/mmd_mem": "RBF-kernel MMD^2 between endpoints of the training sources and their partners",
    "eval/mmd_gen": "RBF-kernel MMD^2 between endpoints of fresh sources and fresh targets",
    "eval/w2": "Gaussian (Bures) W2 between the generated samples and the target (closed-form moments when known)",
    "eval/nfe": "velocity evaluations per integration of the fresh sources (mean over chunks)",
    "eval/mem_rate": "images: fraction of generated images whose nearest training image is < 1/3 of the second nearest",
    "eval/fid": "images: Frechet distance between features of generated and real images",
    "eval/kid": "images: kernel inception distance (mean over subsets)",
    "eval/kid_std": "images: standard deviation of the KID over subsets",
    "protocol/solver": "the configured solver's tag (euler7, rk4_20, dopri5): the plain eval/ keys are its",
    "protocol/solver_steps": "steps of the configured fixed-grid solver",
    "protocol/atol": "absolute tolerance of the configured adaptive solver",
    "protocol/rtol": "relative tolerance of the configured adaptive solver",
    "protocol/nfe": "velocity evaluations of the configured solver on the fresh sources",
    "protocol/n_samples": "number of fresh sources (eval.n_fresh)",
    "protocol/seed": "seed of the evaluation's random stream (eval.seed)",
    "protocol/ema": "whether the EMA weights were evaluated (true/false)",
    "protocol/ckpt_path": "the checkpoint whose weights were evaluated",
    "protocol/split": "images: the real split FID/KID compared against (train/test)",
    "protocol/feature_extractor": "images: the feature network of FID/KID (off, inception, a class name)",
    "protocol/n_real": "images: number of real images for FID/KID",
}

EULER_SUFFIX = "@euler{K}"
"""Suffix of a pair or OT metric recomputed with fixed-step Euler of K steps (eval.euler_steps)."""

SUFFIXED = ("eval/pair_acc", "eval/l2_partner", "eval/l2_ot")
"""The keys that also come with ``@euler{K}``."""

GRADVAR: dict[str, str] = {
    "var": "unbiased trace of the covariance of per-sample loss gradients of the probe samples in time bin XX",
    "sqnorm": "mean squared norm of the per-sample gradients in time bin XX",
    "loss": "mean per-sample loss of the probe samples in time bin XX",
}
GRADVAR_PATTERN = "gradvar/bin_XX/{stat}"


def metric(name: str, euler_steps: int | None = None) -> str:
    """The registered key ``name``, with ``@euler{K}`` appended when ``euler_steps`` = K is given."""
    if name not in METRICS:
        raise KeyError(f"metric key {name!r} is not registered in flowmatch.keys.METRICS")
    if euler_steps is None:
        return name
    if name not in SUFFIXED:
        raise KeyError(f"metric key {name!r} has no @euler{{K}} variant (only {list(SUFFIXED)})")
    return f"{name}@euler{int(euler_steps)}"


def gradvar_key(k: int, stat: str) -> str:
    """``gradvar/bin_{k:02d}/{stat}`` for stat in var, sqnorm, loss."""
    if stat not in GRADVAR:
        raise KeyError(f"gradvar statistic {stat!r} is not one of {list(GRADVAR)}")
    return f"gradvar/bin_{int(k):02d}/{stat}"


def all_keys() -> list[str]:
    """Every documented key pattern: the plain keys, ``KEY@euler{K}`` for the suffixed ones, the gradvar ones."""
    return list(METRICS) + [k + EULER_SUFFIX for k in SUFFIXED] + [GRADVAR_PATTERN.format(stat=s) for s in GRADVAR]
