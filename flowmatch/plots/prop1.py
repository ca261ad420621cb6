"""Prop. 1: at sigma = 0 the pair-optimal field of a rotated coupling has zero loss and zero gradient variance,
the OT field under the same rotation does not.

``python -m flowmatch.plots.prop1 RUNS_DIR FIG_DIR`` reads the ``make prop1`` sweep (field=ot,rot x angle,
coupling=rotated with coupling.angle = the angle, interpolant=linear) and writes FIG_DIR/prop1.png (per-bin
gradient variance against t for each angle, closed form and Monte Carlo, log axis; total variance against the
angle), FIG_DIR/prop1.csv (per job and bin, and the bin sum: loss and grad_var, closed form next to the Monte
Carlo mean +- std over seeds) and FIG_DIR/summary.json. A field is *pair-optimal* when it is the Lemma-1
field of the coupling: field=rot at the coupling's angle, or field=ot at 0 degrees (the OT coupling).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.plots.common import figure_cli, save_figure, write_csv, write_json  # noqa: E402
from flowmatch.plots.field_sweep import (  # noqa: E402
    FLOOR,
    Job,
    bin_rows,
    floored,
    jsonable,
    listed,
    load_jobs,
    log_yerr,
    total_row,
)  # noqa: E402

STATS = ("loss", "grad_var")


def pair_optimal(job: Job) -> bool:
    """Whether the job's field is the Lemma-1 field of its (rotated) coupling."""
    angle = job.coupling_angle or 0.0
    return (job.field == "rot" and job.field_angle == angle) or (job.field == "ot" and angle % 360 == 0)


def table(jobs: list[Job]) -> list[dict]:
    """The CSV rows: per job, one row per bin and one for the sum over bins."""
    out = []
    for job in jobs:
        head = {"field": job.field, "angle": job.coupling_angle, "pair_optimal": pair_optimal(job), "dim": job.dim}
        for row in [*bin_rows(job, STATS), total_row(job, STATS)]:
            out.append({**head, **row})
    return out


def summarize(jobs: list[Job]) -> dict:
    """Headline numbers: the pair-optimal fields' largest |loss| and grad_var (closed form and any Monte Carlo
    value), and the OT field's total variance per rotation angle (closed form, MC mean +- std)."""
    opt = [j for j in jobs if pair_optimal(j)]
    ot_rot = sorted((j for j in jobs if j.field == "ot"), key=lambda j: j.coupling_angle)
    out = {"pair_optimal_jobs": len(opt)}
    for stat in STATS:
        out[f"pair_optimal_max_abs_{stat}_exact"] = (
            max(float(np.abs(j.exact(stat)).max()) for j in opt) if opt else None
        )
        out[f"pair_optimal_max_abs_{stat}_mc"] = max(float(np.abs(j.mc(stat)).max()) for j in opt) if opt else None
    per_angle = {}
    for j in ot_rot:
        tot = total_row(j, STATS)
        per_angle[f"{j.coupling_angle:g}"] = {
            "grad_var_total_exact": tot["grad_var_exact"],
            "grad_var_total_mc_mean": tot["grad_var_mc_mean"],
            "grad_var_total_mc_std": tot["grad_var_mc_std"],
            "loss_mean_exact": tot["loss_exact"] / j.n_bins,
            "n_seeds": tot["n_seeds"],
        }
    out["ot_field_under_rotation"] = per_angle
    exact = [v["grad_var_total_exact"] for v in per_angle.values()]
    out["ot_variance_grows_with_angle_exact"] = bool(len(exact) > 1 and np.all(np.diff(exact) > 0))
    mc = [v["grad_var_total_mc_mean"] for v in per_angle.values()]
    out["ot_variance_grows_with_angle_mc"] = bool(len(mc) > 1 and np.all(np.diff(mc) > 0))
    out["prop1_holds"] = bool(
        opt
        and max(out["pair_optimal_max_abs_grad_var_mc"], out["pair_optimal_max_abs_grad_var_exact"]) < 1e-20
        and max(out["pair_optimal_max_abs_loss_mc"], out["pair_optimal_max_abs_loss_exact"]) < 1e-20
        and out["ot_variance_grows_with_angle_exact"]
    )
    return out


def _profile(ax, job: Job, color, label: str) -> None:
    """Closed form (line) and Monte Carlo mean +- std (markers) of the per-bin grad_var of ``job``, floored."""
    t = job.mids()
    ex, ex_low = floored(job.exact("grad_var"))
    mc = job.mc("grad_var")
    mean, low = floored(mc.mean(0))
    std = mc.std(0, ddof=1) if len(mc) > 1 else np.zeros_like(mean)
    ax.plot(t, ex, "-", color=color, lw=1.2, label=f"{label} closed form")
    ax.errorbar(
        t[~low],
        mean[~low],
        yerr=log_yerr(mean[~low], std[~low]),
        fmt="o",
        ms=4,
        color=color,
        capsize=2,
        label=f"{label} MC ({len(mc)} seeds)",
    )
    if low.any():
        ax.plot(t[low], mean[low], "o", mfc="none", color=color, ms=6)
    if ex_low.any():
        ax.plot(t[ex_low], ex[ex_low], "x", color=color, ms=6)


