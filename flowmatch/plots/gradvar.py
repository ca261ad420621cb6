"""Gradient-variance figures from a run's ``gradvar.csv``.

``python -m flowmatch.plots.gradvar RUN_DIR [RUN_DIR ...]`` writes, per run, ``gradvar_heatmap.png``
(time bin x training step, log colour) and ``gradvar_profile.png`` (per-bin variance and loss of
the last probe); with several runs also ``gradvar_profiles.png`` in the first run's parent folder.
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


def plot_gradvar(csv_path: str | Path, out_dir: str | Path, title: str = "") -> list[Path]:
    """Heatmap and last-probe profile of one run; returns the written paths."""
    d = read_gradvar(csv_path)
    out_dir = Path(out_dir)
    if not d:
        return []
    steps, edges, grid = _grid(d, "grad_var")
    g = _positive(grid)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x_edges = np.append(steps, steps[-1] + max(1, (steps[-1] - steps[0]) / max(1, len(steps) - 1)))
    norm = LogNorm(vmin=np.nanmin(g), vmax=np.nanmax(g)) if np.isfinite(g).any() else None
    mesh = ax.pcolormesh(x_edges, edges, g, norm=norm, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="grad variance (trace, log)")
    ax.set(xlabel="training step (probe start)", ylabel="t bin", title=title or "per-time-bin gradient variance")
    fig.tight_layout()
    heat = out_dir / "gradvar_heatmap.png"
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    last = d["step"] == d["step"].max()
    mid = (d["t_lo"][last] + d["t_hi"][last]) / 2
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(mid, _positive(d["grad_var"][last]), marker="o")
    ax[0].set(yscale="log", xlabel="t (bin centre)", ylabel="grad variance", title=f"step {int(d['step'].max())}")
    ax[1].plot(mid, _positive(d["loss"][last]), marker="o", color="tab:orange")
    ax[1].set(yscale="log", xlabel="t (bin centre)", ylabel="loss", title="per-bin loss")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    prof = out_dir / "gradvar_profile.png"
    fig.savefig(prof, dpi=120)
    plt.close(fig)
    return [heat, prof]


def plot_profiles(runs: list[Path], labels: list[str], out: Path) -> Path:
    """Last-probe per-bin variance of several runs on one log axis."""
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for run, label in zip(runs, labels):
        d = read_gradvar(run / "gradvar.csv")
        last = d["step"] == d["step"].max()
        mid = (d["t_lo"][last] + d["t_hi"][last]) / 2
        ax[0].plot(mid, _positive(d["grad_var"][last]), marker="o", label=label)
        ax[1].plot(mid, _positive(d["loss"][last]), marker="o", label=label)
    ax[0].set(
        yscale="log", xlabel="t (bin centre)", ylabel="grad variance", title="per-bin gradient variance (last probe)"
    )
    ax[1].set(yscale="log", xlabel="t (bin centre)", ylabel="loss", title="per-bin loss (last probe)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: redraw the heatmap and profile of each run directory given."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for run in runs:
        for p in plot_gradvar(run / "gradvar.csv", run, title=run.name):
            print(p)
    if len(runs) > 1:
        print(plot_profiles(runs, [r.name for r in runs], runs[0].parent / "gradvar_profiles.png"))


if __name__ == "__main__":
    main()
