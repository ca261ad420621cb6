"""Fig. 4: with interpolant noise, is the gradient variance at v_OT lower than at the pair-optimal rotated field?

``python -m flowmatch.plots.fig4 RUNS_DIR FIG_DIR`` reads the ``make fig4`` sweep (interpolant x sigma x
field=ot,rot x coupling=rotated,independent) and, per setting (interpolant, sigma) and coupling reading, pairs
the field=ot and field=rot jobs by seed (the same seed draws the same probe for both fields), then tests
H1: Var at v_OT < Var at v_rot with :func:`flowmatch.analysis.stats.one_sided_paired_test`, per time bin and
overall (the per-seed sum over bins). Writes FIG_DIR/fig4.png (per-bin profiles, MC mean +- std next to the
closed form, overall p-value in each panel title; per-bin p-values), FIG_DIR/fig4.csv (every number of the
figure: closed form, MC mean +- std of both fields, the test statistics per bin and overall) and
FIG_DIR/summary.json (per setting and reading: overall variances, p-value, whether the claim holds).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.analysis.stats import one_sided_paired_test  # noqa: E402
from flowmatch.plots.common import figure_cli, save_figure, write_csv, write_json  # noqa: E402
from flowmatch.plots.field_sweep import Job, jsonable, listed, load_jobs, log_yerr, paired  # noqa: E402

ALPHA = 0.01  # the paper's threshold
READINGS = ("rotated", "independent")


def pairs(jobs: list[Job]) -> dict:
    """{(interpolant, sigma, coupling): (ot job, rot job)}; a setting lacking one of the two fields is an error."""
    by = {}
    for j in jobs:
        by.setdefault((j.interpolant, j.sigma, j.coupling), {})[j.field] = j
    bad = {k: sorted(v) for k, v in by.items() if set(v) != {"ot", "rot"}}
    if bad:
        raise SystemExit(f"error: settings without both field=ot and field=rot: {bad}")
    return {k: (v["ot"], v["rot"]) for k, v in sorted(by.items(), key=lambda kv: _order(kv[0]))}


def _order(key) -> tuple:
    interp, sigma, coupling = key
    return (READINGS.index(coupling) if coupling in READINGS else 9, interp, sigma)


def compare(ot: Job, rot: Job) -> list[dict]:
    """Per bin and overall ("bin" = "overall"): closed form and MC mean +- std of grad_var at both fields,
    and the paired one-sided test of ot < rot (t, p_t, p_wilcoxon, frac_less over the common seeds)."""
    seeds, a, b = paired(ot, rot)
    e = ot.edges()
    ea, eb = ot.exact("grad_var"), rot.exact("grad_var")
    cols = [(k, e[k], e[k + 1], a[:, k], b[:, k], ea[k], eb[k]) for k in range(ot.n_bins)]
    cols.append(("overall", e[0], e[-1], a.sum(1), b.sum(1), ea.sum(), eb.sum()))
    out = []
    for k, lo, hi, va, vb, xa, xb in cols:
        test = one_sided_paired_test(va, vb)
        out.append(
            {
                "bin": k,
                "t_lo": lo,
                "t_hi": hi,
                "ot_exact": xa,
                "rot_exact": xb,
                "ot_mc_mean": va.mean(),
                "ot_mc_std": va.std(ddof=1),
                "rot_mc_mean": vb.mean(),
                "rot_mc_std": vb.std(ddof=1),
                **{key: v for key, v in test.as_dict().items() if key not in ("mean_a", "mean_b")},
                "claim_holds_mc": bool(test.p_t < ALPHA and test.mean_diff < 0),
                "claim_holds_exact": bool(xa < xb),
            }
        )
    return out


def table(groups: dict) -> list[dict]:
    """The CSV rows: every setting x reading x (bin | overall)."""
    rows = []
    for (interp, sigma, coupling), (ot, rot) in groups.items():
        head = {
            "interpolant": interp,
            "sigma": sigma,
            "coupling": coupling,
            "angle": rot.field_angle,
            "coupling_angle": ot.coupling_angle,
            "dim": ot.dim,
        }
        rows += [{**head, **r} for r in compare(ot, rot)]
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per setting and reading the overall numbers; per reading whether the claim holds everywhere (overall
    and in every bin, MC at p < ALPHA)."""
    out = {"alpha": ALPHA, "settings": {}, "readings": {}}
    for r in rows:
        key = f"{r['coupling']}/{r['interpolant']}/sigma={r['sigma']:g}"
        s = out["settings"].setdefault(key, {"bins_claim_holds_mc": 0, "bins_claim_holds_exact": 0, "bins": 0})
        if r["bin"] == "overall":
            s.update(
                {
                    k: r[k]
                    for k in (
                        "ot_exact",
                        "rot_exact",
                        "ot_mc_mean",
                        "ot_mc_std",
                        "rot_mc_mean",
                        "rot_mc_std",
                        "n",
                        "t",
                        "p_t",
                        "p_wilcoxon",
                        "frac_less",
                    )
                }
            )
            s["claim_holds_overall_mc"] = r["claim_holds_mc"]
            s["claim_holds_overall_exact"] = r["claim_holds_exact"]
        else:
            s["bins"] += 1
            s["bins_claim_holds_mc"] += int(r["claim_holds_mc"])
            s["bins_claim_holds_exact"] += int(r["claim_holds_exact"])
    for key, s in out["settings"].items():
        reading = key.split("/")[0]
        every = s["claim_holds_overall_mc"] and s["bins_claim_holds_mc"] == s["bins"]
        s["claim_holds_every_bin_and_overall_mc"] = every
        rd = out["readings"].setdefault(
            reading, {"settings": 0, "overall_holds_mc": 0, "everywhere_holds_mc": 0, "overall_holds_exact": 0}
        )
        rd["settings"] += 1
        rd["overall_holds_mc"] += int(s["claim_holds_overall_mc"])
        rd["overall_holds_exact"] += int(s["claim_holds_overall_exact"])
        rd["everywhere_holds_mc"] += int(every)
    for rd in out["readings"].values():
        rd["reproduces_claim"] = rd["everywhere_holds_mc"] == rd["settings"]
    return out


