"""Fig. 6 (Reu et al. 2025): the 180-degree rotation, pair accuracy against integration and training length.

``python -m flowmatch.plots.fig6 RUNS_DIR FIG_DIR`` reads the run dirs of ``make fig6`` (``.hydra/config.yaml``,
``metrics.json``, ``eval_steps/step=*.json``), groups them by (sigma, N = coupling.n_pairs), takes mean and
spread over seeds (:func:`flowmatch.analysis.stats.mean_spread`) and writes into FIG_DIR:

- ``fig6.png``: (a) pair accuracy against Euler steps (log x), one colour per sigma, solid N = 50 / dashed
  N = 1000, band mean +- 1 s.d., the configured solver (dopri5) as a separate point at the right; (b) L2 of the
  endpoints to the training partner and to the OT map x0 + 5 against Euler steps, one panel per N (the first
  two); (c) pair accuracy with 7 Euler steps and with dopri5 against training steps (eval_steps files and the
  end). The
  coarse-integration window (sigma = min, Euler steps from 1 up to the last count with pair accuracy >= 1/2)
  is shaded in (a) and (b);
- ``fig6.csv``: every number drawn: sigma, N, solver, steps, train_step, metric, mean, std, min, max, n
  (plus the solver's NFE);
- ``summary.json``: per (sigma, N): pair accuracy at 7 and 101 Euler steps and with the solver, L2 to partner and
  to the OT map at 101 steps, pair accuracy against training step, and the window.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from flowmatch.analysis.stats import mean_spread  # noqa: E402
from flowmatch.plots.common import (  # noqa: E402
    euler_series,
    figure_cli,
    find_jobs,
    load_run,
    save_figure,
    sigma_steps_caption,
    write_csv,
    write_json,
)

METRICS = ("pair_acc", "l2_partner", "l2_ot")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
STYLES = ("-", "--", ":", "-.")
KEYS = ("sigma", "N", "solver", "steps", "train_step", "metric")
TRAIN_EULER = 7  # panel (c): pair accuracy with this many Euler steps against training length


def run_records(run: Path) -> list[dict]:
    """The numbers of a run that the figure draws, one record (sigma, N, seed, solver, steps, train_step, metric,
    value) each: from metrics.json (the final weights) every metric of METRICS with Euler (solver "euler", its
    steps) and with the configured solver (its tag, steps None, plus its NFE); from each eval_steps file the
    pair accuracy with TRAIN_EULER Euler steps and with the configured solver."""
    cfg, final = load_run(run)
    evals = [final] + [json.loads(p.read_text()) for p in sorted((run / "eval_steps").glob("step=*.json"))]
    base = {"sigma": float(cfg["interpolant"]["sigma"]), "N": int(cfg["coupling"]["n_pairs"]), "seed": cfg["seed"]}
    out = []
    for m in evals:
        common = {**base, "train_step": int(m["train/global_step"])}
        tag = m.get("protocol/solver", "solver")
        is_final = m is final
        for name in METRICS if is_final else ("pair_acc",):
            for k, v in zip(*euler_series(m, name)):
                if is_final or k == TRAIN_EULER:
                    out.append({**common, "solver": "euler", "steps": k, "metric": name, "value": v})
            if f"eval/{name}" in m:
                out.append({**common, "solver": tag, "steps": None, "metric": name, "value": m[f"eval/{name}"]})
        if is_final and "eval/nfe" in m:
            out.append({**common, "solver": tag, "steps": None, "metric": "nfe", "value": m["eval/nfe"]})
    return out


def aggregate(records: list[dict]) -> list[dict]:
    """Rows of fig6.csv: mean, std, min, max and n over seeds of each (sigma, N, solver, steps, train_step, metric)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in KEYS)].append(r["value"])
    rows = []
    for key, values in sorted(groups.items(), key=lambda kv: tuple((v is None, v) for v in kv[0])):
        s = mean_spread(values)
        rows.append({**dict(zip(KEYS, key)), "mean": s.mean, "std": s.std, "min": s.min, "max": s.max, "n": s.n})
    return rows


def select(rows: list[dict], **where) -> list[dict]:
    """The rows matching every ``key=value`` of ``where``."""
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def window(rows: list[dict], sigma: float, n: int) -> tuple[int, float] | None:
    """The coarse-integration window of (sigma, N) with the final weights: (K, edge), K the last Euler step count
    (consecutively from the coarsest) with mean pair accuracy >= 1/2 and the edge drawn between K and the next
    count (geometric mean); None when the coarsest count is already below 1/2."""
    sel = select(rows, sigma=sigma, N=n, solver="euler", metric="pair_acc", train_step=r_final(rows, sigma, n))
    pts = sorted((r["steps"], r["mean"]) for r in sel)
    last = None
    for i, (_, v) in enumerate(pts):
        if v < 0.5:
            break
        last = i
    if last is None:
        return None
    k = pts[last][0]
    return k, (math.sqrt(k * pts[last + 1][0]) if last + 1 < len(pts) else k * 1.3)


