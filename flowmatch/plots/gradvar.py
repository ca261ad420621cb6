"""Gradient-variance figures from a run's ``gradvar.csv``.

``python -m flowmatch.plots.gradvar RUN_DIR [RUN_DIR ...]`` writes, per run, ``gradvar_heatmap.png``
(time bin x training step, log colour) and ``gradvar_profile.png`` (per-bin variance and loss of
the last probe); with several runs also, in the first run's parent folder, ``gradvar_profiles.png`` (the
runs' last probes on one axis) and ``gradvar_heatmaps.png`` (their heatmaps side by side on one shared colour
scale with one colourbar). Every title names the interpolant's σ and the training steps shown.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from flowmatch.plots.common import save_figure, sigma_caption  # noqa: E402

VAR_LABEL = "gradient variance (trace, log colour)"


def read_gradvar(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a gradvar.csv as float arrays."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]} if rows else {}


def _grid(d: dict, col: str):
    steps, t_lo = np.unique(d["step"]), np.unique(d["t_lo"])
    t_hi = np.array([d["t_hi"][d["t_lo"] == lo][0] for lo in t_lo])
    grid = np.full((len(t_lo), len(steps)), np.nan)
    for s, lo, v in zip(d["step"], d["t_lo"], d[col]):
        grid[np.searchsorted(t_lo, lo), np.searchsorted(steps, s)] = v
    return steps, np.append(t_lo, t_hi[-1]), grid


def _positive(values: np.ndarray) -> np.ndarray:
    out = values.astype(float).copy()
    out[~(out > 0)] = np.nan
    return out


def step_span(d: dict) -> str:
    """'steps A–B' (or 'step A' for one probe): the training steps of the probes in ``d``."""
    lo, hi = int(d["step"].min()), int(d["step"].max())
    return f"step {hi}" if lo == hi else f"steps {lo}–{hi}"


def shared_lognorm(datas: list[dict]) -> LogNorm | None:
    """One log colour scale over the positive gradient variances of every run in ``datas`` (None: none)."""
    values = np.concatenate([_positive(d["grad_var"]) for d in datas])
    values = values[np.isfinite(values)]
    return LogNorm(vmin=values.min(), vmax=values.max()) if values.size else None


def _heat(ax, d: dict, norm: LogNorm | None, title: str):
    """Draw the t bin x step heatmap of one run on ``ax``; returns the mesh."""
    steps, edges, grid = _grid(d, "grad_var")
    x_edges = np.append(steps, steps[-1] + max(1, (steps[-1] - steps[0]) / max(1, len(steps) - 1)))
    mesh = ax.pcolormesh(x_edges, edges, _positive(grid), norm=norm, cmap="viridis", shading="flat")
    ax.set(xlabel="training step (probe start)", ylabel="t bin", title=title)
    return mesh


def heatmap_figure(d: dict, caption: str):
    """Figure: one run's per-time-bin gradient variance over training, with its colourbar."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    mesh = _heat(ax, d, shared_lognorm([d]), f"per-time-bin gradient variance, {caption}, {step_span(d)}")
    fig.colorbar(mesh, ax=ax, label=VAR_LABEL)
    return fig


def heatmaps_figure(datas: list[dict], captions: list[str], title: str = ""):
    """Figure: the heatmaps of several runs side by side, one shared colour scale (vmin/vmax) and one colourbar."""
    fig, axes = plt.subplots(
        1, len(datas), figsize=(4.2 * len(datas) + 1.5, 3.8), squeeze=False, sharey=True, layout="constrained"
    )
    norm = shared_lognorm(datas)
    for ax, d, caption in zip(axes[0], datas, captions):
        mesh = _heat(ax, d, norm, f"{caption}, {step_span(d)}")
    fig.colorbar(mesh, ax=axes[0].tolist(), label=VAR_LABEL + ", shared scale")
    fig.suptitle(title or "per-time-bin gradient variance over training")
    return fig


def _last(d: dict):
    last = d["step"] == d["step"].max()
    return last, (d["t_lo"][last] + d["t_hi"][last]) / 2


