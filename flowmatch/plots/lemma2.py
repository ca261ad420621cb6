"""Lemma 2 (Reu et al. 2025): noiseless ReFlow returns a coupling whose interpolation lines never cross.

``python -m flowmatch.plots.lemma2 RUNS_DIR FIG_DIR`` reads ``make lemma2``: ``train/`` (flows trained on the
rotated coupling x1 = mu + R(angle) x0, fresh pairs, angle in {90, 180}, sigma in {0, 0.05}) and ``pairs/`` (each
flow's ReFlow output pairs (x0, Phi(x0)) on fresh sources, ``evaluate.py task=reflow_pairs``), and writes

- ``lemma2.png``: per run, the generated endpoints Phi(x0) - mu coloured by the polar angle of x0 (first panel:
  the sources themselves), so the rotation the flow applies reads off the colour wheel; below, the L2 from
  Phi(x0) to the rotated partner mu + R x0 and to the OT partner mu + x0 (mean +- std over the sources);
- ``lemma2.csv``: one row per run: those L2s, their ratio, the fraction of sources nearer their rotated partner
  than their OT partner, the pair accuracy against either partner set, the rotation angle and scales of the
  affine map fitted to (x0, Phi(x0)), and the closed-form prediction Theta(sigma)
  (:func:`flowmatch.analysis.reflow.reflow_rotation_angle`);
- ``summary.json``: those numbers per (angle, sigma) and the verdict criteria decided in advance
  (conf/experiment/paper/lemma2.yaml).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from flowmatch.analysis.reflow import fitted_rotation, reflow_rotation_angle  # noqa: E402
from flowmatch.gaussian import rotation_matrix  # noqa: E402
from flowmatch.metrics import l2_distances, pair_accuracy  # noqa: E402
from flowmatch.plots.common import figure_cli, find_jobs, load_config, load_run, write_csv, write_json  # noqa: E402

RATIO = 0.1  # "much smaller": mean L2 to the rotated partner below RATIO x mean L2 to the OT partner
ANGLE_TOL = 5.0  # degrees


def _partners(cfg: dict, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, rotated partner mu + sqrt(c) R x0, OT partner mu + sqrt(c) x0) for data N(mu, c I) (scalar cov)."""
    data, angle = cfg["data"], float(cfg["coupling"]["angle"])
    if not isinstance(data["cov"], (int, float)):
        raise SystemExit(f"error: lemma2 expects a scalar data.cov (c I), got {data['cov']!r}")
    dim, scale = x0.shape[1], math.sqrt(float(data["cov"]))
    mu = torch.as_tensor(data["mean"], dtype=torch.float64).expand(dim)
    r = rotation_matrix(dim, angle).double()
    x = x0.double()
    return mu, mu + scale * x @ r.T, mu + scale * x


def run_row(pairs_run: Path) -> dict | None:
    """Every number of one ReFlow output (None, with a warning, when its pairs file is missing)."""
    path = pairs_run / "reflow_pairs.pt"
    if not path.exists():
        print(f"warning: {pairs_run} has no reflow_pairs.pt (failed run): skipped", file=sys.stderr)
        return None
    state = torch.load(path, map_location="cpu")
    train_run = Path(state["ckpt_path"]).parent.parent
    cfg, metrics = load_run(train_run)
    x0, x1 = state["x0"].double(), state["x1"].double()
    mu, rot, ot = _partners(cfg, x0)
    d_rot, d_ot = l2_distances(x1, rot), l2_distances(x1, ot)
    angle, sigma = float(cfg["coupling"]["angle"]), float(cfg["interpolant"]["sigma"])
    fit = fitted_rotation((x0).numpy(), (x1 - mu).numpy())
    return {
        "angle": angle,
        "sigma": sigma,
        "n": len(x0),
        "l2_rotated": float(d_rot.mean()),
        "l2_rotated_std": float(d_rot.std()),
        "l2_ot": float(d_ot.mean()),
        "l2_ot_std": float(d_ot.std()),
        "ratio_rotated_over_ot": float(d_rot.mean() / d_ot.mean()),
        "frac_nearer_rotated": float((d_rot < d_ot).double().mean()),
        "pair_acc_rotated": pair_accuracy(x1, rot),
        "pair_acc_ot": pair_accuracy(x1, ot),
        "fitted_angle_deg": fit["angle_deg"],
        "fitted_scale_min": fit["scale_min"],
        "fitted_scale_max": fit["scale_max"],
        "fit_rms_residual": fit["rms_residual"],
        "predicted_angle_deg": reflow_rotation_angle(angle, sigma),
        "train_eval_l2_ot": metrics.get("eval/l2_ot", float("nan")),
        "train_loss": metrics.get("train/loss", float("nan")),
        "solver": state.get("solver", ""),
        "pairs_run": str(pairs_run),
        "train_run": str(train_run),
    }


