"""Item 11 (Reu et al. 2025, "asymmetry in sampling stability"): forward vs backward flows, measured.

``python -m flowmatch.plots.fig_stability RUNS_DIR FIG_DIR`` reads every ``stability.csv`` under RUNS_DIR (written by
``evaluate.py task=stability``, :mod:`flowmatch.stability`; each row tagged with the data set, direction, sigma and
seed of its checkpoint) and the gradient-variance probes (``gradvar.csv``, ``gradvar_integrated.csv``) of the
training runs those checkpoints belong to, and writes into FIG_DIR:

- ``fig-stability.png``, one row per data set: (a) endpoint error against the number of ODE steps (Euler, midpoint,
  RK4 against the dopri5 reference; sigma = 0), forward vs backward; (b) the mean amplification ||dx1|| / ||dx_t||
  of a perturbation injected at time t, per sigma; (c) the per-time-bin gradient variance of the same models at
  their last probe (interpolant and integrated samples; sigma = 0), so (b) and (c) share the t axis;
- ``fig-stability.csv``: every number drawn, long format (data, direction, sigma, measure, method, steps, t,
  metric, mean, std, min, max, n over seeds); ``fig-stability_gradvar.csv``: the variance profiles drawn;
- ``summary.json``: per data set and sigma the criteria fixed in ``conf/experiment/paper/fig-stability.yaml``:
  Euler endpoint error at K = 8 steps and the amplification averaged over the injection times, forward vs
  backward paired by seed, with the verdict "asymmetric" (every seed ordered alike and a ratio of means >= 1.5)
  or "no clear asymmetry"; and, per direction, the t of the largest amplification and of the largest variance.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowmatch.analysis.stats import mean_spread  # noqa: E402
from flowmatch.analysis.verdicts import CRITERION_K, stability_verdicts  # noqa: E402
from flowmatch.plots.common import figure_cli, load_run, read_csv, save_figure, write_csv, write_json  # noqa: E402

DIR_COLORS = {"forward": "tab:purple", "backward": "tab:green"}
METHOD_STYLES = {"euler": "-", "midpoint": "--", "rk4": ":"}
SIGMA_STYLES = {0.0: "-", 0.05: "--"}
GRADVAR_FILES = {"interpolant": "gradvar.csv", "integrated": "gradvar_integrated.csv"}


def load_rows(runs_dir: Path) -> list[dict]:
    """Every row of every stability.csv under ``runs_dir``; exits with one error line when there is none."""
    paths = sorted(Path(runs_dir).rglob("stability.csv"))
    if not paths:
        sys.exit(f"error: no stability.csv under {str(runs_dir)!r}: run the training and stability sweeps first")
    return [r for p in paths for r in read_csv(p)]


def _tag(r: dict) -> tuple:
    return r["data"], r["direction"], float(r["sigma"])


def long_records(rows: list[dict]) -> list[dict]:
    """Per-seed numbers in long format: endpoint_error rows (err_mean, rel_err, nfe per method and steps) and
    sensitivity rows (mean, median, q90 per t)."""
    out = []
    for r in rows:
        base = {"data": r["data"], "direction": r["direction"], "sigma": float(r["sigma"]), "seed": int(r["seed"])}
        if r["measure"] == "endpoint_error":
            for m in ("err_mean", "rel_err", "nfe"):
                out.append(
                    {
                        **base,
                        "measure": r["measure"],
                        "method": r["method"],
                        "steps": int(r["steps"]),
                        "t": None,
                        "metric": m,
                        "value": float(r[m]),
                    }
                )
        elif r["measure"] == "sensitivity":
            for m in ("mean", "median", "q90"):
                out.append(
                    {
                        **base,
                        "measure": r["measure"],
                        "method": "dopri5",
                        "steps": None,
                        "t": float(r["t"]),
                        "metric": m,
                        "value": float(r[m]),
                    }
                )
        elif r["measure"] == "reference":
            out.append(
                {
                    **base,
                    "measure": "reference",
                    "method": "dopri5",
                    "steps": None,
                    "t": None,
                    "metric": "gap_mean",
                    "value": float(r["gap_mean"]),
                }
            )
    return out


AGG_KEYS = ("data", "direction", "sigma", "measure", "method", "steps", "t", "metric")


def aggregate(records: list[dict]) -> list[dict]:
    """Mean, std, min, max, n over seeds per AGG_KEYS (rows of fig-stability.csv)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in AGG_KEYS)].append(r["value"])
    rows = []
    for key, values in sorted(groups.items(), key=lambda kv: tuple((v is None, v) for v in kv[0])):
        s = mean_spread(values)
        rows.append({**dict(zip(AGG_KEYS, key)), "mean": s.mean, "std": s.std, "min": s.min, "max": s.max, "n": s.n})
    return rows