def plot(groups: dict, rows: list[dict], out: Path) -> Path:
    """One column per (interpolant, sigma); a profile row per coupling reading; a last row of per-bin p-values."""
    settings = list(dict.fromkeys((i, s) for i, s, _ in groups))
    readings = [c for c in READINGS if any(k[2] == c for k in groups)]
    nr, nc = len(readings) + 1, len(settings)
    fig, ax = plt.subplots(nr, nc, figsize=(3.3 * nc + 0.5, 3.0 * nr), squeeze=False)
    for c, (interp, sigma) in enumerate(settings):
        for r, reading in enumerate(readings):
            a = ax[r, c]
            if (interp, sigma, reading) not in groups:
                a.axis("off")
                continue
            ot, rot = groups[(interp, sigma, reading)]
            res = compare(ot, rot)
            t, per = ot.mids(), res[:-1]
            for name, color, off in (("ot", "tab:blue", -0.01), ("rot", "tab:red", 0.01)):
                mean = np.array([x[f"{name}_mc_mean"] for x in per])
                std = np.array([x[f"{name}_mc_std"] for x in per])
                label = "v_OT" if name == "ot" else f"v_rot {rot.field_angle:g}°"
                a.errorbar(
                    t + off, mean, yerr=log_yerr(mean, std), fmt="o", ms=3, capsize=2, color=color, label=f"{label} MC"
                )
                a.plot(t, [x[f"{name}_exact"] for x in per], "-", lw=1, color=color, label=f"{label} closed form")
            o = res[-1]
            a.set_title(
                f"{reading} coupling, {interp} σ={sigma:g}\nΣ: OT {o['ot_mc_mean']:.3g} vs rot "
                f"{o['rot_mc_mean']:.3g}, p={o['p_t']:.2g}",
                fontsize=8,
            )
            a.set(yscale="log", xlabel="t (bin centre)")
            a.grid(alpha=0.3)
            if c == 0:
                a.set_ylabel("grad variance in the bin")
                a.legend(fontsize=6)
        a = ax[-1, c]
        for reading, mark in zip(readings, ("o", "s")):
            per = [
                x
                for x in rows
                if (x["interpolant"], x["sigma"], x["coupling"]) == (interp, sigma, reading) and x["bin"] != "overall"
            ]
            if per:
                p = np.clip([x["p_t"] for x in per], 1e-300, 1)
                a.plot([(x["t_lo"] + x["t_hi"]) / 2 for x in per], p, mark + "-", ms=4, label=f"{reading} coupling")
        a.axhline(ALPHA, color="k", ls="--", lw=0.8, label=f"p = {ALPHA:g}")
        a.set(yscale="log", xlabel="t (bin centre)", title=f"per-bin one-sided p (H1: OT < rot)\n{interp} σ={sigma:g}")
        a.title.set_fontsize(8)
        a.grid(alpha=0.3)
        if c == 0:
            a.set_ylabel("paired t-test p-value")
            a.legend(fontsize=6)
    n = {len(ot.seeds) for ot, _ in groups.values()}
    fig.suptitle(
        f"Fig. 4: gradient variance at v_OT vs the pair-optimal rotated field, d = "
        f"{listed(ot.dim for ot, _ in groups.values())}\nMC mean ± std over {listed(n)} seeds "
        "(markers), closed form (lines); Σ = sum over bins, p: paired one-sided t-test",
        fontsize=10,
    )
    save_figure(fig, out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR FIG_DIR."""
    runs_dir, out = figure_cli(__doc__, argv)
    groups = pairs(load_jobs(runs_dir))
    rows = table(groups)
    print(write_csv(out / "fig4.csv", rows))
    print(write_json(out / "summary.json", jsonable(summarize(rows))))
    print(plot(groups, rows, out / "fig4.png"))


if __name__ == "__main__":
    main()
