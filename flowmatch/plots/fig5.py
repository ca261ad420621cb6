"""Fig. 5: gradient variance at v_OT when the pairs come from the independent coupling vs a rotated coupling,
against the dimension.

``python -m flowmatch.plots.fig5 RUNS_DIR FIG_DIR`` reads the ``make fig5`` sweep (field=ot, coupling=
independent,rotated x gradvar_field.dim) and writes FIG_DIR/fig5.png (per-bin profiles, per-bin ratio
rotated/independent, totals, ratio of totals and per-parameter variance against d), FIG_DIR/fig5.csv (per d and
bin, and the bin sum: both couplings' closed form and MC mean +- std, ratio and gap) and FIG_DIR/summary.json.

The rotation is :func:`flowmatch.gaussian.rotation_matrix`: every coordinate plane (0,1), (2,3), ... turns by
the angle and, for odd d, the last coordinate stays; the rotated fraction of coordinates is 2 floor(d/2) / d.
"Per-parameter variance" is grad_var d^2 / (d + d^2): the trace of the covariance of the gradient of the
summed-over-dimensions loss ||r||^2, divided by the d + d^2 parameters of the gaussian_affine model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.plots.common import figure_cli, save_figure, write_csv, write_json  # noqa: E402
from flowmatch.plots.field_sweep import Job, jsonable, listed, load_jobs, log_yerr  # noqa: E402

COUPLINGS = ("independent", "rotated")


def by_dim(jobs: list[Job]) -> dict[int, dict[str, Job]]:
    """{d: {coupling: job}} of the field=ot jobs; a dimension lacking one of the couplings is an error."""
    out: dict[int, dict[str, Job]] = {}
    for j in jobs:
        if j.field == "ot":
            out.setdefault(j.dim, {})[j.coupling] = j
    bad = {d: sorted(v) for d, v in out.items() if set(v) != set(COUPLINGS)}
    if bad:
        raise SystemExit(f"error: dimensions without both couplings {COUPLINGS}: {bad}")
    return dict(sorted(out.items()))


def per_param(var, d: int):
    """grad_var d^2 / (d + d^2): per-parameter variance of the summed-over-dimensions loss gradient."""
    return np.asarray(var, dtype=float) * d / (1 + d)


def _values(job: Job, stat: str):
    """(exact per bin + total, MC (seeds, bins + 1)) of ``stat``: the last column is the sum over bins."""
    mc = job.mc(stat)
    ex = job.exact(stat)
    return np.append(ex, ex.sum()), np.concatenate([mc, mc.sum(1, keepdims=True)], 1)


def table(groups: dict) -> list[dict]:
    """The CSV rows: per d and (bin | total) both couplings' numbers, the ratio rotated/independent and gap."""
    rows = []
    for d, pair in groups.items():
        ind, rot = pair["independent"], pair["rotated"]
        e = ind.edges()
        vi, mi = _values(ind, "grad_var")
        vr, mr = _values(rot, "grad_var")
        li, lr = _values(ind, "loss")[0], _values(rot, "loss")[0]
        n = min(len(mi), len(mr))
        for k in range(len(vi)):
            last = k == len(vi) - 1
            ratio_seeds = mr[:n, k] / mi[:n, k]
            rows.append(
                {
                    "dim": d,
                    "bin": "total" if last else k,
                    "t_lo": e[0] if last else e[k],
                    "t_hi": e[-1] if last else e[k + 1],
                    "rotated_fraction": 2 * (d // 2) / d,
                    "angle": rot.coupling_angle,
                    "ind_exact": vi[k],
                    "ind_mc_mean": mi[:, k].mean(),
                    "ind_mc_std": mi[:, k].std(ddof=1),
                    "rot_exact": vr[k],
                    "rot_mc_mean": mr[:, k].mean(),
                    "rot_mc_std": mr[:, k].std(ddof=1),
                    "ratio_exact": vr[k] / vi[k],
                    "ratio_mc": mr[:, k].mean() / mi[:, k].mean(),
                    "ratio_mc_seed_std": ratio_seeds.std(ddof=1),
                    "gap_exact": vr[k] - vi[k],
                    "gap_mc": mr[:, k].mean() - mi[:, k].mean(),
                    "ind_per_param_exact": per_param(vi[k], d),
                    "rot_per_param_exact": per_param(vr[k], d),
                    "ind_loss_exact": li[k] / (ind.n_bins if last else 1),
                    "rot_loss_exact": lr[k] / (rot.n_bins if last else 1),
                    "n_seeds_ind": len(mi),
                    "n_seeds_rot": len(mr),
                }
            )
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per d: total variance per coupling (closed form, MC mean +- std), ratio, gap, t-averaged loss, and the
    number of bins where the rotated coupling has the lower variance (closed form)."""
    out = {}
    for r in rows:
        if r["bin"] != "total":
            continue
        bins = [x for x in rows if x["dim"] == r["dim"] and x["bin"] != "total"]
        out[str(r["dim"])] = {
            **{
                k: r[k]
                for k in (
                    "ind_exact",
                    "ind_mc_mean",
                    "ind_mc_std",
                    "rot_exact",
                    "rot_mc_mean",
                    "rot_mc_std",
                    "ratio_exact",
                    "ratio_mc",
                    "gap_exact",
                    "gap_mc",
                    "ind_per_param_exact",
                    "rot_per_param_exact",
                    "ind_loss_exact",
                    "rot_loss_exact",
                    "rotated_fraction",
                )
            },
            "bins_rotated_lower_exact": sum(x["ratio_exact"] < 1 for x in bins),
            "ratio_exact_per_bin": [x["ratio_exact"] for x in bins],
        }
    return {"per_dim": out, "angle": rows[0]["angle"] if rows else None}


def plot(groups: dict, rows: list[dict], out: Path) -> Path:
    """Six panels: profiles, per-bin ratio, totals, ratio of totals, per-parameter variance, notes."""
    dims = list(groups)
    colors = dict(zip(dims, plt.cm.viridis(np.linspace(0, 0.9, len(dims)))))
    fig, ax = plt.subplots(2, 3, figsize=(16, 9))
    a = ax[0, 0]
    for d in dims:
        for c, ls, mark in (("independent", "--", "s"), ("rotated", "-", "o")):
            j = groups[d][c]
            mc = j.mc("grad_var")
            a.plot(j.mids(), j.exact("grad_var"), ls, color=colors[d], lw=1.2)
            a.errorbar(
                j.mids(),
                mc.mean(0),
                yerr=log_yerr(mc.mean(0), mc.std(0, ddof=1)),
                fmt=mark,
                ms=3,
                mfc="none",
                color=colors[d],
                capsize=2,
            )
    for d in dims:
        a.plot([], [], color=colors[d], label=f"d = {d}")
    a.plot([], [], "k-", label="rotated (closed form; o MC)")
    a.plot([], [], "k--", label="independent (closed form; □ MC)")
    a.set(yscale="log", xlabel="t (bin centre)", ylabel="grad variance in the bin", title="per-bin variance at v_OT")
    a.legend(fontsize=6, ncol=2, loc="upper center")
    a = ax[0, 1]
    for d in dims:
        per = [r for r in rows if r["dim"] == d and r["bin"] != "total"]
        t = [(r["t_lo"] + r["t_hi"]) / 2 for r in per]
        a.plot(t, [r["ratio_exact"] for r in per], "-", color=colors[d], label=f"d = {d} closed form")
        a.plot(t, [r["ratio_mc"] for r in per], "o", ms=3, color=colors[d])
    a.axhline(1, color="k", lw=0.8)
    a.set(
        xlabel="t (bin centre)",
        ylabel="Var rotated / Var independent",
        title="per-bin ratio (markers: ratio of MC means)",
    )
    a.legend(fontsize=7)
    tot = [r for r in rows if r["bin"] == "total"]
    x = [r["dim"] for r in tot]
    a = ax[0, 2]
    for c, key, mark in (("independent", "ind", "s"), ("rotated", "rot", "o")):
        line = a.plot(x, [r[f"{key}_exact"] for r in tot], "-", label=f"{c} closed form")[0]
        a.errorbar(
            x,
            [r[f"{key}_mc_mean"] for r in tot],
            yerr=[r[f"{key}_mc_std"] for r in tot],
            fmt=mark,
            mfc="none",
            capsize=3,
            color=line.get_color(),
            label=f"{c} MC mean ± std",
        )
    a.set(xscale="log", xlabel="dimension d", ylabel="Σ over bins of grad variance", title="total variance at v_OT")
    a.legend(fontsize=7)
    a = ax[1, 0]
    a.plot(x, [r["ratio_exact"] for r in tot], "-", label="closed form")
    a.errorbar(
        x,
        [r["ratio_mc"] for r in tot],
        yerr=[r["ratio_mc_seed_std"] for r in tot],
        fmt="o",
        capsize=3,
        label="MC: ratio of means (bars: std of per-seed ratios)",
    )
    a.axhline(1, color="k", lw=0.8)
    a.set(xscale="log", xlabel="dimension d", ylabel="total rotated / total independent", title="ratio of totals")
    a.legend(fontsize=7)
    a = ax[1, 1]
    for c, key in (("independent", "ind"), ("rotated", "rot")):
        a.plot(x, [r[f"{key}_per_param_exact"] for r in tot], "o-", label=c)
    a.set(
        xscale="log",
        xlabel="dimension d",
        ylabel="Σ bins of grad_var · d² / (d + d²)",
        title="per-parameter variance of the summed loss (closed form)",
    )
    a.legend(fontsize=7)
    a = ax[1, 2]
    a.axis("off")
    angle = tot[0]["angle"] if tot else float("nan")
    notes = [
        f"v_OT of N(0, I) -> N(5, I): v = μ (Θ = 0); interpolant linear (σ = 0); rotation {angle:g}°",
        "rotation_matrix: planes (0,1), (2,3), ... all rotated by the angle;",
        "odd d: the last coordinate is fixed. Rotated fraction of coordinates:",
        "   " + ", ".join(f"d={r['dim']}: {r['rotated_fraction']:.2f}" for r in tot),
        "t-averaged loss (closed form), independent / rotated:",
        *(f"   d={r['dim']}: {r['ind_loss_exact']:.2f} / {r['rot_loss_exact']:.2f}" for r in tot),
        "ratio of totals (closed form):",
        "   " + ", ".join(f"d={r['dim']}: {r['ratio_exact']:.3f}" for r in tot),
    ]
    a.text(0, 1, "\n".join(notes), va="top", fontsize=8, family="monospace", wrap=True)
    for a in ax.flat[:5]:
        a.grid(alpha=0.3)
    for a in (ax[0, 2], ax[1, 0], ax[1, 1]):
        a.set_xticks(dims, [str(d) for d in dims], minor=False)
        a.set_xticks([], minor=True)
    n = listed(len(j.seeds) for g in groups.values() for j in g.values())
    fig.suptitle(
        f"Fig. 5: gradient variance at v_OT, independent vs {angle:g}° rotated coupling, against d (MC over {n} seeds)",
        fontsize=11,
    )
    save_figure(fig, out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR FIG_DIR."""
    runs_dir, out = figure_cli(__doc__, argv)
    groups = by_dim(load_jobs(runs_dir))
    rows = table(groups)
    print(write_csv(out / "fig5.csv", rows))
    print(write_json(out / "summary.json", jsonable(summarize(rows))))
    print(plot(groups, rows, out / "fig5.png"))


if __name__ == "__main__":
    main()
