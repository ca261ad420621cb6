"""Shared by the Table 2 and Table 3 figure scripts (finite couplings on images): one row of pair-distance numbers
per run, the run's final pair grid, and the figure.

Numbers come from a run's ``metrics.json`` (the end-of-training evaluation of every training source with the
configured solver): ``eval/l2_partner`` (+ ``_std``), L2 of the endpoint to the training partner;
``eval/l2_ot`` (+ ``_std``), L2 to the OT partner within the training set; ``eval/pair_acc``; ``eval/mem_rate``
(fresh samples against the training images). The grid is the samples callback's last
``samples/pairs_step_XXXXXX.png``: rows source x0, endpoint Phi(x0), training partner, OT partner (columns: the
first training pairs).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from flowmatch.plots.common import load_run, sigma_steps_caption  # noqa: E402

NAN = float("nan")
PARTNER_COLOR, OT_COLOR = "tab:red", "tab:blue"


def final_grid(run: Path) -> Path | None:
    """The last pair grid ``samples/pairs_step_XXXXXX.png`` of a run (None when there is none)."""
    grids = sorted((Path(run) / "samples").glob("pairs_step_*.png"))
    return grids[-1] if grids else None


def pair_row(run: Path) -> dict | None:
    """Every number of one run (None, with a warning, when it has no metrics.json)."""
    if not (Path(run) / "metrics.json").exists():
        print(f"warning: {run} has no metrics.json (failed or unfinished run): skipped", file=sys.stderr)
        return None
    cfg, m = load_run(run)
    n_pairs = OmegaConf.select(OmegaConf.create(cfg), "coupling.n_pairs")  # resolves n_pairs: ${data.subset}
    grid = final_grid(run)
    return {
        "n_pairs": n_pairs,  # None for coupling=reflow (the size of the pairs file)
        "sigma": float(cfg["interpolant"]["sigma"]),
        "seed": int(cfg["seed"]),
        "l2_partner": m["eval/l2_partner"],
        "l2_partner_std": m.get("eval/l2_partner_std", NAN),
        "l2_ot": m.get("eval/l2_ot", NAN),
        "l2_ot_std": m.get("eval/l2_ot_std", NAN),
        "pair_acc": m["eval/pair_acc"],
        "mem_rate": m.get("eval/mem_rate", NAN),
        "mmd_mem": m.get("eval/mmd_mem", NAN),
        "mmd_gen": m.get("eval/mmd_gen", NAN),
        "train_loss": m.get("train/loss", NAN),
        "val_loss": m.get("val/loss", NAN),
        "steps": int(m.get("train/global_step", 0)),
        "solver": m.get("protocol/solver", ""),
        "grid": str(grid) if grid else "",
        "run": str(run),
    }


def _bars(ax, rows: list[dict], partner_label: str, title: str) -> None:
    """Per sigma two bars: L2 to the training partner and to the OT partner, mean +- std over the sources."""
    rows = sorted(rows, key=lambda r: r["sigma"])
    width = 0.38
    for i, r in enumerate(rows):
        for j, (key, color, label) in enumerate(
            (("l2_partner", PARTNER_COLOR, partner_label), ("l2_ot", OT_COLOR, "OT partner"))
        ):
            x = i + (j - 0.5) * width
            ax.bar(x, r[key], width * 0.95, yerr=r[key + "_std"], color=color, alpha=0.85, capsize=3,
                   label=label if i == 0 else None)  # fmt: skip
            ax.text(x, r[key] + (r[key + "_std"] if math.isfinite(r[key + "_std"]) else 0), f"{r[key]:.2f}",
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ticks = [f"σ = {r['sigma']:g}\npair acc {r['pair_acc']:.2f}, mem rate {r['mem_rate']:.2f}" for r in rows]
    ax.set_xticks(range(len(rows)), ticks, fontsize=8)
    ax.set(ylabel="L2 from the endpoint of each training source", title=title)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper center", ncol=2)


def _grid(ax, row: dict, partner_label: str, title: str) -> None:
    ax.set_title(title, fontsize=9)
    if not row["grid"]:
        ax.text(0.5, 0.5, "no pair grid", ha="center", va="center")
        ax.axis("off")
        return
    img = mpimg.imread(row["grid"])
    ax.imshow(img)
    h = img.shape[0]
    labels = ["source x0", "endpoint Φ(x0)", partner_label, "OT partner"]
    ax.set_yticks([(k + 0.5) * h / 4 for k in range(4)], labels, fontsize=8)
    ax.set_xticks([])


def plot_pair_table(
    rows: list[dict], group_key: str, group_name, partner_label: str, title: str, out: Path, grid_name=None
) -> None:
    """Top: one bar panel per group (``group_key`` value, named by ``group_name(value)``); below: the final pair
    grid of every run, one row of grids per group, one column per sigma (titled ``grid_name(value)``, default
    ``group_name``, and sigma)."""
    grid_name = grid_name or group_name
    groups = sorted({r[group_key] for r in rows})
    sigmas = sorted({r["sigma"] for r in rows})
    fig = plt.figure(
        figsize=(max(11.0, 5.5 * len(groups), 5.0 * len(sigmas)), 5.4 + 2.8 * len(groups)), layout="constrained"
    )
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.6, 2.8 * len(groups)])
    axes = top.subplots(1, len(groups), squeeze=False)[0]
    for ax, g in zip(axes, groups):
        _bars(ax, [r for r in rows if r[group_key] == g], partner_label, group_name(g))
    grid_axes = bottom.subplots(len(groups), len(sigmas), squeeze=False)
    for gi, g in enumerate(groups):
        for si, s in enumerate(sigmas):
            match = [r for r in rows if r[group_key] == g and r["sigma"] == s]
            if match:
                _grid(grid_axes[gi, si], match[0], partner_label, f"{grid_name(g)}, σ = {s:g}")
            else:
                grid_axes[gi, si].axis("off")
    fig.suptitle(f"{title}\n({sigma_steps_caption(sigmas, (r['steps'] for r in rows))})", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
