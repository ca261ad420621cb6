"""Every metric key flowmatch writes (``metrics.json``, the loggers), each with its one-line meaning.

Code never spells a key itself: it calls :func:`metric` (or :func:`gradvar_key`), which refuses a name that is
not registered here, and ``docs/DESIGN.md`` lists exactly these keys (``tests/test_design_doc.py`` checks it).
Keys are namespaced with ``/``: ``train/`` and ``val/`` from training (with its batch semantics: global batch,
processes, learning-rate factor), ``eval/`` from the evaluation of the learned flow (end of training and
``evaluate.py``), ``protocol/`` describing how the ``eval/`` numbers were made, ``gradvar/`` from the
gradient-variance callback, ``mem/`` from the memorization callback; :data:`MEDIA` are the images sent to loggers
that take them.
"""

from __future__ import annotations

__all__ = [
    "METRICS",
    "EULER_SUFFIX",
    "EULER_ONLY",
    "GRADVAR",
    "MEM_BIN",
    "MEDIA",
    "metric",
    "media_key",
    "gradvar_key",
    "mem_key",
    "all_keys",
]

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
    "train/global_batch_size": "pairs per optimizer step over all processes: data.batch_size (per device) x "
    "devices x num_nodes x accumulate_grad_batches",
    "train/world_size": "training processes: devices x num_nodes",
    "train/lr_scale": "factor applied to optimizer.lr for the global batch (1.0: no rule, lr is used as given)",
    "mem/signal": "memorization alarm signal at the probe: mean over the signal bins of log10(held-out / train) "
    "of callbacks.memorization.signal (loss or grad_var)",
    "mem/loss_gap": "mean over the signal bins of log10(held-out loss / train loss) at the probe",
    "mem/var_gap": "mean over the signal bins of log10(held-out grad variance / train grad variance) at the probe",
    "mem/alarm": "1 from the probe at which the memorization alarm was raised on, else 0",
    "mem/alarm_step": "metrics.json: the step at which the memorization alarm was raised (absent: no alarm)",
    "mem/time_share": "metrics.json: the memorization callback's time / the training wall time",
    "mem/probes": "metrics.json: the number of memorization probes taken",
}

EULER_SUFFIX = "@euler{K}"
"""Suffix of a pair or OT metric recomputed with fixed-step Euler of K steps (eval.euler_steps)."""

SUFFIXED = ("eval/pair_acc", "eval/l2_partner", "eval/l2_ot")
"""The keys that also come with ``@euler{K}``."""

EULER_ONLY: dict[str, str] = {
    "mem/pair_acc": "pair accuracy of the memorization probe's training sources (nearest among every training "
    "target) with K Euler steps",
    "mem/holdout_pair_acc": "pair accuracy of the held-out sources (nearest among the held-out targets) with K "
    "Euler steps",
}
"""Keys that exist only with ``@euler{K}``."""

GRADVAR: dict[str, str] = {
    "var": "unbiased trace of the covariance of per-sample loss gradients of the probe samples in time bin XX",
    "sqnorm": "mean squared norm of the per-sample gradients in time bin XX",
    "loss": "mean per-sample loss of the probe samples in time bin XX",
}
GRADVAR_PATTERN = "gradvar/bin_XX/{stat}"

MEM_BIN: dict[str, str] = {
    "loss_train": "mean per-sample loss of the memorization probe's training pairs in time bin XX",
    "loss_holdout": "mean per-sample loss of the held-out pairs in time bin XX (same times and noise)",
    "loss_ratio": "loss_holdout / loss_train in time bin XX",
    "var_train": "gradient variance (trace) of the probe's training pairs in time bin XX",
    "var_holdout": "gradient variance (trace) of the held-out pairs in time bin XX",
    "var_ratio": "var_holdout / var_train in time bin XX",
}
MEM_BIN_PATTERN = "mem/bin_XX/{stat}"

MEDIA: dict[str, str] = {
    "gradvar/heatmap": "image, loggers that take images (wandb): gradvar_heatmap.png (log10 gradient variance per time "
    "bin x training step) at the end of training",
    "mem/figure": "image, loggers that take images (wandb): memorization.png at the end of training",
}
"""Images sent to the loggers (``log_image``), never to metrics.json."""


def metric(name: str, euler_steps: int | None = None) -> str:
    """The registered key ``name``, with ``@euler{K}`` appended when ``euler_steps`` = K is given."""
    if name in EULER_ONLY:
        if euler_steps is None:
            raise KeyError(f"metric key {name!r} exists only with @euler{{K}}: give euler_steps")
        return f"{name}@euler{int(euler_steps)}"
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


def media_key(name: str) -> str:
    """The registered image key ``name`` (:data:`MEDIA`)."""
    if name not in MEDIA:
        raise KeyError(f"image key {name!r} is not registered in flowmatch.keys.MEDIA")
    return name


def mem_key(k: int, stat: str) -> str:
    """``mem/bin_{k:02d}/{stat}`` for stat in :data:`MEM_BIN`."""
    if stat not in MEM_BIN:
        raise KeyError(f"memorization statistic {stat!r} is not one of {list(MEM_BIN)}")
    return f"mem/bin_{int(k):02d}/{stat}"


def all_keys() -> list[str]:
    """Every documented key pattern: the plain keys, ``KEY@euler{K}`` for the suffixed and Euler-only ones, the
    gradvar and memorization per-bin ones, the images."""
    return (
        list(METRICS)
        + [k + EULER_SUFFIX for k in (*SUFFIXED, *EULER_ONLY)]
        + [GRADVAR_PATTERN.format(stat=s) for s in GRADVAR]
        + [MEM_BIN_PATTERN.format(stat=s) for s in MEM_BIN]
        + list(MEDIA)
    )
