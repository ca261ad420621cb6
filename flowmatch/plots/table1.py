"""Table 1: memorization and generalization MMD on the Gaussian mixture, sigma = 0 vs 0.05, d = 3 and 50.

``python -m flowmatch.plots.table1 RUNS_DIR FIG_DIR`` reads the runs of ``make table1`` and writes

- ``table1.csv``: per (sigma, d) the mean and std over seeds of ``eval/mmd_mem`` (endpoints of the training
  sources vs their partners) and ``eval/mmd_gen`` (endpoints of fresh sources vs fresh targets), the number of
  seeds and the paper's values;
- ``table1.md``: the table laid out like the paper's (rows: sigma; columns: memorization and generalization MMD
  at d = 3 and 50), ours +- std next to the paper's number;
- ``table1.png``: bars of both MMDs with seed-std error bars (symmetric-log axis: an unbiased MMD^2 estimate can
  be slightly negative) and the paper's values as markers;
- ``summary.json``: the numbers and, per d, the orderings the paper reports (memorization MMD lower at
  sigma = 0; generalization MMD at sigma = 0.05 lower or equal), each a comparison of means with whether the
  difference exceeds the seed spread and a one-sided paired test over seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flowmatch.analysis.stats import mean_spread, one_sided_paired_test  # noqa: E402
from flowmatch.plots.common import figure_cli, find_jobs, load_run, runs_caption, save_figure, write_csv, write_json  # noqa: E402

# The paper's Table 1: (sigma, d) -> (memorization MMD, generalization MMD).
PAPER = {
    (0.0, 3): (1.8e-6, 0.0034),
    (0.0, 50): (9.1e-6, 0.0021),
    (0.05, 3): (3.1e-5, 0.0018),
    (0.05, 50): (6.1e-5, 0.0020),
}
METRICS = {"mem": "eval/mmd_mem", "gen": "eval/mmd_gen"}


def collect(runs_dir: str) -> dict[tuple[float, int], dict[int, dict[str, float]]]:
    """{(sigma, d): {seed: {"mem": eval/mmd_mem, "gen": eval/mmd_gen}}} of the finished runs under ``runs_dir``
    (a run without metrics.json is reported on stderr and skipped)."""
    out: dict = {}
    for job in find_jobs(runs_dir):
        if not (job / "metrics.json").exists():
            print(f"warning: {job} has no metrics.json (failed or unfinished run): skipped", file=sys.stderr)
            continue
        cfg, m = load_run(job)
        key = (float(cfg["interpolant"]["sigma"]), int(cfg["data"]["dim"]))
        out.setdefault(key, {})[int(cfg["seed"])] = {name: float(m[k]) for name, k in METRICS.items()}
    return out


def table_rows(runs: dict) -> list[dict]:
    """One row per (sigma, d): mean, std (ddof 1), min, max over seeds of both MMDs, the seeds, the paper's values."""
    rows = []
    for sigma, d in sorted(runs):
        seeds = runs[(sigma, d)]
        row = {"setting": f"sigma = {sigma:g}", "sigma": sigma, "d": d, "n_seeds": len(seeds)}
        for name in METRICS:
            s = mean_spread([v[name] for v in seeds.values()])
            row.update({f"{name}_mean": s.mean, f"{name}_std": s.std, f"{name}_min": s.min, f"{name}_max": s.max})
        paper = PAPER.get((sigma, d), (float("nan"), float("nan")))
        row.update({"paper_mem": paper[0], "paper_gen": paper[1], "seeds": " ".join(map(str, sorted(seeds)))})
        rows.append(row)
    return rows


def ordering(runs: dict, d: int, name: str, low: float, high: float, strict: bool) -> dict | None:
    """Is the mean of ``name`` at sigma = ``low`` below (``strict``) or at most that at sigma = ``high``, for
    dimension ``d``? With the difference of means, whether |difference| exceeds the sum of the two seed stds,
    and a one-sided paired test over the seeds both settings share (n >= 2). None when a setting is missing."""
    a, b = runs.get((low, d)), runs.get((high, d))
    if not a or not b:
        return None
    sa, sb = (mean_spread([v[name] for v in x.values()]) for x in (a, b))
    diff = sa.mean - sb.mean
    out = {
        "holds": bool(diff < 0 if strict else diff <= 0),
        "mean_low_sigma": sa.mean,
        "mean_high_sigma": sb.mean,
        "difference": diff,
        "exceeds_seed_spread": bool(abs(diff) > sa.std + sb.std),
    }
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        test = one_sided_paired_test([a[s][name] for s in shared], [b[s][name] for s in shared])
        out.update({"paired_seeds": len(shared), "p_t_one_sided": test.p_t, "frac_pairs_holding": test.frac_less})
    return out


def verdicts(runs: dict) -> dict:
    """Per d: ``mem_sigma0_below_sigma0.05`` and ``gen_sigma0.05_at_most_sigma0`` (:func:`ordering`)."""
    out = {}
    for d in sorted({d for _, d in runs}):
        out[f"d={d}"] = {
            "mem_sigma0_below_sigma0.05": ordering(runs, d, "mem", 0.0, 0.05, strict=True),
            "gen_sigma0.05_at_most_sigma0": ordering(runs, d, "gen", 0.05, 0.0, strict=False),
        }
    return out


