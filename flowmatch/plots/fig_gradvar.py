"""Item 10 (Reu et al. 2025): per-time-bin gradient variance of forward and backward fields, sigma in {0, 0.05}.

``python -m flowmatch.plots.fig_gradvar RUNS_DIR FIG_DIR`` reads the runs of ``make fig-gradvar`` (config: direction,
interpolant.sigma, seed; ``gradvar.csv``: the interpolant probe; ``gradvar_integrated.csv``: the integrated probe)
and writes into FIG_DIR:

- ``fig-gradvar.png``: (rows 1-2) the variance profile over the time bins at the last probe, interpolant and
  integrated samples, forward and backward, mean over seeds with a band of +- 1 s.d., one colour per sigma, the
  expected peak region shaded; (row 3) the tilt log10(V_end / V_start) against training step, V_end the mean
  variance of the two bins nearest t = 1 and V_start of the two nearest t = 0 (> 0: peak towards t = 1);
  (column 3) the integrated-probe variance summed over bins against training step, per direction and sigma;
- ``fig-gradvar.csv``: every number drawn: direction, sigma, source, step, bin, t_lo, t_hi and the mean, std,
  min, max, n over seeds of grad_var and the mean loss; ``fig-gradvar_seeds.csv``: the per-seed rows;
- ``summary.json``: the verdicts of the criteria fixed in ``conf/experiment/paper/fig-gradvar.yaml``:
  ``peaks``: per direction, sigma and source the argmax bin of the seed-mean profile at the last probe and each
  seed's, the expected end, and the one-sided paired test V_start < V_end (forward) / V_end < V_start (backward);
  ``sigma``: per direction and source the per-seed variance summed over bins, averaged over the probes of the
  second half of training, sigma = 0.05 vs sigma = 0 (one-sided paired test, H1: sigma = 0.05 lower).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.analysis.stats import mean_spread  # noqa: E402
from flowmatch.analysis.verdicts import (  # noqa: E402
    END_BINS,
    EXPECTED_END,
    last_step,
    peak_verdicts,
    profiles,
    settings,
    sigma_verdicts,
    tilt,
)
from flowmatch.plots.common import (  # noqa: E402
    figure_cli,
    find_jobs,
    load_config,
    read_csv,
    save_figure,
    sigma_steps_caption,
    write_csv,
    write_json,
)

SOURCES = {"interpolant": "gradvar.csv", "integrated": "gradvar_integrated.csv"}
COLORS = {0.0: "tab:red", 0.05: "tab:blue"}
STYLES = {"interpolant": "-", "integrated": "--"}


def run_records(run: Path) -> list[dict]:
    """One record per (source, probe step, bin) of a run: direction, sigma, seed, source, step, bin, t_lo, t_hi,
    grad_var, loss. A run without a probe file contributes nothing for that source (a warning is printed)."""
    cfg = load_config(run)
    base = {
        "direction": cfg["direction"]["name"],
        "sigma": float(cfg["interpolant"].get("sigma", 0.0)),
        "seed": int(cfg["seed"]),
    }
    out = []
    for source, name in SOURCES.items():
        path = run / name
        if not path.exists():
            print(f"warning: {run} has no {name}: skipped", file=sys.stderr)
            continue
        rows = read_csv(path)
        lows = sorted({r["t_lo"] for r in rows})
        for r in rows:
            out.append(
                {
                    **base,
                    "source": source,
                    "step": int(r["step"]),
                    "bin": lows.index(r["t_lo"]),
                    "t_lo": float(r["t_lo"]),
                    "t_hi": float(r["t_hi"]),
                    "grad_var": float(r["grad_var"]),
                    "loss": float(r["loss"]),
                }
            )
    return out


KEYS = ("direction", "sigma", "source", "step", "bin")


def aggregate(records: list[dict]) -> list[dict]:
    """Rows of fig-gradvar.csv: mean, std, min, max, n over seeds of grad_var (and the mean loss) per KEYS."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in KEYS)].append(r)
    rows = []
    for key, rs in sorted(groups.items()):
        s = mean_spread([r["grad_var"] for r in rs])
        rows.append(
            {
                **dict(zip(KEYS, key)),
                "t_lo": rs[0]["t_lo"],
                "t_hi": rs[0]["t_hi"],
                "grad_var_mean": s.mean,
                "grad_var_std": s.std,
                "grad_var_min": s.min,
                "grad_var_max": s.max,
                "n": s.n,
                "loss_mean": float(np.mean([r["loss"] for r in rs])),
            }
        )
    return rows


def _band(ax, x, per_seed: dict, color, ls, label):
    vals = np.array(list(per_seed.values()))
    m, s = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(vals.shape[1])
    ax.plot(x, m, color=color, ls=ls, marker="o", ms=3, label=label)
    ax.fill_between(x, np.maximum(m - s, m * 1e-3), m + s, color=color, alpha=0.15, lw=0)


