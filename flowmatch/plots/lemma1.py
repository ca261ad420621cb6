"""Figure of Lemma 1 (``make lemma1``): ``python -m flowmatch.plots.lemma1 RUNS_DIR FIG_DIR``.

Reads the ``evaluate.py task=lemma1`` jobs under RUNS_DIR (their ``lemma1_integration.csv`` and ``lemma1_fit.csv``)
and writes into FIG_DIR:

* ``lemma1.png``: the held-out relative error E||f - v_OT||^2 / E||v_OT||^2 of the fitted MLP against its width
  (log-log, one line per d; gaussian_affine dashed), the endpoint error of the fitted fields, and a table of the
  dopri5 errors through the closed-form fields;
* ``lemma1_integration.csv``, ``lemma1_fit.csv``: every number of the figure (the jobs' rows together);
* ``summary.json``: max integration error per d and field, fit error per width per d, the smallest MLP fit error
  and the affine fit error per d.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowmatch.plots.common import figure_cli, find_jobs, read_csv, save_figure, write_csv, write_json  # noqa: E402


def collect(runs_dir: Path) -> tuple[list[dict], list[dict]]:
    """(integration rows, fit rows) of every job under ``runs_dir``, sorted by d."""
    integ, fit = [], []
    for job in find_jobs(runs_dir):
        if not (job / "lemma1_fit.csv").exists():
            sys.exit(f"error: {str(job)!r} has no lemma1_fit.csv: was it run with experiment=paper/lemma1?")
        integ += read_csv(job / "lemma1_integration.csv")
        fit += read_csv(job / "lemma1_fit.csv")
    integ.sort(key=lambda r: (r["dim"], r["field"]))
    fit.sort(key=lambda r: (r["dim"], r["model"] != "mlp", r["width"] if r["model"] == "mlp" else 0))
    return integ, fit


def summarize(integ: list[dict], fit: list[dict]) -> dict:
    """Headline numbers, keyed ``d=<dim>``."""
    out = {"integration_err_max": {}, "fit_rel_err": {}, "fit_endpoint_err_mean": {}, "mlp_best": {}, "affine": {}}
    for r in integ:
        out["integration_err_max"].setdefault(f"d={r['dim']}", {})[r["field"]] = r["err_max"]
    for d in sorted({r["dim"] for r in fit}):
        key = f"d={d}"
        mlp = [r for r in fit if r["dim"] == d and r["model"] == "mlp"]
        out["fit_rel_err"][key] = {str(r["width"]): r["rel_err"] for r in mlp}
        out["fit_endpoint_err_mean"][key] = {str(r["width"]): r["endpoint_err_mean"] for r in mlp}
        best = min(mlp, key=lambda r: r["rel_err"])
        out["mlp_best"][key] = {"width": best["width"], "rel_err": best["rel_err"]}
        for r in fit:
            if r["dim"] == d and r["model"] == "gaussian_affine":
                out["affine"][key] = {"rel_err": r["rel_err"], "endpoint_err_mean": r["endpoint_err_mean"]}
    return out


def _fit_panel(ax, fit: list[dict], column: str, ylabel: str, title: str) -> None:
    """``column`` of the MLP rows against width (one line per d) and the affine value as a dashed line."""
    for i, d in enumerate(sorted({r["dim"] for r in fit})):
        color = f"C{i}"
        mlp = [r for r in fit if r["dim"] == d and r["model"] == "mlp"]
        ax.plot([r["width"] for r in mlp], [r[column] for r in mlp], "o-", color=color, label=f"MLP, d={d}")
        for r in fit:
            if r["dim"] == d and r["model"] == "gaussian_affine" and r[column] > 0:
                ax.axhline(r[column], color=color, ls="--", lw=1, label=f"gaussian_affine, d={d}")
    ax.set_xscale("log", base=2)
    widths = sorted({r["width"] for r in fit if r["model"] == "mlp"})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("MLP width (hidden units per layer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _table_panel(ax, integ: list[dict]) -> None:
    """The dopri5 errors through the closed-form fields as a table."""
    ax.axis("off")
    cells = [
        [
            str(r["dim"]),
            "OT" if r["field"] == "ot" else f"rot {r['angle']:g}°",
            f"{r['err_mean']:.2e}",
            f"{r['err_max']:.2e}",
            str(r["nfe"]) if r["status"] == "ok" else r["status"],
        ]
        for r in integ
    ]
    table = ax.table(cellText=cells, colLabels=["d", "field", "mean err", "max err", "NFE"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    n = int(integ[0]["n"]) if integ else 0
    ax.set_title(f"dopri5 through the closed-form field:\n||x̂1 − partner|| over {n} sources (float64)", fontsize=10)


def plot(integ: list[dict], fit: list[dict], out: Path) -> Path:
    """The three panels of ``lemma1.png``."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    steps = fit[0]["steps"] if fit else 0
    _fit_panel(axes[0], fit, "rel_err", "E||f − v_OT||² / E||v_OT||² (held out)", f"fit error vs width ({steps} steps)")
    _fit_panel(axes[1], fit, "endpoint_err_mean", "mean ||x̂1 − T_OT(x0)||", "endpoint error through the fitted field")
    _table_panel(axes[2], integ)
    fig.suptitle(
        "Lemma 1, N(0, I) → N(μ, M): MLP and gaussian_affine fitted to v_OT (left, middle); "
        "dopri5 through the closed-form fields (right)"
    )
    save_figure(fig, out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> None:
    runs, figs = figure_cli(__doc__, argv)
    integ, fit = collect(runs)
    written = [
        plot(integ, fit, figs / "lemma1.png"),
        write_csv(figs / "lemma1_integration.csv", integ),
        write_csv(figs / "lemma1_fit.csv", fit),
        write_json(figs / "summary.json", summarize(integ, fit)),
    ]
    nan = [f"d={r['dim']} {r['field']}" for r in integ if not math.isfinite(r["err_max"])]
    if nan:
        print(f"flowmatch: singular closed-form field(s): {', '.join(nan)}")
    print("flowmatch: wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
