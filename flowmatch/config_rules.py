"""The rule tables of config validation (``flowmatch/validate.py``): what each key of each config group allows.

A :class:`Rule` is a predicate and its description for the error line (``data.dim must be an integer >= 1, got
0``); ``TABLES`` maps a config group (``""``: the top level) to its keys' rules, checked when the key is in the
composed config. Keys no table covers keep the type of their default (``validate.override_type_errors``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """What a key allows: ``ok(value)`` and its description for the error line."""

    ok: Callable[[object], bool]
    allowed: str


def is_int(v) -> bool:
    """An integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite number, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, null: bool = False) -> Rule:
    """An integer (>= lo); ``null``: or null."""
    text = "an integer" + (f" >= {lo}" if lo is not None else "") + (" or null" if null else "")
    return Rule(lambda v: (null and v is None) or (is_int(v) and (lo is None or v >= lo)), text)


def number(lo: float | None = None, gt: float | None = None, hi: float | None = None) -> Rule:
    """A finite number (>= lo, > gt, <= hi)."""
    parts = [f">= {lo:g}" if lo is not None else "", f"> {gt:g}" if gt is not None else ""]
    parts.append(f"<= {hi:g}" if hi is not None else "")
    text = " and ".join(p for p in parts if p)

    def ok(v) -> bool:
        return is_num(v) and (lo is None or v >= lo) and (gt is None or v > gt) and (hi is None or v <= hi)

    return Rule(ok, "a number" + (f" {text}" if text else ""))


def one_of(*options, null: bool = False) -> Rule:
    """One of ``options`` (or null)."""
    return Rule(
        lambda v: (null and v is None) or v in options, f"one of {list(options)}" + (" or null" if null else "")
    )


def int_list(lo: int, empty: bool = False) -> Rule:
    """A list of integers >= lo (non-empty unless ``empty``)."""
    text = f"a {'' if empty else 'non-empty '}list of integers >= {lo}, like [1,7]"
    return Rule(lambda v: isinstance(v, list) and (empty or bool(v)) and all(is_int(k) and k >= lo for k in v), text)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
STR_OR_NULL = Rule(lambda v: v is None or isinstance(v, str), "a path (a string) or null")
BINS = Rule(
    lambda v: (
        (is_int(v) and v >= 1)
        or (isinstance(v, list) and len(v) >= 2 and all(is_num(e) and 0 <= e <= 1 for e in v) and v == sorted(set(v)))
    ),
    "a bin count >= 1 or a list of >= 2 increasing edges in [0, 1]",
)
SOLVERS = one_of("euler", "midpoint", "rk4", "dopri5")