def profile_figure(d: dict, caption: str):
    """Figure: per-bin gradient variance and loss of one run's last probe."""
    last, mid = _last(d)
    step = int(d["step"].max())
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(mid, _positive(d["grad_var"][last]), marker="o")
    ax[0].set(yscale="log", xlabel="t (bin centre)", ylabel="grad variance", title=f"{caption}, step {step}")
    ax[1].plot(mid, _positive(d["loss"][last]), marker="o", color="tab:orange")
    ax[1].set(yscale="log", xlabel="t (bin centre)", ylabel="loss", title=f"per-bin loss, {caption}, step {step}")
    for a in ax:
        a.grid(alpha=0.3)
    return fig


def profiles_figure(datas: list[dict], labels: list[str], title: str = ""):
    """Figure: the last-probe per-bin variance and loss of several runs (legend: ``labels``) on shared log axes."""
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    for d, label in zip(datas, labels):
        last, mid = _last(d)
        label = f"{label}, step {int(d['step'].max())}"
        ax[0].plot(mid, _positive(d["grad_var"][last]), marker="o", label=label)
        ax[1].plot(mid, _positive(d["loss"][last]), marker="o", label=label)
    ax[0].set(yscale="log", xlabel="t (bin centre)", ylabel="grad variance", title="per-bin gradient variance")
    ax[1].set(yscale="log", xlabel="t (bin centre)", ylabel="loss", title="per-bin loss")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title or "last probe of each run", fontsize=10)
    return fig


def plot_gradvar(csv_path: str | Path, out_dir: str | Path, caption: str = "") -> list[Path]:
    """Write ``gradvar_heatmap.png`` and ``gradvar_profile.png`` of one run; returns the written paths.
    ``caption`` names the run (``σ=0.05``; default: read from the run dir's config)."""
    d = read_gradvar(csv_path)
    out_dir = Path(out_dir)
    if not d:
        return []
    caption = caption or sigma_caption(Path(csv_path).parent)
    heat = save_figure(heatmap_figure(d, caption), out_dir / "gradvar_heatmap.png", dpi=120)
    prof = save_figure(profile_figure(d, caption), out_dir / "gradvar_profile.png", dpi=120)
    return [heat, prof]


def plot_profiles(runs: list[Path], labels: list[str], out: Path, title: str = "") -> Path:
    """Write the last-probe per-bin variance and loss of several runs on one log axis to ``out``."""
    datas = [read_gradvar(run / "gradvar.csv") for run in runs]
    return save_figure(profiles_figure(datas, labels, title), out, dpi=120, rect=(0, 0, 1, 0.95))


def plot_heatmaps(runs: list[Path], labels: list[str], out: Path, title: str = "") -> Path:
    """Write the heatmaps of several runs side by side on one shared colour scale to ``out``."""
    datas = [read_gradvar(run / "gradvar.csv") for run in runs]
    return save_figure(heatmaps_figure(datas, labels, title), out, dpi=120)


def plot_field_table(rows: list[dict], out: Path, title: str = "") -> Path:
    """Per-bin gradient variance and loss: Monte Carlo mean +- std over seeds against the closed form."""
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    exact = [r for r in rows if r["seed"] == "exact"]
    mid = np.array([(r["t_lo"] + r["t_hi"]) / 2 for r in exact])
    for a, col in zip(ax, ("grad_var", "loss")):
        mc = np.array([[r[col] for r in rows if r["seed"] == s] for s in sorted({r["seed"] for r in rows} - {"exact"})])
        a.errorbar(mid, mc.mean(0), yerr=mc.std(0), fmt="o", capsize=3, label=f"Monte Carlo ({len(mc)} seeds)")
        a.plot(mid, [r[col] for r in exact], "-", color="k", lw=1, label="closed form")
        if np.nanmax(np.abs(mc)) > 1e-8:
            a.set_yscale("log")
        a.set(xlabel="t (bin centre)", ylabel=col.replace("_", " "))
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title.replace("sigma=", "σ="), fontsize=9)
    return save_figure(fig, out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Command line: redraw the heatmap and profile of each run directory given (and, for several, the
    comparison figures)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    captions = [f"{r.name}: {sigma_caption(r)}" for r in runs]
    for run, caption in zip(runs, captions):
        for p in plot_gradvar(run / "gradvar.csv", run, caption=caption):
            print(p)
    if len(runs) > 1:
        print(plot_profiles(runs, captions, runs[0].parent / "gradvar_profiles.png"))
        print(plot_heatmaps(runs, captions, runs[0].parent / "gradvar_heatmaps.png"))


if __name__ == "__main__":
    main()
