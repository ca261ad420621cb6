"""Table 2 (Reu et al. 2025): the adversarial shuffled-OT coupling, memorization against generalization.

``python -m flowmatch.plots.table2 RUNS_DIR FIG_DIR`` reads the runs of ``make table2`` (coupling=shuffled_ot on
digits, N = coupling.n_pairs in {300, 1500}, sigma in {0, 0.05}) and writes

- ``table2.png``: per N, the L2 from the endpoint of each training source to its shuffled training partner
  (memorization) and to its OT partner (generalization), mean +- std over the N sources, per sigma; below, the
  final pair grid of each run (source -> endpoint -> shuffled partner -> OT partner);
- ``table2.csv``: one row per run with every number (L2 means and stds, pair accuracy, eval/mem_rate, MMDs,
  losses);
- ``summary.json``: per N and sigma those numbers, the paper's, and the verdict criteria decided in advance
  (conf/experiment/paper/table2.yaml): sigma=0 nearer the shuffled partner than sigma=0.05; sigma=0.05 nearer the
  OT partner (than sigma=0, and than its shuffled partner); the larger set memorizes less (smaller margin
  l2_ot - l2_partner at sigma=0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmatch.plots.common import find_jobs, write_csv, write_json
from flowmatch.plots.pair_tables import pair_row, plot_pair_table

PAPER = {  # CelebA 64x64: (L2 to OT partner, L2 to shuffled partner) per (N, sigma)
    "N=5000": {"sigma=0": (50.40, 28.57), "sigma=0.05": (34.25, 55.02)},
    "N=50000": {"sigma=0": (46.78, 45.98), "sigma=0.05": (30.05, 56.48)},
}


def verdicts(rows: list[dict]) -> dict:
    """The criteria of conf/experiment/paper/table2.yaml, each a comparison of the measured means."""
    by = {(r["n_pairs"], r["sigma"]): r for r in rows}
    sizes = sorted({r["n_pairs"] for r in rows})
    out: dict = {}
    for n in sizes:
        zero, noisy = by.get((n, 0.0)), by.get((n, 0.05))
        if zero and noisy:
            out[f"N={n}"] = {
                "sigma0_nearer_shuffled_than_sigma005": zero["l2_partner"] < noisy["l2_partner"],
                "sigma005_nearer_ot_than_sigma0": noisy["l2_ot"] < zero["l2_ot"],
                "sigma005_nearer_ot_than_its_shuffled": noisy["l2_ot"] < noisy["l2_partner"],
                "sigma0_nearer_shuffled_than_ot": zero["l2_partner"] < zero["l2_ot"],
                "sigma0_margin_l2ot_minus_l2partner": zero["l2_ot"] - zero["l2_partner"],
            }
    if len(sizes) >= 2 and all(f"N={n}" in out for n in (sizes[0], sizes[-1])):
        small, large = out[f"N={sizes[0]}"], out[f"N={sizes[-1]}"]
        out["larger_set_memorizes_less"] = (
            large["sigma0_margin_l2ot_minus_l2partner"] < small["sigma0_margin_l2ot_minus_l2partner"]
        )
        out["larger_set_lower_pair_acc_sigma0"] = by[(sizes[-1], 0.0)]["pair_acc"] < by[(sizes[0], 0.0)]["pair_acc"]
    return out


def summarize(rows: list[dict]) -> dict:
    """Per N and sigma the run's numbers; the verdicts; the paper's numbers."""
    keys = ("l2_ot", "l2_ot_std", "l2_partner", "l2_partner_std", "pair_acc", "mem_rate", "train_loss", "steps")
    table = {
        f"N={n}": {f"sigma={r['sigma']:g}": {k: r[k] for k in keys} for r in rows if r["n_pairs"] == n}
        for n in sorted({r["n_pairs"] for r in rows})
    }
    return {"runs": table, "verdicts": verdicts(rows), "paper_celeba_l2_ot_and_l2_shuffled": PAPER}


def main(argv: list[str] | None = None) -> None:
    """Command line: figure, CSV and summary.json of a ``make table2`` runs directory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs_dir")
    ap.add_argument("fig_dir")
    args = ap.parse_args(argv)
    rows = [r for r in (pair_row(j) for j in find_jobs(args.runs_dir)) if r is not None]
    if not rows:
        sys.exit(f"error: no finished runs (with metrics.json) under {args.runs_dir!r}")
    rows.sort(key=lambda r: (r["n_pairs"], r["sigma"], r["seed"]))
    out = Path(args.fig_dir)
    write_csv(out / "table2.csv", rows)
    write_json(out / "summary.json", summarize(rows))
    plot_pair_table(
        rows,
        "n_pairs",
        lambda n: f"N = {n} digits",
        "shuffled partner",
        "Table 2: OT pairing, then every target shuffled; L2 from each training source's endpoint (mean ± std over "
        "sources)\nexpected: σ = 0 nearer the shuffled partner (memorization), σ = 0.05 nearer the OT partner; the "
        "larger set memorizes less",
        out / "table2.png",
    )
    print(f"flowmatch: table2 figure, CSV and summary in {out}")


if __name__ == "__main__":
    main()
