"""Figures for the 180-degree rotation experiment (Counter Example 1).

``python -m flowmatch.plots.rotation SWEEP_DIR`` reads every run under SWEEP_DIR and writes
``rotation_trajectories.png`` (training pairs and integrated trajectories per sigma, at coarse
and fine Euler integration and with the configured solver) and ``rotation_pair_acc.png`` (pair
accuracy, distance to the training partner and to the OT map against the number of Euler steps) and,
when the runs have a gradvar.csv, ``rotation_gradvar.png`` (last per-bin gradient variance and loss).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flowmatch.plots.common import euler_series, find_runs, load_run  # noqa: E402
from flowmatch.plots.gradvar import plot_profiles  # noqa: E402


def _label(cfg: dict) -> str:
    return f"{cfg['interpolant']['_target_'].rsplit('.', 1)[-1]} σ={cfg['interpolant']['sigma']:g}"


def _runs(root: Path):
    runs = [(load_run(r), r) for r in find_runs(root)]
    return sorted(runs, key=lambda item: item[0][0]["interpolant"]["sigma"])


def plot_trajectories(runs, out: Path) -> None:
    """Training pairs next to the integrated trajectories of each kept solver, one row per sigma (PNG ``out``)."""
    panels = ["pairs"] + sorted({k for (_, _), r in runs for k in _traj_keys(r)}, key=_traj_order)
    fig, axes = plt.subplots(
        len(runs), len(panels), figsize=(3.2 * len(panels), 3.2 * len(runs)), squeeze=False, sharex=True, sharey=True
    )
    for row, ((cfg, metrics), run) in enumerate(runs):
        data = torch.load(run / "eval_trajectories.pt")
        x0, x1 = data["x0"].numpy(), data["x1"].numpy()
        for col, key in enumerate(panels):
            ax = axes[row, col]
            if key == "pairs":
                for a, b in zip(x0, x1):
                    ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=0.6)
                title = "training pairs"
            elif key in data:
                traj = data[key].numpy()
                for i in range(traj.shape[1]):
                    ax.plot(traj[:, i, 0], traj[:, i, 1], color="tab:purple", lw=0.6, alpha=0.8)
                ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=8, color="tab:purple", zorder=3, label="endpoint")
                tag = key if key != "solver" else cfg["solver"]["method"]
                acc = metrics.get(f"eval/pair_acc@{key}" if key != "solver" else "eval/pair_acc", float("nan"))
                title = f"{tag}: pair acc {acc:.2f}"
            else:
                ax.axis("off")
                continue
            ax.scatter(x0[:, 0], x0[:, 1], s=8, color="tab:blue", label="x0 (train)", zorder=2)
            ax.scatter(x1[:, 0], x1[:, 1], s=8, color="tab:red", label="x1 (train)", zorder=2)
            ax.set_title(title, fontsize=9)
            ax.set_aspect("equal")
        axes[row, 0].set_ylabel(_label(cfg))
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle("180° rotation (x1 = 5 − x0, 50 fixed pairs): training pairs vs integrated trajectories")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _traj_keys(run: Path) -> list[str]:
    return [k for k in torch.load(run / "eval_trajectories.pt") if k not in ("x0", "x1")]


def _traj_order(key: str) -> tuple[int, int]:
    return (1, 0) if key == "solver" else (0, int(key.removeprefix("euler")))


def plot_pair_accuracy(runs, out: Path) -> None:
    """Pair accuracy and L2 to the partner / to the OT map against the number of Euler steps (PNG ``out``)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (cfg, metrics), _ in runs:
        ks, acc = euler_series(metrics, "pair_acc")
        (line,) = axes[0].plot(ks, acc, marker="o", label=_label(cfg))
        ks, l2p = euler_series(metrics, "l2_partner")
        axes[1].plot(ks, l2p, marker="o", color=line.get_color(), label=f"{_label(cfg)}: to partner")
        ks, l2o = euler_series(metrics, "l2_ot")
        if l2o:
            axes[1].plot(ks, l2o, marker="s", ls="--", color=line.get_color(), label=f"{_label(cfg)}: to OT map")
    axes[0].set(
        xscale="log",
        xlabel="Euler steps",
        ylabel="pair accuracy",
        ylim=(-0.03, 1.03),
        title="reproduces the training pairing?",
    )
    axes[1].set(xscale="log", xlabel="Euler steps", ylabel="mean L2 of endpoint", title="distance to partner / OT map")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.text(
        0.5,
        0.005,
        "All training lines cross at t = 1/2 (x = 2.5·1). Coarse Euler steps (odd K) step over the "
        "crossing and land on the memorized partner; fine steps integrate through it, where a smooth network "
        "cannot represent the singular memorizing field.",
        ha="center",
        va="bottom",
        fontsize=7,
        wrap=True,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: the rotation figures of a ``make demo`` sweep directory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="output folder (default: SWEEP_DIR)")
    args = ap.parse_args(argv)
    root = Path(args.sweep_dir)
    runs = _runs(root)
    if not runs:
        raise SystemExit(f"error: no runs with metrics.json under {root}")
    out = Path(args.out or root)
    out.mkdir(parents=True, exist_ok=True)
    if all((r / "eval_trajectories.pt").exists() for _, r in runs):
        plot_trajectories(runs, out / "rotation_trajectories.png")
    plot_pair_accuracy(runs, out / "rotation_pair_acc.png")
    if all((r / "gradvar.csv").exists() for _, r in runs):
        plot_profiles([r for _, r in runs], [_label(cfg) for (cfg, _), _ in runs], out / "rotation_gradvar.png")
    print(f"flowmatch: figures in {out}:")
    for png in sorted(out.glob("rotation_*.png")):
        print(f"  {png}")
    for _, r in runs:
        print(
            f"  {r / 'metrics.json'}"
            + (f"  ({r / 'gradvar_heatmap.png'})" if (r / "gradvar_heatmap.png").exists() else "")
        )


if __name__ == "__main__":
    main()