def plot(jobs: list[Job], out: Path) -> Path:
    """Three panels: the OT field under each non-zero rotation, the pair-optimal fields, the totals against the
    angle (exact zeros drawn at FLOOR and marked)."""
    ot = sorted((j for j in jobs if j.field == "ot" and not pair_optimal(j)), key=lambda j: j.coupling_angle)
    opt = sorted((j for j in jobs if pair_optimal(j)), key=lambda j: (j.coupling_angle, j.field))
    angles = sorted({j.coupling_angle for j in jobs})
    colors = dict(zip(angles, plt.cm.viridis(np.linspace(0, 0.9, len(angles)))))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    for j in ot:
        _profile(ax[0], j, colors[j.coupling_angle], f"{j.coupling_angle:g}°")
    for j in opt:
        name = "v_OT (OT coupling)" if j.field == "ot" else "v_rot"
        _profile(ax[1], j, colors[j.coupling_angle], f"{name} {j.coupling_angle:g}°")
    ax[0].set_title("v_OT under a rotated coupling x1 = μ + R(angle) x0", fontsize=10)
    ax[1].set_title("pair-optimal fields (field angle = coupling angle)", fontsize=10)
    ax[1].axhspan(FLOOR / 3, 1e-27, color="0.92", zorder=0)
    ax[1].text(
        0.5,
        0.9,
        "0 to float precision: float64 residuals ~1e-16, squared",
        ha="center",
        fontsize=8,
        transform=ax[1].transAxes,
    )
    ax[1].text(
        0.02,
        0.03,
        f"x (closed form) / hollow o (MC): exactly 0, drawn at {FLOOR:g}",
        fontsize=7,
        transform=ax[1].transAxes,
    )
    for a in ax[:2]:
        a.set(yscale="log", xlabel="t (bin centre)", ylabel="gradient variance tr Cov[∇θ ℓ] in the bin")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7, ncol=2)
    ax[1].legend(fontsize=6, ncol=2, loc="center right")
    for field, js, mark in (
        ("v_OT", sorted((j for j in jobs if j.field == "ot"), key=lambda j: j.coupling_angle), "o"),
        ("pair-optimal v_rot", sorted((j for j in jobs if j.field == "rot"), key=lambda j: j.coupling_angle), "s"),
    ):
        if not js:
            continue
        a = np.array([j.coupling_angle for j in js])
        tots = [j.mc("grad_var").sum(1) for j in js]
        std = np.array([t.std(ddof=1) if len(t) > 1 else 0.0 for t in tots])
        line = ax[2].plot(a, [j.exact("grad_var").sum() for j in js], "-", label=f"{field} closed form")[0]
        ax[2].errorbar(
            a,
            [t.mean() for t in tots],
            yerr=std,
            fmt=mark,
            mfc="none",
            color=line.get_color(),
            capsize=3,
            label=f"{field} MC mean ± std",
        )
    opt_max = max((float(np.abs(j.exact("grad_var")).sum()) for j in opt), default=0.0)
    opt_max = max([opt_max] + [float(np.abs(j.mc("grad_var")).sum(1).max()) for j in opt])
    ax[2].text(
        0.02,
        0.55,
        f"pair-optimal fields: Σ ≤ {opt_max:.1e}\n(0 to float precision)",
        fontsize=8,
        transform=ax[2].transAxes,
    )
    ax[2].set(
        xlabel="rotation angle of the coupling (degrees)",
        ylabel="Σ over bins of grad variance",
        title="total gradient variance against the angle",
    )
    ax[2].grid(alpha=0.3)
    ax[2].legend(fontsize=7, loc="upper left")
    d = listed(j.dim for j in jobs)
    fig.suptitle(
        f"Prop. 1: linear interpolant (σ = 0), x0 ~ N(0, I), target N(5, I), d = {d}; "
        "gaussian_affine model set to the field; MC mean ± std over seeds, lines: closed form",
        fontsize=10,
    )
    save_figure(fig, out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR FIG_DIR."""
    runs_dir, out = figure_cli(__doc__, argv)
    jobs = load_jobs(runs_dir)
    print(write_csv(out / "prop1.csv", table(jobs)))
    print(write_json(out / "summary.json", jsonable(summarize(jobs))))
    print(plot(jobs, out / "prop1.png"))


if __name__ == "__main__":
    main()