def r_final(rows: list[dict], sigma: float, n: int) -> int:
    """The last training step of the (sigma, N) runs (the metrics.json evaluation)."""
    return max(r["train_step"] for r in select(rows, sigma=sigma, N=n))


def _line(ax, xs, sel, color, ls, marker, label=None):
    """The mean of the rows ``sel`` against ``xs`` as a line, with a band of +- 1 s.d."""
    xs_sorted = sorted(zip(xs, sel), key=lambda p: p[0])
    x = [p[0] for p in xs_sorted]
    m = [p[1]["mean"] for p in xs_sorted]
    s = [p[1]["std"] for p in xs_sorted]
    ax.plot(x, m, color=color, ls=ls, marker=marker, ms=4, label=label)
    ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.15, lw=0)


def plot_vs_euler(ax, rows, metric, groups, style, x_solver, marker="o", solver_marker="D"):
    """``metric`` against Euler steps (final weights) for each (sigma, N) in ``groups``; the solver's points
    around ``x_solver``, dodged sideways so they do not hide each other. ``style(sigma, N) -> (color, ls)``."""
    for i, (sigma, n) in enumerate(groups):
        fin = r_final(rows, sigma, n)
        sel = select(rows, sigma=sigma, N=n, solver="euler", metric=metric, train_step=fin)
        color, ls = style(sigma, n)
        if sel:
            _line(ax, [r["steps"] for r in sel], sel, color, ls, marker)
        x = x_solver * 1.07 ** (i - (len(groups) - 1) / 2)
        for r in select(rows, sigma=sigma, N=n, steps=None, metric=metric, train_step=fin):
            ax.errorbar([x], [r["mean"]], [[r["std"]], [r["std"]]], color=color, marker=solver_marker, ms=4, capsize=2)


def euler_axis(ax, ks, x_solver, tag):
    """Log x axis with the Euler step counts and the solver's tick at the right of a dotted separator."""
    ax.set_xscale("log")
    ax.axvline(math.sqrt(max(ks) * x_solver), color="0.5", ls=":", lw=1)
    ax.set_xticks(list(ks) + [x_solver], [str(k) for k in ks] + [tag])
    ax.minorticks_off()
    ax.set_xlabel("Euler steps (right: adaptive solver)")
    ax.grid(alpha=0.3)


def shade(ax, win, left, text):
    """Shade the window ``win`` = (K, edge) of :func:`window` from ``left``, or say there is none."""
    if win is None:
        ax.text(0.02, 0.02, f"no window ({text}: pair acc < 1/2 at every K)", transform=ax.transAxes, fontsize=7)
        return
    ax.axvspan(left, win[1], color="gold", alpha=0.15, lw=0)
    ax.text(
        left * 1.05,
        0.5,
        f"coarse-integration\nwindow ({text}:\npair acc ≥ 1/2)",
        fontsize=7,
        va="center",
        transform=ax.get_xaxis_transform(),
    )