def plot(records: list[dict], peaks: dict, sigmas_v: dict, out: Path) -> None:
    """Draw fig-gradvar.png (module docstring)."""
    sigmas = sorted({r["sigma"] for r in records})
    fig, axes = plt.subplots(3, 3, figsize=(17, 12.5))
    for row, source in enumerate(SOURCES):
        for col, direction in enumerate(["forward", "backward"]):
            ax = axes[row, col]
            for sigma in sigmas:
                if (direction, sigma, source) not in settings(records):
                    continue
                step = last_step(records, direction, sigma, source)
                per_seed = profiles(records, direction, sigma, source, step)
                k = len(next(iter(per_seed.values())))
                x = (np.arange(k) + 0.5) / k
                label = f"σ = {sigma:g} (n = {len(per_seed)} seeds)"
                _band(ax, x, per_seed, COLORS.get(sigma, "tab:green"), STYLES[source], label)
                ax.axvspan(
                    *((1 - END_BINS / k, 1) if direction == "forward" else (0, END_BINS / k)),
                    color="gold",
                    alpha=0.12,
                    lw=0,
                )
            ax.set_yscale("log")
            ax.set(xlabel="t (bin centre)", ylabel="gradient variance (trace)", xlim=(0, 1))
            ax.set_title(
                f"{direction}: {source} samples, last probe\n(shaded: expected peak near {EXPECTED_END[direction]})",
                fontsize=10,
            )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    for col, direction in enumerate(["forward", "backward"]):
        ax = axes[2, col]
        for sigma in sigmas:
            for source in SOURCES:
                steps = sorted(
                    {
                        r["step"]
                        for r in records
                        if (r["direction"], r["sigma"], r["source"]) == (direction, sigma, source)
                    }
                )
                if not steps:
                    continue
                tilts = []
                for st in steps:
                    per = profiles(records, direction, sigma, source, st)
                    tilts.append([tilt(p) for p in per.values()])
                m = [np.nanmean(t) if np.isfinite(t).any() else np.nan for t in tilts]
                ax.plot(
                    steps,
                    m,
                    color=COLORS.get(sigma, "tab:green"),
                    ls=STYLES[source],
                    marker="o",
                    ms=3,
                    label=f"σ = {sigma:g}, {source}",
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="training step", ylabel="log10(V near t=1 / V near t=0)")
        ax.set_title(f"{direction}: where the variance sits over training (> 0: towards t = 1)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for row, direction in enumerate(["forward", "backward"]):
        ax = axes[row, 2]
        for sigma in sigmas:
            rs = [r for r in records if (r["direction"], r["sigma"], r["source"]) == (direction, sigma, "integrated")]
            if not rs:
                continue
            totals: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
            for r in rs:
                totals[r["step"]][r["seed"]] += r["grad_var"]
            steps = sorted(totals)
            vals = [list(totals[s].values()) for s in steps]
            m = np.array([np.mean(v) for v in vals])
            lo, hi = np.array([min(v) for v in vals]), np.array([max(v) for v in vals])
            color = COLORS.get(sigma, "tab:green")
            ax.plot(steps, m, color=color, marker="o", ms=3, label=f"σ = {sigma:g} (mean; band min-max over seeds)")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel="Σ over bins of gradient variance")
        ax.set_title(
            f"{direction}: integrated samples, summed over bins\n(paper: σ = 0.05 lower than σ = 0)", fontsize=10
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax = axes[2, 2]
    ax.axis("off")
    lines = ["Verdicts (criteria fixed in conf/experiment/paper/fig-gradvar.yaml)", ""]
    for key, v in peaks.items():
        if v["source"] == "interpolant":
            lines.append(f"peak {key}: argmax bin {v['argmax_bin_of_mean']} → {v['verdict']}")
    for key, v in sigmas_v.items():
        if v["source"] == "integrated":
            p = v["paired_test_sigma0.05_below_sigma0"]
            ptxt = f", p = {p['p_t']:.3g}" if p else ""
            lines.append(f"σ {key}: 0.05 vs 0{ptxt} → {v['verdict']}")
    ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=9, family="monospace")
    fig.suptitle(
        "Item 10: per-time-bin gradient variance of forward (noise→data) and backward (data→noise) fields on digits\n"
        "(expected: forward peaks near t = 1, backward near t = 0; σ = 0.05 lower than σ = 0 on integrated samples); "
        f"{sigma_steps_caption(sigmas, [max(r['step'] for r in records)])}",
        fontsize=12,
    )
    save_figure(fig, out, rect=(0, 0, 1, 0.95))


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR (the sweep of ``make fig-gradvar``) -> FIG_DIR/fig-gradvar.png, CSVs, summary.json."""
    runs_dir, out = figure_cli(__doc__, argv)
    records = [rec for run in find_jobs(runs_dir) for rec in run_records(run)]
    if not records:
        sys.exit(f"error: no gradvar.csv / gradvar_integrated.csv under {str(runs_dir)!r}: run the sweep first")
    peaks, sig = peak_verdicts(records), sigma_verdicts(records)
    write_csv(out / "fig-gradvar.csv", aggregate(records))
    write_csv(out / "fig-gradvar_seeds.csv", records)
    write_json(
        out / "summary.json",
        {"runs": len({(r["direction"], r["sigma"], r["seed"]) for r in records}), "peaks": peaks, "sigma": sig},
    )
    plot(records, peaks, sig, out / "fig-gradvar.png")
    print(f"flowmatch: fig-gradvar from {len(records)} rows: {out / 'fig-gradvar.png'}, CSVs, summary.json")


if __name__ == "__main__":
    main()