def verdicts(rows: list[dict]) -> dict:
    """The criteria of conf/experiment/paper/lemma2.yaml."""
    by = {(r["angle"], r["sigma"]): r for r in rows}
    out: dict = {}
    if (90.0, 0.0) in by:
        r = by[(90.0, 0.0)]
        out["angle90_sigma0_ratio_below_0.1"] = r["ratio_rotated_over_ot"] < RATIO
        out["angle90_sigma0_fitted_angle_within_5deg_of_90"] = abs(r["fitted_angle_deg"] - 90.0) < ANGLE_TOL
        out["angle90_sigma0_returns_the_coupling"] = (
            out["angle90_sigma0_ratio_below_0.1"] and out["angle90_sigma0_fitted_angle_within_5deg_of_90"]
        )
    if (180.0, 0.0) in by:
        out["angle180_sigma0_contrast_ratio_at_least_0.1"] = by[(180.0, 0.0)]["ratio_rotated_over_ot"] >= RATIO
    for (a, s), r in sorted(by.items()):
        if s > 0:
            out[f"angle{a:g}_sigma{s:g}_fitted_vs_predicted_deg"] = [r["fitted_angle_deg"], r["predicted_angle_deg"]]
    return out


def _steps(rows: list[dict]) -> str:
    """'after N steps' (or 'after A/B steps') of the flows whose ReFlow pairs ``rows`` describe."""
    steps = sorted({int(load_run(Path(r["train_run"]))[1].get("train/global_step", -1)) for r in rows})
    return f"after {'/'.join(map(str, steps))} steps"


def plot(rows: list[dict], out: Path) -> None:
    """Scatter panels (sources, then one per run) and the L2 bars."""
    fig = plt.figure(figsize=(3.2 * (len(rows) + 1), 7.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
    axes = top.subplots(1, len(rows) + 1, squeeze=False)[0]
    first = torch.load(Path(rows[0]["pairs_run"]) / "reflow_pairs.pt", map_location="cpu")
    x0 = first["x0"].numpy()
    hue = (np.arctan2(x0[:, 1], x0[:, 0]) + np.pi) / (2 * np.pi)
    axes[0].scatter(x0[:, 0], x0[:, 1], c=hue, cmap="hsv", s=3)
    axes[0].set_title("sources x0 = OT partner − μ\n(colour: polar angle of x0)", fontsize=9)
    shown = [np.abs(x0)]
    for ax, r in zip(axes[1:], rows):
        state = torch.load(Path(r["pairs_run"]) / "reflow_pairs.pt", map_location="cpu")
        a0, a1 = state["x0"].numpy(), state["x1"].numpy()
        cfg = load_config(Path(r["train_run"]))
        y = a1 - np.broadcast_to(np.asarray(cfg["data"]["mean"], dtype=float), a1.shape[1:])
        shown.append(np.abs(y[:, :2]))
        h = (np.arctan2(a0[:, 1], a0[:, 0]) + np.pi) / (2 * np.pi)
        ax.scatter(y[:, 0], y[:, 1], c=h, cmap="hsv", s=3)
        pred = r["predicted_angle_deg"]
        ax.set_title(
            f"Φ(x0) − μ: coupling {r['angle']:g}°, σ = {r['sigma']:g}\nfitted rotation {r['fitted_angle_deg']:.1f}°"
            f" (closed form {'undefined' if math.isnan(pred) else f'{pred:.1f}°'})",
            fontsize=8,
        )
    lim = max(4.0, 1.1 * float(np.quantile(np.concatenate([v.ravel() for v in shown]), 0.995)))
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="coordinate 1", ylabel="coordinate 2")
        ax.grid(alpha=0.3)
    ax = bottom.subplots(1, 1)
    x = np.arange(len(rows))
    for j, (key, color, label) in enumerate(
        (("l2_rotated", "tab:red", "rotated partner μ + R x0"), ("l2_ot", "tab:blue", "OT partner μ + x0"))
    ):
        vals, errs = [r[key] for r in rows], [r[key + "_std"] for r in rows]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.36, yerr=errs, color=color, alpha=0.85, capsize=3, label=label)
    ax.set_xticks(x, [f"{r['angle']:g}°, σ = {r['sigma']:g}\nratio {r['ratio_rotated_over_ot']:.3f}" for r in rows])
    ax.set(
        xlabel="coupling angle, σ",
        ylabel="L2 from Φ(x0) (mean ± std over sources)",
        title="ReFlow output vs the training coupling and OT",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(
        "Lemma 2: ReFlow of a rotated Gaussian coupling (fresh pairs). Expected: σ = 0 at 90° returns the rotation "
        "(lines never cross);\n180° (all lines cross at t = 1/2) cannot; σ > 0 moves toward OT by the closed-form "
        f"angle Θ(σ); flows trained {_steps(rows)}",
        fontsize=10,
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: figure, CSV and summary.json of a ``make lemma2`` runs directory."""
    runs_dir, out = figure_cli(__doc__, argv)
    pair_runs = [j for j in find_jobs(runs_dir) if (j / "reflow_pairs.pt").exists()]
    rows = [r for r in (run_row(j) for j in pair_runs) if r is not None]
    if not rows:
        sys.exit(f"error: no ReFlow pairs (reflow_pairs.pt) under {str(runs_dir)!r}: run the sweep first")
    rows.sort(key=lambda r: (r["angle"], r["sigma"]))
    write_csv(out / "lemma2.csv", rows)
    write_json(out / "summary.json", {"runs": rows, "verdicts": verdicts(rows)})
    plot(rows, out / "lemma2.png")
    print(f"flowmatch: lemma2 figure, CSV and summary in {out}")


if __name__ == "__main__":
    main()
