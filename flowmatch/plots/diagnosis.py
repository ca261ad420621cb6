"""The one-page figure of ``python -m flowmatch.diagnose`` (``RUN_DIR/diagnosis.png``).

Six panels: per-bin loss and gradient variance of the training subset (solid) and the held-out pairs (dashed) at
the first, a middle and the last memorization probe; the alarm signal over training with its threshold and the
alarm; pair accuracy against Euler steps (end-of-training ``eval/pair_acc@euler{K}``, the ``eval_steps/`` files
and the last memorization probe); pair accuracy over training; the verdict with its evidence. A panel whose
file is missing says which file and which callback would give it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.plots.memorization_run import (  # noqa: E402
    alarm_step,
    bin_centres,
    bin_matrix,
    draw_pair_acc,
    euler_ks,
)

MISSING = "no memorization.csv\n(train with callbacks=memorization)"


def _missing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="gray", transform=ax.transAxes)
    ax.set(xticks=[], yticks=[])


def _profiles(ax, rows: list[dict], stat: str, label: str) -> None:
    """Per-bin ``stat`` (loss or var) of both sets at three probes."""
    mids = bin_centres(rows)
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    colors = plt.get_cmap("cividis")
    train, held = bin_matrix(rows, f"{stat}_train"), bin_matrix(rows, f"{stat}_holdout")
    for j, i in enumerate(picks):
        c = colors(j / max(1, len(picks) - 1))
        ax.plot(mids, train[:, i], color=c, marker="o", ms=3, label=f"training, step {rows[i]['step']}")
        ax.plot(mids, held[:, i], color=c, ls="--", marker="x", ms=3, label=f"held-out, step {rows[i]['step']}")
    if np.nanmin(np.concatenate([train.ravel(), held.ravel()])) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="t (bin centre)", ylabel=label, title=f"per-bin {label}: training vs held-out pairs")
    ax.legend(fontsize=6)


def _signal(ax, rows: list[dict]) -> None:
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss_gap"] for r in rows], label="loss gap")
    ax.plot(steps, [r["var_gap"] for r in rows], label="gradient-variance gap")
    ax.axhline(rows[0]["threshold"], color="k", ls=":", label=f"threshold ({rows[0]['signal_stat']})")
    step = alarm_step(rows)
    if step is not None:
        ax.axvline(step, color="tab:red", label=f"alarm at step {step}")
    ax.set(xlabel="training step", ylabel="log10 held-out / train", title="alarm signal (mean over signal bins)")
    ax.legend(fontsize=7)


def _pair_vs_euler(ax, run) -> bool:
    """Pair accuracy against Euler steps at the steps the run's files hold; False when there is none."""
    prefix, drawn = "eval/pair_acc@euler", False
    series = dict(sorted(run.eval_steps.items()))
    if run.metrics:
        series[int(run.metrics.get("train/global_step", -1))] = run.metrics
    for step, m in series.items():
        ks = sorted(int(k[len(prefix) :]) for k in m if k.startswith(prefix))
        if ks:
            ax.plot(ks, [m[f"{prefix}{k}"] for k in ks], marker="o", label=f"training pairs, step {step}")
            drawn = True
    if run.memorization:
        last = run.memorization[-1]
        for name, ls in (("pair_acc", "-"), ("holdout_pair_acc", "--")):
            ks = euler_ks(run.memorization, name)
            who = "training subset" if name == "pair_acc" else "held-out"
            ax.plot(ks, [last[f"{name}@euler{k}"] for k in ks], ls=ls, marker="s", label=f"{who}, probe {last['step']}")
            drawn = True
    if drawn:
        ax.set(xscale="log", xlabel="Euler steps", ylabel="pair accuracy", ylim=(-0.03, 1.03))
        ax.set_title("pair accuracy against Euler steps")
        ax.legend(fontsize=6)
    return drawn


def _text(ax, run, verdict) -> None:
    ax.axis("off")
    lines = [f"verdict: {verdict.label.upper()}", ""] + [f"- {e}" for e in verdict.evidence]
    lines += [""] + [f"cannot judge: {c}" for c in verdict.cannot_judge]
    wrapped = "\n".join(textwrap.fill(line, 70, subsequent_indent="  ") for line in lines)
    color = {"memorizing": "tab:red", "generalizing": "tab:green"}.get(verdict.label, "tab:orange")
    ax.text(0, 1, wrapped, va="top", ha="left", fontsize=7.5, family="monospace", transform=ax.transAxes)
    ax.set_title(str(run.path.name), color=color, fontsize=10, loc="left")


def _caption(run) -> str:
    """'σ=0.05, after 2000 steps' from what the run dir holds (config, metrics.json, else the last probe)."""
    sigma = ((run.config or {}).get("interpolant") or {}).get("sigma")
    step = (run.metrics or {}).get("train/global_step")
    if step is None and run.memorization:
        step = run.memorization[-1]["step"]
    return (
        ("σ unknown" if sigma is None else f"σ={float(sigma):g}")
        + ", "
        + ("step unknown" if step is None else f"after {int(step)} steps")
    )


def plot_diagnosis(run, verdict, out: str | Path) -> Path:
    """Draw the page for a loaded run (:class:`flowmatch.diagnose.Run`) and its verdict into ``out``."""
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    rows = run.memorization
    if rows:
        _profiles(axes[0, 0], rows, "loss", "loss")
        _profiles(axes[0, 1], rows, "var", "gradient variance")
        _signal(axes[0, 2], rows)
        draw_pair_acc(axes[1, 1], rows)
        step = alarm_step(rows)
        if step is not None:
            axes[1, 1].axvline(step, color="tab:red")
        axes[1, 1].legend(fontsize=6)
    else:
        for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 1]):
            _missing(ax, MISSING)
    if not _pair_vs_euler(axes[1, 0], run):
        _missing(axes[1, 0], "no eval/pair_acc@euler keys\n(metrics.json, eval_steps/, memorization.csv)")
    _text(axes[1, 2], run, verdict)
    fig.suptitle(f"diagnosis of {run.path} ({_caption(run)})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