def plot(rows: list[dict], out: Path) -> None:
    """Draw fig6.png (module docstring) from the aggregated rows."""
    sigmas = sorted({r["sigma"] for r in rows})
    ns = sorted({r["N"] for r in rows})
    groups = [(s, n) for s in sigmas for n in ns if select(rows, sigma=s, N=n)]
    ks = sorted({r["steps"] for r in rows if r["solver"] == "euler"})
    tags = sorted({r["solver"] for r in rows if r["steps"] is None})
    tag = "/".join(tags) or "solver"
    x_solver = max(ks) * 3.0 if ks else 1.0
    left = min(ks) / 1.3 if ks else 0.5

    def style(sigma, n):
        return COLORS[sigmas.index(sigma) % len(COLORS)], STYLES[ns.index(n) % len(STYLES)]

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    s0 = sigmas[0]
    ax = axes[0, 0]
    plot_vs_euler(ax, rows, "pair_acc", groups, style, x_solver)
    euler_axis(ax, ks, x_solver, tag)
    shade(ax, window(rows, s0, ns[0]), left, f"σ={s0:g}, N={ns[0]}")
    ax.set(ylabel="pair accuracy", ylim=(-0.03, 1.03), title="(a) reproduces the training pairing? (final weights)")
    for i, n in enumerate(ns[:2]):
        ax = axes[0, 1 + i]
        sub = [(s, n) for s, m in groups if m == n]
        plot_vs_euler(ax, rows, "l2_partner", sub, lambda s, n: (style(s, n)[0], "-"), x_solver, "o")
        plot_vs_euler(ax, rows, "l2_ot", sub, lambda s, n: (style(s, n)[0], ":"), x_solver, "s", "s")
        euler_axis(ax, ks, x_solver, tag)
        shade(ax, window(rows, s0, n), left, f"σ={s0:g}")
        ax.set(ylabel="mean L2 of the endpoint", title=f"(b) N={n}: to partner (solid) vs to OT map x0+5 (dotted)")
    for j, (solver, steps, name) in enumerate(
        [("euler", TRAIN_EULER, f"{TRAIN_EULER} Euler steps"), (tags[0] if tags else "", None, tag)]
    ):
        ax = axes[1, j]
        for sigma, n in groups:
            sel = select(rows, sigma=sigma, N=n, solver=solver, steps=steps, metric="pair_acc")
            if sel:
                _line(ax, [r["train_step"] for r in sel], sel, *style(sigma, n), "o")
        steps_seen = sorted({r["train_step"] for r in rows})
        ax.set_xscale("log")
        ax.set_xticks(steps_seen, [f"{s / 1000:g}k" if s >= 1000 else str(s) for s in steps_seen])
        ax.minorticks_off()
        ax.set(xlabel="training steps", ylabel="pair accuracy", ylim=(-0.03, 1.03))
        ax.set_title(f"(c) pair accuracy with {name} vs training length", fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[1, 2]
    ax.axis("off")
    if len(ns) < 2:
        axes[0, 2].axis("off")
    handles = [Line2D([], [], color=style(s, ns[0])[0], lw=2, label=f"σ = {s:g}") for s in sigmas]
    handles += [Line2D([], [], color="k", ls=style(s0, n)[1], label=f"N = {n} pairs") for n in ns]
    handles += [Line2D([], [], color="k", marker="D", ls="none", label=f"{tag} (adaptive)")]
    ax.legend(handles=handles, loc="upper left", fontsize=9, title="(a), (c): colour σ, line style N")
    n_seeds = sorted({r["n"] for r in rows})
    ax.text(
        0.0,
        0.02,
        "x0 ~ N(0, I2), x1 = 5 − x0: a fixed set of N pairs whose interpolation lines\n"
        "all cross at t = 1/2. Coarse Euler steps jump over the crossing and land\n"
        "on the memorized partner; fine integration passes through the singular\n"
        "crossing and ends nearer the OT map x0 + 5 (where L2 curves cross).\n"
        f"Lines: mean over seeds (n = {'/'.join(map(str, n_seeds))}); bands and error bars: ± 1 s.d.",
        transform=ax.transAxes,
        fontsize=8.5,
        va="bottom",
    )
    caption = sigma_steps_caption((r["sigma"] for r in rows), (r["train_step"] for r in rows))
    fig.suptitle(
        f"Fig. 6: 180° rotation — memorized pairing only in a coarse-integration window\n({caption})", fontsize=13
    )
    save_figure(fig, out, dpi=120)


def summary(rows: list[dict]) -> dict:
    """Headline numbers per (sigma, N) (mean, std, n over seeds; None where not measured)."""

    def pick(**where):
        sel = select(rows, **where)
        return {k: sel[0][k] for k in ("mean", "std", "n")} if sel else None

    out = {}
    for sigma, n in sorted({(r["sigma"], r["N"]) for r in rows}):
        fin = r_final(rows, sigma, n)
        tags = sorted({r["solver"] for r in select(rows, sigma=sigma, N=n, steps=None)})
        at = {"sigma": sigma, "N": n, "train_step": fin}
        e = dict(at, solver="euler")
        vs_train = {}
        for solver, steps in [("euler", TRAIN_EULER)] + [(t, None) for t in tags]:
            sel = select(rows, sigma=sigma, N=n, solver=solver, steps=steps, metric="pair_acc")
            vs_train[solver + (str(steps) if steps else "")] = [
                {k: r[k] for k in ("train_step", "mean", "std", "n")}
                for r in sorted(sel, key=lambda r: r["train_step"])
            ]
        win = window(rows, sigma, n)
        out[f"sigma={sigma:g},N={n}"] = {
            "sigma": sigma,
            "N": n,
            "final_train_step": fin,
            "pair_acc@euler7": pick(**e, steps=7, metric="pair_acc"),
            "pair_acc@euler101": pick(**e, steps=101, metric="pair_acc"),
            **{f"pair_acc@{t}": pick(**at, solver=t, steps=None, metric="pair_acc") for t in tags},
            **{f"nfe@{t}": pick(**at, solver=t, steps=None, metric="nfe") for t in tags},
            "l2_partner@euler101": pick(**e, steps=101, metric="l2_partner"),
            "l2_ot@euler101": pick(**e, steps=101, metric="l2_ot"),
            "pair_acc_vs_train_step": vs_train,
            "window_last_euler_steps_with_pair_acc_ge_half": win[0] if win else None,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: RUNS_DIR (the sweep of ``make fig6``) -> FIG_DIR/fig6.png, fig6.csv, summary.json."""
    runs_dir, out = figure_cli(__doc__, argv)
    runs = [r for r in find_jobs(runs_dir) if (r / "metrics.json").exists()]
    if not runs:
        raise SystemExit(f"error: no finished runs (metrics.json) under {str(runs_dir)!r}")
    rows = aggregate([rec for r in runs for rec in run_records(r)])
    plot(rows, out / "fig6.png")
    write_csv(out / "fig6.csv", rows)
    write_json(out / "summary.json", {"runs": len(runs), "groups": summary(rows)})
    print(f"flowmatch: fig6 from {len(runs)} runs: {out / 'fig6.png'}, {out / 'fig6.csv'}, {out / 'summary.json'}")


if __name__ == "__main__":
    main()
