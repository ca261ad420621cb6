"""Prop. 2: a fixed random pairing of N(0, I) sources with Gaussian-mixture targets is memorized at sigma = 0.

``python -m flowmatch.plots.prop2 RUNS_DIR FIG_DIR`` reads the runs of ``make prop2`` (coupling=fixed with
sigma = 0 and 0.05, and ``coupling.fresh_sources=true``, the chance-level control) and writes

- ``prop2.png``: training-loss curves (log y) per dimension, one line per setting; pair accuracy and the mean
  L2 distance of the integrated training sources to their own partners (dopri5 and a coarse Euler) per setting;
- ``prop2.csv``: one row per run with every number; ``prop2_loss.csv``: the training-loss curves;
- ``summary.json``: per dimension and setting the final training loss, pair accuracy, L2 to the partner and the
  chance level 1/N (mean over seeds when there are several), and the orderings Prop. 2 predicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from flowmatch.analysis.stats import mean_spread  # noqa: E402
from flowmatch.plots.common import (  # noqa: E402
    euler_series,
    figure_cli,
    find_jobs,
    load_run,
    read_csv,
    save_figure,
    sigma_steps_caption,
    write_csv,
    write_json,
)

COARSE_EULER = 7  # the coarse Euler step count shown next to dopri5 (the nearest available one otherwise)
FRESH = "fresh sources"
COLORS = {"fixed sigma=0": "tab:red", "fixed sigma=0.05": "tab:blue", FRESH: "tab:gray"}


def setting(cfg: dict) -> str:
    """The setting a run belongs to: ``fixed sigma=<sigma>``, ``fresh sources`` or the coupling's class name."""
    coupling = cfg["coupling"]
    if coupling.get("fresh_sources"):
        return FRESH
    name = coupling["_target_"].rsplit(".", 1)[-1]
    if name == "FixedCoupling":
        return f"fixed sigma={float(cfg['interpolant']['sigma']):g}"
    return f"{name} sigma={float(cfg['interpolant']['sigma']):g}"


def loss_curve(run: Path) -> tuple[list[int], list[float]]:
    """(steps, train/loss) logged by the CSV logger in ``run/csv/metrics.csv`` (empty when absent)."""
    path = run / "csv" / "metrics.csv"
    if not path.exists():
        return [], []
    rows = [r for r in read_csv(path) if isinstance(r.get("train/loss"), (int, float))]
    return [int(r["step"]) for r in rows], [float(r["train/loss"]) for r in rows]


def _coarse_k(metrics: dict) -> int | None:
    ks, _ = euler_series(metrics, "pair_acc")
    return min(ks, key=lambda k: abs(k - COARSE_EULER)) if ks else None


