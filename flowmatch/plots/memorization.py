"""The memorization alarm across families of runs (``make memorization``), and one run's figure redrawn.

``python -m flowmatch.plots.memorization RUNS_DIR FIG_DIR`` reads every run under RUNS_DIR (each sweep of the
Makefile writes into ``RUNS_DIR/<family>/<job>``; families starting with ``prop2`` are the calibration family the
alarm's threshold was chosen on, docs/memorization-calibration.md) and writes

- ``memorization.csv``: one row per run: family, role (calibration / evaluation), setting, whether the run can
  memorize a pairing at all, the alarm step, the first probe step with pair_acc@euler7 >= 0.9 (training sources),
  the lead time (pair-accuracy step - alarm step; > 0: the alarm came first), the outcome (true alarm, false
  alarm: alarm without pair accuracy 0.9; missed: pair accuracy 0.9 without alarm; silent: neither), final pair
  accuracies, the largest gaps and the callback's time share of the training wall time;
- ``memorization.png``: per run, the alarm signal over training with its threshold beside the training and
  held-out pair accuracy, the alarm (red) and the pair-accuracy step (green) marked;
- ``summary.json``: the counts per outcome and role, the lead times and the time shares.

``python -m flowmatch.plots.memorization --run RUN_DIR [RUN_DIR ...]`` redraws each run's ``memorization.png``
from its ``memorization.csv`` (:func:`flowmatch.plots.memorization_run.plot_run`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flowmatch.plots.common import find_jobs, load_config, write_csv, write_json  # noqa: E402
from flowmatch.plots.memorization_run import (  # noqa: E402
    PAIR_LEVEL,
    alarm_step,
    euler_ks,
    first_step,
    nearest_k,
    plot_run,
    read_memorization,
)

FAMILIES = (  # the Makefile's sweep folders, in the order of the table (others follow, by name)
    "prop2",
    "prop2_fresh_sources",
    "rotation180",
    "rotated_fresh_draws",
    "independent",
    "digits_fixed",
    "digits_shuffled_ot",
)
OUTCOME_COLORS = {"true alarm": "tab:green", "false alarm": "tab:red", "missed": "tab:orange", "silent": "tab:gray"}


def setting(cfg: dict) -> tuple[str, bool]:
    """A short description of the run's data, coupling and sigma, and whether it can memorize a pairing (a finite
    set of pairs whose sources are trained with their partners)."""
    c, data = cfg["coupling"], cfg["data"]
    name = c["_target_"].rsplit(".", 1)[-1].replace("Coupling", "")
    kind = data.get("kind") or data["_target_"].rsplit(".", 1)[-1].replace("DataModule", "").lower()
    parts = [f"{kind} d={data['dim']}" if "dim" in data and "channels" not in data else kind, name]
    if c.get("n_pairs") is not None:
        parts.append(f"N={c['n_pairs']}")
    elif name == "Rotated":
        parts.append("fresh draws")
    if c.get("fresh_sources"):
        parts.append("fresh sources")
    parts.append(f"σ={float(cfg['interpolant']['sigma']):g}")
    finite = c.get("n_pairs") is not None or name == "Reflow"
    return ", ".join(parts), finite and not c.get("fresh_sources")


def run_row(runs_dir: Path, run: Path) -> dict | None:
    """Every number of one run (None, with a warning, when it has no memorization.csv)."""
    if not (run / "memorization.csv").exists():
        print(
            f"warning: {run} has no memorization.csv (failed run, or no callbacks=memorization): skipped",
            file=sys.stderr,
        )
        return None
    rows = read_memorization(run / "memorization.csv")
    if not rows:
        return None
    cfg, last = load_config(run), rows[-1]
    family = run.relative_to(runs_dir).parts[0]
    k = nearest_k(euler_ks(rows))
    alarm, acc = alarm_step(rows), first_step(rows, f"pair_acc@euler{k}", PAIR_LEVEL)
    outcome = {(True, True): "true alarm", (True, False): "false alarm", (False, True): "missed"}.get(
        (alarm is not None, acc is not None), "silent"
    )
    text, can = setting(cfg)
    return {
        "family": family,
        "role": "calibration" if family.startswith("prop2") else "evaluation",
        "setting": text,
        "can_memorize": can,
        "seed": int(cfg.get("seed", 0)),
        "steps": int(last["step"]),
        "every_n_steps": int(rows[1]["step"] - rows[0]["step"]) if len(rows) > 1 else 0,
        "signal": last["signal_stat"],
        "threshold": last["threshold"],
        "alarm_step": alarm,
        "euler_k": k,
        "pair_acc_step": acc,
        "lead_steps": acc - alarm if alarm is not None and acc is not None else None,
        "outcome": outcome,
        "false_alarm": outcome == "false alarm",
        "final_pair_acc": last[f"pair_acc@euler{k}"],
        "final_holdout_pair_acc": last[f"holdout_pair_acc@euler{k}"],
        "max_var_gap": max(r["var_gap"] for r in rows),
        "max_loss_gap": max(r["loss_gap"] for r in rows),
        "time_share": last["callback_s"] / last["wall_s"] if last["wall_s"] > 0 else float("nan"),
        "run": str(run),
    }


def summarize(rows: list[dict]) -> dict:
    """Counts of each outcome per role, lead times of the true alarms, time shares (min, median, max)."""
    out: dict = {"signal": rows[0]["signal"], "threshold": rows[0]["threshold"], "pair_level": PAIR_LEVEL}
    for role in ("calibration", "evaluation"):
        group = [r for r in rows if r["role"] == role]
        out[role] = {o: sum(r["outcome"] == o for r in group) for o in OUTCOME_COLORS} | {"runs": len(group)}
        out[role]["false_alarms_in_runs_that_cannot_memorize"] = sum(
            r["alarm_step"] is not None for r in group if not r["can_memorize"]
        )
    leads = sorted(r["lead_steps"] for r in rows if r["lead_steps"] is not None)
    out["lead_steps"] = {"values": leads, "median": leads[len(leads) // 2] if leads else None}
    shares = sorted(r["time_share"] for r in rows if math.isfinite(r["time_share"]))
    out["time_share"] = {"min": shares[0], "median": shares[len(shares) // 2], "max": shares[-1]} if shares else {}
    keys = ("alarm_step", "pair_acc_step", "lead_steps", "outcome", "time_share")
    out["runs"] = {f"{r['family']}: {r['setting']}": {k: r[k] for k in keys} for r in rows}
    return out


def _panel(ax, row: dict) -> None:
    rows = read_memorization(Path(row["run"]) / "memorization.csv")
    steps, k = [r["step"] for r in rows], row["euler_k"]
    gap = "var_gap" if row["signal"] == "grad_var" else "loss_gap"
    ax.plot(steps, [r[gap] for r in rows], color="k", lw=1.6, label=f"signal ({row['signal']} gap)")
    ax.axhline(row["threshold"], color="k", ls=":", lw=1)
    ax.set_ylabel("log10 held-out / train", fontsize=7)
    right = ax.twinx()
    right.plot(steps, [r[f"pair_acc@euler{k}"] for r in rows], color="tab:blue", label=f"pair acc@euler{k} training")
    right.plot(steps, [r[f"holdout_pair_acc@euler{k}"] for r in rows], color="tab:blue", ls="--", label="held-out")
    right.set_ylim(-0.03, 1.03)
    right.tick_params(labelsize=6)
    if row["alarm_step"] is not None:
        ax.axvline(row["alarm_step"], color="tab:red", lw=1.4)
    if row["pair_acc_step"] is not None:
        ax.axvline(row["pair_acc_step"], color="tab:green", lw=1.4, ls="--")
    color = OUTCOME_COLORS[row["outcome"]]
    ax.set_title(f"{row['family']}: {row['setting']}\n{row['outcome']}", fontsize=7, color=color)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)


def plot(rows: list[dict], out: Path) -> None:
    """Small multiples, one per run (see the module docstring)."""
    cols = 4
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.0 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        _panel(ax, row)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(
        f"memorization alarm ({rows[0]['signal']} gap >= {rows[0]['threshold']:g}; red: alarm, green dashed: "
        f"pair accuracy >= {PAIR_LEVEL}; right axis: pair accuracy, training solid, held-out dashed; "
        f"last probe after {'/'.join(str(s) for s in sorted({r['steps'] for r in rows}))} steps)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: the figure folder of a ``make memorization`` runs directory, or ``--run`` redraws."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs="+", metavar="RUN_DIR", help="redraw these runs' memorization.png")
    ap.add_argument("dirs", nargs="*", metavar="RUNS_DIR FIG_DIR")
    args = ap.parse_args(argv)
    if args.run:
        for run in map(Path, args.run):
            print(plot_run(run / "memorization.csv", run / "memorization.png", title=run.name))
        return
    if len(args.dirs) != 2:
        ap.error("give RUNS_DIR FIG_DIR (or --run RUN_DIR ...)")
    runs_dir, out = Path(args.dirs[0]), Path(args.dirs[1])
    rows = [r for r in (run_row(runs_dir, j) for j in find_jobs(runs_dir)) if r is not None]
    if not rows:
        sys.exit(f"error: no runs with memorization.csv under {str(runs_dir)!r}")
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (r["role"] != "calibration", order.get(r["family"], len(order)), r["family"], r["setting"]))
    write_csv(out / "memorization.csv", rows)
    write_json(out / "summary.json", summarize(rows))
    plot(rows, out / "memorization.png")
    print(f"flowmatch: memorization table, figure and summary in {out}")


if __name__ == "__main__":
    main()