# One table per config group: key -> rule, checked when the key is in the composed config.
TABLES: dict[str, dict[str, Rule]] = {
    "": {"seed": integer(0), "threads": integer(1, null=True), "ckpt_path": STR_OR_NULL, "verbose": BOOL},
    "progress": {"mode": one_of("auto", "bar", "lines", "none"), "every_s": number(gt=0)},
    "checkpoint": {"every_n_train_steps": integer(1)},
    "trainer": {
        "max_steps": integer(1),
        "log_every_n_steps": integer(1),
        "val_check_interval": Rule(
            lambda v: (is_int(v) and v >= 1) or (is_num(v) and 0 < v <= 1), "an integer >= 1 or a fraction in (0, 1]"
        ),
        "limit_val_batches": Rule(
            lambda v: (is_int(v) and v >= 0) or (is_num(v) and 0 <= v <= 1), "an integer >= 0 or a fraction in [0, 1]"
        ),
        "num_sanity_val_steps": integer(-1),
        "enable_progress_bar": BOOL,
        "accelerator": one_of("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
        "devices": Rule(
            lambda v: (
                (is_int(v) and (v >= 1 or v == -1)) or v == "auto" or (isinstance(v, list) and all(map(is_int, v)))
            ),
            "an integer >= 1, -1 (all), auto or a list of device indices",
        ),
    },
    "data": {
        "dim": integer(1),
        "batch_size": integer(1),
        "val_size": integer(1),
        "test_size": integer(1),
        "subset": integer(1, null=True),
        "k": integer(1),
        "std": number(gt=0),
        "radius": number(lo=0),
        "centers": one_of("circle", "random"),
        "device": one_of("cpu", "auto", "cuda"),
        "channels": integer(1),
        "image_size": integer(1),
        "holdout": integer(1),
        "holdout_fraction": number(gt=0, hi=1),
        "upsample": integer(1),
        "n_images": integer(2),
        "hflip": BOOL,
        "download": BOOL,
        "verify_checksums": BOOL,
        "num_workers": integer(0, null=True),
    },
    "model": {
        "width": integer(1),
        "depth": integer(1),
        "time_freqs": integer(0),
        "activation": one_of("silu", "relu", "gelu", "tanh"),
        "base_channels": integer(1),
        "num_res_blocks": integer(1),
        "num_heads": integer(1),
        "channel_mult": int_list(1),
        "attention_resolutions": int_list(1, empty=True),
        "dropout": number(lo=0, hi=1),
        "field": one_of("ot", "rot", null=True),
    },
    "interpolant": {"sigma": number(lo=0), "t_clamp": number(gt=0, hi=0.5)},
    "coupling": {
        "n_pairs": integer(1, null=True),
        "n_holdout": integer(0),
        "fraction": number(lo=0, hi=1),
        "angle": number(),
        "solver": one_of("exact", "auction", "auto"),
        "exact_max_n": integer(1),
        "rel_gap": number(gt=0),
        "fresh_sources": BOOL,
        "distinct_targets": BOOL,
    },
    "direction": {"name": one_of("forward", "backward")},
    "solver": {
        "method": SOLVERS,
        "steps": integer(1),
        "atol": number(gt=0),
        "rtol": number(gt=0),
        "max_num_steps": integer(1),
    },
    "optimizer": {"lr": number(gt=0), "weight_decay": number(lo=0)},
    "scheduler": {"T_max": integer(1), "factor": number(gt=0, hi=1)},
    "eval": {
        "enabled": BOOL,
        "euler_steps": int_list(1, empty=True),
        "n_fresh": integer(2),
        "seed": integer(0),
        "keep_trajectories": int_list(1, empty=True),
        "batch_size": integer(1, null=True),
        "w2_max_dim": integer(0),
        "mmd_max_n": integer(2, null=True),
        "fid": BOOL,
        "inception_weights": STR_OR_NULL,
        "fid_split": one_of("train", "test"),
        "kid_subsets": integer(1),
        "kid_subset_size": integer(2),
    },
    "callbacks.gradvar": {
        "bins": BINS,
        "every_n_steps": integer(1),
        "probe_size": integer(2),
        "source": one_of("interpolant", "pairs", "integrated"),
        "method": one_of("auto", "hooks", "vmap", "loop"),
        "chunk_size": Rule(lambda v: v == "auto" or (is_int(v) and v >= 1), "'auto' or an integer >= 1"),
        "memory_budget_mib": integer(1, null=True),
        "ode_steps": integer(1),
        "groups": one_of("module", "layer", null=True),
    },
    "callbacks.memorization": {
        "every_n_steps": integer(1),
        "probe_size": integer(2),
        "bins": BINS,
        "euler_steps": int_list(1),
        "signal": one_of("grad_var", "loss"),
        "threshold": number(),
        "patience": integer(1),
        "method": one_of("auto", "hooks", "vmap", "loop"),
        "chunk_size": integer(1),
    },
    "callbacks.ema": {"decay": Rule(lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)")},
    "reflow": {"n_pairs": integer(1), "batch_size": integer(1)},
    "stability": {"n_samples": integer(1), "n_directions": integer(1), "dtype": one_of("float32", "float64")},
}
TABLES["callbacks.gradvar_integrated"] = TABLES["callbacks.gradvar"]
TASKS = ("metrics", "reflow_pairs", "gradvar_field", "lemma1", "stability")
