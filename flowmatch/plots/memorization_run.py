"""One run's memorization.csv (written by ``callbacks=memorization``): reading it and drawing memorization.png.

The figure: the per-bin log10 held-out / train ratio of the loss and of the gradient variance over training
(one line per time bin, coloured by its centre; black: the signal's gap, dotted: the threshold), beside the
pair accuracy of the training and the held-out sources over training (per Euler step count); the alarm step
is a red vertical line. ``python -m flowmatch.plots.memorization --run RUN_DIR`` redraws it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.plots.common import save_figure, sigma_caption  # noqa: E402

PAIR_LEVEL = 0.9  # the pair accuracy called "memorized" (the pair_acc@euler7 >= 0.9)


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def read_memorization(path: str | Path) -> list[dict]:
    """The probes of a memorization.csv, numbers parsed, sorted by step; a row cut short by a crash (missing or
    empty fields) is dropped and a step written twice (a resumed run) keeps its last row."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if None not in r and all(v not in (None, "") for v in r.values())]
    by_step = {}
    for r in rows:
        row = {k: _number(v) for k, v in r.items()}
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def euler_ks(rows: list[dict], prefix: str = "pair_acc") -> list[int]:
    """The Euler step counts K of the columns ``{prefix}@euler{K}``."""
    head = f"{prefix}@euler"
    return sorted(int(k[len(head) :]) for k in rows[0] if k.startswith(head)) if rows else []


def nearest_k(ks: list[int], want: int = 7) -> int | None:
    """The step count in ``ks`` nearest to ``want`` (None when there is none)."""
    return min(ks, key=lambda k: abs(k - want)) if ks else None


def n_bins(rows: list[dict]) -> int:
    return sum(1 for k in rows[0] if k.startswith("bin") and k.endswith("_t_lo")) if rows else 0


def bin_matrix(rows: list[dict], stat: str) -> np.ndarray:
    """(K, probes) values of the per-bin column ``binXX_{stat}``."""
    return np.array([[float(r[f"bin{b:02d}_{stat}"]) for r in rows] for b in range(n_bins(rows))])


def bin_centres(rows: list[dict]) -> np.ndarray:
    return np.array([(rows[0][f"bin{b:02d}_t_lo"] + rows[0][f"bin{b:02d}_t_hi"]) / 2 for b in range(n_bins(rows))])


def first_step(rows: list[dict], column: str, level: float) -> int | None:
    """The first probe step whose ``column`` is >= ``level`` (None: never, or no such column)."""
    for r in rows:
        v = r.get(column)
        if isinstance(v, (int, float)) and math.isfinite(v) and v >= level:
            return int(r["step"])
    return None


def alarm_step(rows: list[dict]) -> int | None:
    """The step of the first probe whose ``alarm`` column is 1 (the alarm is raised there)."""
    return first_step(rows, "alarm", 1)


def _log_ratio(rows: list[dict], stat: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ho, tr = bin_matrix(rows, f"{stat}_holdout"), bin_matrix(rows, f"{stat}_train")
        return np.log10(np.maximum(ho, 1e-30)) - np.log10(np.maximum(tr, 1e-30))


def draw_ratios(ax, rows: list[dict], stat: str, label: str) -> None:
    """Per-bin log10 held-out/train ratio of ``stat`` (loss or var) over steps, the gap and the threshold."""
    steps, mids, ratio = [r["step"] for r in rows], bin_centres(rows), _log_ratio(rows, stat)
    cmap = plt.get_cmap("viridis")
    for b, mid in enumerate(mids):
        ax.plot(steps, ratio[b], color=cmap(mid), lw=0.9, alpha=0.8)
    gap = "loss_gap" if stat == "loss" else "var_gap"
    ax.plot(steps, [r[gap] for r in rows], color="k", lw=2, label="gap (signal bins)")
    if rows[0].get("signal_stat") == ("loss" if stat == "loss" else "grad_var"):
        ax.axhline(rows[0]["threshold"], color="k", ls=":", lw=1.2, label=f"threshold {rows[0]['threshold']:g}")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    plt.colorbar(sm, ax=ax, label="t (bin centre)", fraction=0.05)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(xlabel="training step", ylabel=f"log10 held-out / train {label}", title=f"{label}: held-out / train")


def draw_pair_acc(ax, rows: list[dict]) -> None:
    """Pair accuracy of the training (solid) and held-out (dashed) sources over steps, per Euler step count."""
    steps = [r["step"] for r in rows]
    colors = plt.get_cmap("plasma")
    ks = euler_ks(rows)
    for i, k in enumerate(ks):
        c = colors(i / max(1, len(ks)))
        ax.plot(steps, [r[f"pair_acc@euler{k}"] for r in rows], color=c, lw=1.5, label=f"training, Euler {k}")
        ax.plot(steps, [r[f"holdout_pair_acc@euler{k}"] for r in rows], color=c, lw=1, ls="--", label=f"held-out, {k}")
    ax.axhline(PAIR_LEVEL, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="training step", ylabel="pair accuracy", title="pair accuracy of integrated sources", ylim=(-0.03, 1.03)
    )


def mark_alarm(axes, rows: list[dict]) -> None:
    step = alarm_step(rows)
    for ax in axes:
        if step is not None:
            ax.axvline(step, color="tab:red", lw=1.5, label=f"alarm (step {step})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def run_figure(rows: list[dict], title: str, caption: str):
    """Figure: the three panels of memorization.png (module docstring); the title names σ (``caption``) and
    the probes' steps."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    draw_ratios(axes[0], rows, "loss", "loss")
    draw_ratios(axes[1], rows, "var", "gradient variance")
    draw_pair_acc(axes[2], rows)
    mark_alarm(axes, rows)
    steps = [int(r["step"]) for r in rows]
    fig.suptitle(f"{title}: {caption}, probes at steps {min(steps)}–{max(steps)}", fontsize=10)
    return fig


def plot_run(csv_path: str | Path, out: str | Path, title: str = "", caption: str = "") -> Path | None:
    """memorization.png of one run (module docstring); None when the CSV holds no probe. ``caption`` names the
    run's σ (default: read from the run dir's config)."""
    rows = read_memorization(csv_path)
    if not rows:
        return None
    run = Path(csv_path).parent
    fig = run_figure(rows, title or f"memorization probe: {run.name}", caption or sigma_caption(run))
    return save_figure(fig, out, rect=(0, 0, 1, 0.95))