def _fmt(x: float) -> str:
    return f"{x:.2g}" if abs(x) < 1e-3 and x != 0 else f"{x:.4f}"


def markdown(rows: list[dict]) -> str:
    """The paper's layout: a row per sigma, columns memorization MMD and generalization MMD at each d."""
    dims = sorted({r["d"] for r in rows})
    cols = [(name, d) for name in METRICS for d in dims]
    head = {"mem": "Mem. MMD", "gen": "Gen. MMD"}
    lines = [
        "| setting | " + " | ".join(f"{head[n]} (d = {d})" for n, d in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for sigma in sorted({r["sigma"] for r in rows}):
        cells = []
        for name, d in cols:
            r = next((r for r in rows if r["sigma"] == sigma and r["d"] == d), None)
            if r is None:
                cells.append("–")
                continue
            paper = r[f"paper_{name}"]
            ours = f"{_fmt(r[f'{name}_mean'])} ± {_fmt(r[f'{name}_std'])}"
            cells.append(ours + (f" (paper {_fmt(paper)})" if np.isfinite(paper) else ""))
        lines.append(f"| σ = {sigma:g} | " + " | ".join(cells) + " |")
    n = sorted({r["n_seeds"] for r in rows})
    lines += [
        "",
        f"Ours: mean ± std (ddof 1) over {'/'.join(map(str, n))} seed(s); MMD² (unbiased, RBF mixture, median "
        "bandwidth). Mem.: endpoints of the training sources vs their partners; Gen.: endpoints of fresh sources "
        "vs fresh targets. Both are two-sample statistics: they do not see the pairing, and the unbiased estimate "
        "is negative, about -2(1 - mean kernel)/n, when the endpoints equal the training targets exactly. "
        "Paper: Reu et al. 2025, Table 1.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path, caption: str = "") -> None:
    """Bars of both MMDs per d and sigma with seed-std error bars, the paper's values as markers (PNG ``out``);
    ``caption`` (σ and the training steps) ends the title."""
    dims = sorted({r["d"] for r in rows})
    sigmas = sorted({r["sigma"] for r in rows})
    colors = dict(zip(sigmas, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(sigmas)
    for ax, (name, title) in zip(axes, (("mem", "memorization MMD²"), ("gen", "generalization MMD²"))):
        for j, sigma in enumerate(sigmas):
            sel = [next((r for r in rows if r["sigma"] == sigma and r["d"] == d), None) for d in dims]
            x = np.arange(len(dims)) + (j - (len(sigmas) - 1) / 2) * width
            mean = [r[f"{name}_mean"] if r else np.nan for r in sel]
            std = [r[f"{name}_std"] if r else np.nan for r in sel]
            ax.bar(
                x, mean, width * 0.9, yerr=std, capsize=3, color=colors[sigma], alpha=0.8, label=f"ours σ = {sigma:g}"
            )
            paper = [r[f"paper_{name}"] if r else np.nan for r in sel]
            ax.scatter(x, paper, marker="D", s=36, color="k", zorder=3, label="paper" if j == 0 else None)
        values = [abs(r[f"{name}_{k}"]) for r in rows for k in ("mean", "std")] + [
            abs(r[f"paper_{name}"]) for r in rows
        ]
        positive = [v for v in values if np.isfinite(v) and v > 0]
        ax.set_yscale("symlog", linthresh=min(positive) / 10 if positive else 1e-7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(np.arange(len(dims)), [f"d = {d}" for d in dims])
        ax.set(xlabel="data dimension d", ylabel=f"{title} (symlog)", title=f"{title}: mean ± std over seeds")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(
        "Table 1: Gaussian mixture, fixed pairs (paper: σ = 0 lower mem. MMD², σ = 0.05 lower or equal gen. MMD²)"
        + (f"\n{caption}" if caption else "")
    )
    save_figure(fig, out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Command line: table1.csv, table1.md, table1.png and summary.json of a ``make table1`` runs directory."""
    runs_dir, out = figure_cli(__doc__, argv)
    runs = collect(runs_dir)
    if not runs:
        sys.exit(f"error: no finished runs (with metrics.json) under {str(runs_dir)!r}")
    rows = table_rows(runs)
    write_csv(out / "table1.csv", rows)
    (out / "table1.md").write_text(markdown(rows))
    per_seed = {f"sigma={s:g},d={d}": {str(k): v for k, v in seeds.items()} for (s, d), seeds in sorted(runs.items())}
    write_json(out / "summary.json", {"rows": rows, "per_seed": per_seed, "orderings": verdicts(runs)})
    jobs = [j for j in find_jobs(runs_dir) if (j / "metrics.json").exists()]
    plot(rows, out / "table1.png", runs_caption(load_run(j) for j in jobs))
    print(f"flowmatch: table1 CSV, markdown, figure and summary in {out}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
