"""Figures for the 180-degree rotation experiment (Counter Example 1).

``python -m flowmatch.plots.rotation SWEEP_DIR`` reads every run under SWEEP_DIR and writes
``rotation_trajectories.png`` (training pairs, the OT targets T_OT(x0) of the training sources and the integrated
trajectories per sigma, at coarse and fine Euler integration and with the configured solver),
``rotation_pair_acc.png`` (pair accuracy, distance to the training partner and to the OT map against the number
of Euler steps) and, when the runs have a gradvar.csv, ``rotation_gradvar.png`` (last per-bin gradient variance
and loss) and ``rotation_gradvar_heatmaps.png`` (each run's variance over training, one shared colour scale).
Every title names σ and the training step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flowmatch.gaussian import gaussian_ot_map  # noqa: E402
from flowmatch.plots.common import euler_series, find_runs, load_run, runs_caption, save_figure  # noqa: E402
from flowmatch.plots.gradvar import plot_heatmaps, plot_profiles  # noqa: E402

OT_STYLE = {"marker": "x", "s": 14, "color": "tab:green", "lw": 0.9, "zorder": 4, "label": "OT target T_OT(x0)"}


def _label(cfg: dict) -> str:
    return f"{cfg['interpolant']['_target_'].rsplit('.', 1)[-1]} σ={cfg['interpolant']['sigma']:g}"


def _caption(cfg: dict, metrics: dict) -> str:
    return f"σ={cfg['interpolant']['sigma']:g}, step {int(metrics.get('train/global_step', -1))}"


def _runs(root: Path):
    runs = [(load_run(r), r) for r in find_runs(root)]
    return sorted(runs, key=lambda item: item[0][0]["interpolant"]["sigma"])


def ot_targets(cfg: dict, x0: torch.Tensor) -> torch.Tensor:
    """T_OT(x0): the W2-optimal map of the run's Gaussian ends (N(0, I) and N(data.mean, data.cov), in the
    order of ``direction``) applied to the sources ``x0`` (N, d)."""
    data, d = cfg["data"], x0.shape[1]
    noise = (torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    target = (data["mean"], data["cov"])
    ends = (noise, target) if cfg.get("direction", {}).get("name", "forward") == "forward" else (target, noise)
    a, b = gaussian_ot_map(*ends[0], *ends[1])
    return x0.double() @ a.T + b


def _traj_keys(data: dict) -> list[str]:
    return [k for k in data if k not in ("x0", "x1")]


def _traj_order(key: str) -> tuple[int, int]:
    return (1, 0) if key == "solver" else (0, int(key.removeprefix("euler")))


def _pairs_panel(ax, x0, x1, x_ot) -> str:
    for a, b in zip(x0, x1):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="0.6", lw=0.6)
    for a, b in zip(x0, x_ot):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:green", lw=0.4, ls=":")
    return "training pairs (grey), OT lines (dotted)"


def _trajectory_panel(ax, traj, cfg: dict, metrics: dict, key: str) -> str:
    for i in range(traj.shape[1]):
        ax.plot(traj[:, i, 0], traj[:, i, 1], color="tab:purple", lw=0.6, alpha=0.8)
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=8, color="tab:purple", zorder=3, label="endpoint")
    tag = key if key != "solver" else cfg["solver"]["method"]
    acc = metrics.get(f"eval/pair_acc@{key}" if key != "solver" else "eval/pair_acc", float("nan"))
    return f"{tag}: pair acc {acc:.2f}"


def trajectories_figure(runs):
    """Figure: per run (row, one σ) the training pairs with the OT lines, then the integrated trajectories of each
    kept solver; every panel marks the training sources and targets and the OT targets T_OT(x0)."""
    loaded = [torch.load(run / "eval_trajectories.pt") for _, run in runs]
    panels = ["pairs"] + sorted({k for data in loaded for k in _traj_keys(data)}, key=_traj_order)
    fig, axes = plt.subplots(
        len(runs), len(panels), figsize=(3.2 * len(panels), 3.4 * len(runs)), squeeze=False, sharex=True, sharey=True
    )
    for row, (((cfg, metrics), _), data) in enumerate(zip(runs, loaded)):
        x0, x1 = data["x0"], data["x1"]
        x_ot = ot_targets(cfg, x0).numpy()
        x0, x1 = x0.numpy(), x1.numpy()
        for col, key in enumerate(panels):
            ax = axes[row, col]
            if key == "pairs":
                what = _pairs_panel(ax, x0, x1, x_ot)
            elif key in data:
                what = _trajectory_panel(ax, data[key].numpy(), cfg, metrics, key)
            else:
                ax.axis("off")
                continue
            ax.scatter(x0[:, 0], x0[:, 1], s=8, color="tab:blue", label="x0 (train)", zorder=2)
            ax.scatter(x1[:, 0], x1[:, 1], s=8, color="tab:red", label="x1 (train)", zorder=2)
            ax.scatter(x_ot[:, 0], x_ot[:, 1], **OT_STYLE)
            ax.set_title(f"{_caption(cfg, metrics)}\n{what}", fontsize=8)
            ax.set(xlabel="x[0]", ylabel="x[1]", aspect="equal")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"180° rotation (x1 = 5 − x0, {len(x0)} fixed pairs), {runs_caption(r for r, _ in runs)}: "
        "training pairs, OT targets and integrated trajectories"
    )
    return fig


def pair_accuracy_figure(runs):
    """Figure: pair accuracy and L2 to the partner / to the OT map against the number of Euler steps."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0))
    for (cfg, metrics), _ in runs:
        label = f"{_label(cfg)}, step {int(metrics.get('train/global_step', -1))}"
        ks, acc = euler_series(metrics, "pair_acc")
        (line,) = axes[0].plot(ks, acc, marker="o", label=label)
        ks, l2p = euler_series(metrics, "l2_partner")
        axes[1].plot(ks, l2p, marker="o", color=line.get_color(), label=f"{label}: to partner")
        ks, l2o = euler_series(metrics, "l2_ot")
        if l2o:
            axes[1].plot(ks, l2o, marker="s", ls="--", color=line.get_color(), label=f"{label}: to OT map")
    caption = runs_caption(r for r, _ in runs)
    axes[0].set(
        xscale="log",
        xlabel="Euler steps",
        ylabel="pair accuracy",
        ylim=(-0.03, 1.03),
        title=f"reproduces the training pairing? ({caption})",
    )
    axes[1].set(
        xscale="log", xlabel="Euler steps", ylabel="mean L2 of endpoint", title=f"to partner / OT map ({caption})"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.title.set_fontsize(9)
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
    return fig


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
        save_figure(trajectories_figure(runs), out / "rotation_trajectories.png", dpi=120)
    save_figure(pair_accuracy_figure(runs), out / "rotation_pair_acc.png", dpi=120, rect=(0, 0.05, 1, 1))
    if all((r / "gradvar.csv").exists() for _, r in runs):
        dirs, labels = [r for _, r in runs], [f"σ={cfg['interpolant']['sigma']:g}" for (cfg, _), _ in runs]
        title = f"180° rotation, {runs_caption(r for r, _ in runs)}"
        plot_profiles(dirs, labels, out / "rotation_gradvar.png", title=f"{title}: last probe")
        plot_heatmaps(dirs, labels, out / "rotation_gradvar_heatmaps.png", title=f"{title}: gradient variance")
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