def gradvar_profiles(rows: list[dict]) -> list[dict]:
    """The last-probe variance profile of each training run behind a stability.csv (run dir = ckpt_path/../..),
    averaged over seeds per (data, direction, sigma, source, bin)."""
    runs = {}
    for r in rows:
        runs[Path(str(r["ckpt_path"])).parent.parent] = (_tag(r), int(r["seed"]))
    per: dict[tuple, list[float]] = defaultdict(list)
    edges: dict[tuple, tuple[float, float]] = {}
    for run, (tag, _) in sorted(runs.items()):
        for source, name in GRADVAR_FILES.items():
            if not (run / name).exists():
                continue
            probe = read_csv(run / name)
            last = max(p["step"] for p in probe)
            for p in probe:
                if p["step"] == last:
                    key = (*tag, source, float(p["t_lo"]))
                    per[key].append(float(p["grad_var"]))
                    edges[key] = (float(p["t_lo"]), float(p["t_hi"]))
    out = []
    for key, values in sorted(per.items()):
        s = mean_spread(values)
        data, direction, sigma, source, _ = key
        t_lo, t_hi = edges[key]
        out.append(
            {
                "data": data,
                "direction": direction,
                "sigma": sigma,
                "source": source,
                "t_lo": t_lo,
                "t_hi": t_hi,
                "mean": s.mean,
                "std": s.std,
                "n": s.n,
            }
        )
    return out


def _select(rows, **where):
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def trained_steps(rows: list[dict]) -> str:
    """'after N steps' (or 'after A/B steps'): the training steps of the checkpoints behind a stability.csv."""
    runs = {Path(str(r["ckpt_path"])).parent.parent for r in rows}
    done = [run for run in runs if (run / "metrics.json").exists()]
    steps = sorted({int(load_run(run)[1].get("train/global_step", -1)) for run in done})
    return f"after {'/'.join(map(str, steps))} steps" if steps else "steps unknown"