def run_row(run: Path) -> dict | None:
    """Every number of one run (None, with a warning, when it has no metrics.json)."""
    if not (run / "metrics.json").exists():
        print(f"warning: {run} has no metrics.json (failed or unfinished run): skipped", file=sys.stderr)
        return None
    cfg, m = load_run(run)
    steps, losses = loss_curve(run)
    tail = losses[-max(1, len(losses) // 10) :]
    k = _coarse_k(m)
    n = int(cfg["coupling"]["n_pairs"])
    return {
        "setting": setting(cfg),
        "d": int(cfg["data"]["dim"]),
        "sigma": float(cfg["interpolant"]["sigma"]),
        "fresh_sources": bool(cfg["coupling"].get("fresh_sources", False)),
        "seed": int(cfg["seed"]),
        "n_pairs": n,
        "chance": 1.0 / n,
        "steps": int(m.get("train/global_step", steps[-1] if steps else 0)),
        "final_train_loss": float(m.get("train/loss", losses[-1] if losses else float("nan"))),
        "train_loss_last10pct_mean": float(np.mean(tail)) if tail else float("nan"),
        "val_loss": float(m.get("val/loss", float("nan"))),
        "pair_acc": m["eval/pair_acc"],
        "l2_partner": m["eval/l2_partner"],
        "euler_k": k,
        "pair_acc_euler": m.get(f"eval/pair_acc@euler{k}", float("nan")),
        "l2_partner_euler": m.get(f"eval/l2_partner@euler{k}", float("nan")),
        "l2_ot": m.get("eval/l2_ot", float("nan")),
        "mmd_mem": m.get("eval/mmd_mem", float("nan")),
        "mmd_gen": m.get("eval/mmd_gen", float("nan")),
        "run": str(run),
    }


def _shown(s: str) -> str:
    return s.replace("sigma", "σ")


def _order(s: str) -> tuple[int, str]:
    return (0 if s.startswith("fixed") else 1 if s != FRESH else 2, s)


def summarize(rows: list[dict]) -> dict:
    """Per dimension and setting: mean (and std over seeds) of the final training loss, pair accuracy and L2 to
    the partner, the chance level; per dimension the orderings Prop. 2 predicts (sigma = 0 lowest loss and
    highest pair accuracy), each a comparison of means."""
    out: dict = {}
    for d in sorted({r["d"] for r in rows}):
        per = {}
        for s in sorted({r["setting"] for r in rows if r["d"] == d}, key=_order):
            group = [r for r in rows if r["d"] == d and r["setting"] == s]
            entry = {"n_seeds": len(group), "chance_pair_acc": group[0]["chance"], "euler_k": group[0]["euler_k"]}
            for key in ("final_train_loss", "train_loss_last10pct_mean", "pair_acc", "pair_acc_euler", "l2_partner"):
                values = [r[key] for r in group]
                if all(np.isfinite(values)):  # a NaN (no Euler keys, no loss logged) is left as null, not averaged
                    spread = mean_spread(values)
                    entry[key], entry[key + "_std"] = spread.mean, spread.std
                else:
                    entry[key] = entry[key + "_std"] = None
            per[s] = entry
        zero, others = per.get("fixed sigma=0"), {s: e for s, e in per.items() if s != "fixed sigma=0"}
        if zero and others and all(e["pair_acc"] is not None for e in per.values()):
            per["prop2_orderings"] = {
                f"sigma0_loss_below_{s}": zero["train_loss_last10pct_mean"] < e["train_loss_last10pct_mean"]
                for s, e in others.items()
            } | {f"sigma0_pair_acc_above_{s}": zero["pair_acc"] > e["pair_acc"] for s, e in others.items()}
        out[f"d={d}"] = per
    return out


def plot(rows: list[dict], curves: dict, out: Path) -> None:
    """Loss curves (row 1), pair accuracy (row 2) and L2 to the partner (row 3), one column per dimension."""
    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(3, len(dims), figsize=(max(4.8 * len(dims), 7.5), 10.5), squeeze=False)
    for col, d in enumerate(dims):
        group = sorted((r for r in rows if r["d"] == d), key=lambda r: (_order(r["setting"]), r["seed"]))
        settings = sorted({r["setting"] for r in group}, key=_order)
        ax = axes[0, col]
        for r in group:
            steps, losses = curves[r["run"]]
            if steps:
                label = (
                    r["setting"] if r["seed"] == min(q["seed"] for q in group if q["setting"] == r["setting"]) else None
                )
                ax.plot(
                    steps, losses, color=COLORS.get(r["setting"]), lw=0.9, alpha=0.85, label=label and _shown(label)
                )
        ax.set(yscale="log", xlabel="step", ylabel="training loss (batch mean)", title=f"d = {d}: training loss")
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.legend(fontsize=8)
        x = np.arange(len(settings))
        k = group[0]["euler_k"]
        for row, (key, ylabel) in enumerate((("pair_acc", "pair accuracy"), ("l2_partner", "mean L2 to own partner"))):
            ax = axes[row + 1, col]
            for j, (suffix, hatch) in enumerate((("", None), ("_euler", "//"))):
                vals = [[r[key + suffix] for r in group if r["setting"] == s] for s in settings]
                means, stds = [np.mean(v) for v in vals], [np.std(v) for v in vals]
                ax.bar(
                    x + (j - 0.5) * 0.38,
                    means,
                    0.36,
                    yerr=stds,
                    hatch=hatch,
                    color=[COLORS.get(s, "tab:green") for s in settings],
                    edgecolor="k",
                    alpha=0.85,
                )
            if key == "pair_acc":
                ax.axhline(group[0]["chance"], color="k", ls=":", lw=1, label=f"chance 1/N = 1/{group[0]['n_pairs']}")
                ax.set_ylim(0, 1.3)
            else:
                ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend
            ax.set_xticks(x, [_shown(s) for s in settings], fontsize=8)
            ax.set(ylabel=ylabel, title=f"d = {d}: {ylabel} (training sources)")
            ax.grid(alpha=0.3, axis="y")
            solvers = [Patch(facecolor="w", edgecolor="k", label="dopri5")]
            solvers.append(Patch(facecolor="w", edgecolor="k", hatch="//", label=f"Euler {k}"))
            ax.legend(handles=ax.get_legend_handles_labels()[0] + solvers, fontsize=7, loc="upper center", ncol=3)
    n = rows[0]["n_pairs"]
    fig.suptitle(
        f"Prop. 2: {n} fixed random pairs N(0, I) → Gaussian mixture\n(predicted: σ = 0 memorizes the pairing; "
        f"σ = 0.05 and fresh sources (chance control) do not); "
        f"{sigma_steps_caption((r['sigma'] for r in rows), (r['steps'] for r in rows))}",
        fontsize=10,
    )
    save_figure(fig, out, dpi=110, rect=(0, 0, 1, 0.95))


def main(argv: list[str] | None = None) -> None:
    """Command line: figure, CSVs and summary.json of a ``make prop2`` runs directory."""
    runs_dir, out = figure_cli(__doc__, argv)
    rows = [r for r in (run_row(j) for j in find_jobs(runs_dir)) if r is not None]
    if not rows:
        sys.exit(f"error: no finished runs (with metrics.json) under {str(runs_dir)!r}")
    curves = {r["run"]: loss_curve(Path(r["run"])) for r in rows}
    rows.sort(key=lambda r: (r["d"], _order(r["setting"]), r["seed"]))
    write_csv(out / "prop2.csv", rows)
    loss_rows = [
        {"setting": r["setting"], "d": r["d"], "seed": r["seed"], "step": s, "train_loss": v}
        for r in rows
        for s, v in zip(*curves[r["run"]])
    ]
    if loss_rows:
        write_csv(out / "prop2_loss.csv", loss_rows)
    write_json(out / "summary.json", summarize(rows))
    plot(rows, curves, out / "prop2.png")
    print(f"flowmatch: prop2 figure, CSV and summary in {out}")


if __name__ == "__main__":
    main()