def plot(agg: list[dict], profiles: list[dict], summary: dict, out: Path, caption: str = "") -> None:
    """Draw fig-stability.png (module docstring); ``caption`` (the checkpoints' training steps) ends the title."""
    datasets = sorted({r["data"] for r in agg}, key=lambda d: d != "gmm")
    fig, axes = plt.subplots(len(datasets), 3, figsize=(17, 4.8 * len(datasets) + 1.2), squeeze=False)
    for row, data in enumerate(datasets):
        sigmas = sorted({r["sigma"] for r in agg if r["data"] == data})
        s0 = sigmas[0]
        ax = axes[row, 0]
        for d in ("forward", "backward"):
            for method, ls in METHOD_STYLES.items():
                sel = sorted(
                    _select(
                        agg,
                        data=data,
                        direction=d,
                        sigma=s0,
                        measure="endpoint_error",
                        method=method,
                        metric="err_mean",
                    ),
                    key=lambda r: r["steps"],
                )
                if sel:
                    x = [r["steps"] for r in sel]
                    ax.plot(
                        x,
                        [r["mean"] for r in sel],
                        color=DIR_COLORS[d],
                        ls=ls,
                        marker="o",
                        ms=3,
                        label=f"{d}, {method}",
                    )
                    ax.fill_between(
                        x, [r["min"] for r in sel], [r["max"] for r in sel], color=DIR_COLORS[d], alpha=0.1, lw=0
                    )
        gap = _select(agg, data=data, sigma=s0, measure="reference", metric="gap_mean")
        if gap:
            ax.axhline(
                max(r["mean"] for r in gap),
                color="0.5",
                ls=":",
                lw=1,
                label="reference vs dopri5 at 100x its tolerance",
            )
        steps = sorted({r["steps"] for r in agg if r["data"] == data and r["measure"] == "endpoint_error"})
        ax.set(xscale="log", yscale="log", xlabel="ODE steps", ylabel="mean ||x̂1 − x̂1_ref||")
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.minorticks_off()
        ax.set_title(f"{data} (σ = {s0:g}): endpoint error vs steps (band: min–max over seeds)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[row, 1]
        for d in ("forward", "backward"):
            for sigma in sigmas:
                sel = sorted(
                    _select(agg, data=data, direction=d, sigma=sigma, measure="sensitivity", metric="mean"),
                    key=lambda r: r["t"],
                )
                if sel:
                    x = [r["t"] for r in sel]
                    ax.plot(
                        x,
                        [r["mean"] for r in sel],
                        color=DIR_COLORS[d],
                        ls=SIGMA_STYLES.get(sigma, "-."),
                        marker="o",
                        ms=3,
                        label=f"{d}, σ = {sigma:g}",
                    )
                    ax.fill_between(
                        x, [r["min"] for r in sel], [r["max"] for r in sel], color=DIR_COLORS[d], alpha=0.1, lw=0
                    )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(yscale="log", xlabel="t of injection", ylabel="mean ||Δx̂1|| / ||Δx_t||", xlim=(-0.02, 1))
        ax.set_title(
            f"{data}: amplification of a perturbation injected at t (mean over directions, sources)", fontsize=10
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax = axes[row, 2]
        for d in ("forward", "backward"):
            for source, ls in (("interpolant", "-"), ("integrated", "--")):
                sel = sorted(
                    _select(profiles, data=data, direction=d, sigma=s0, source=source), key=lambda r: r["t_lo"]
                )
                if sel:
                    x = [(r["t_lo"] + r["t_hi"]) / 2 for r in sel]
                    ax.plot(
                        x,
                        [r["mean"] for r in sel],
                        color=DIR_COLORS[d],
                        ls=ls,
                        marker="o",
                        ms=3,
                        label=f"{d}, {source} samples",
                    )
        ax.set(yscale="log", xlabel="t (bin centre)", ylabel="gradient variance (trace)", xlim=(-0.02, 1))
        ax.set_title(f"{data} (σ = {s0:g}): gradient variance of the same models (last probe)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    lines = []
    for key, v in summary.items():
        for crit in (f"euler{CRITERION_K}_endpoint_error", "mean_amplification_over_t"):
            c = v[crit]
            if c:
                lines.append(
                    f"{key}  {crit}: forward/backward = {c['ratio_forward_over_backward']:.3g} → {c['verdict']}"
                )
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=8, family="monospace", va="bottom")
    fig.suptitle(
        "Item 11: sampling stability of forward (noise→data) vs backward (data→noise) flows,\n"
        f"next to the gradient variance of the same models; checkpoints {caption or 'of unknown step'}",
        fontsize=12,
    )
    save_figure(fig, out, rect=(0, 0.012 * (len(lines) + 1), 1, 0.96))


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR (``make fig-stability``) -> FIG_DIR/fig-stability.png, CSVs, summary.json."""
    runs_dir, out = figure_cli(__doc__, argv)
    rows = load_rows(runs_dir)
    records = long_records(rows)
    agg, profiles = aggregate(records), gradvar_profiles(rows)
    summary = stability_verdicts(records, profiles)
    write_csv(out / "fig-stability.csv", agg)
    if profiles:
        write_csv(out / "fig-stability_gradvar.csv", profiles)
    write_json(out / "summary.json", {"checkpoints": len({r["ckpt_path"] for r in rows}), "criteria": summary})
    plot(agg, profiles, summary, out / "fig-stability.png", trained_steps(rows))
    print(f"flowmatch: fig-stability from {len(rows)} rows: {out / 'fig-stability.png'}, CSVs, summary.json")


if __name__ == "__main__":
    main()
