"""One-command diagnosis of a training run: ``python -m flowmatch.diagnose RUN_DIR [RUN_DIR ...]``.

Reads only the run directory (``.hydra/config.yaml``, ``metrics.json``, ``memorization.csv``, ``gradvar.csv``,
``eval_steps/``), writes ``RUN_DIR/diagnosis.png`` (one page: :mod:`flowmatch.plots.diagnosis`) and prints a
verdict, ``memorizing``, ``generalizing`` or ``unclear``, with its evidence and what it cannot judge. A directory
holding none of those files is not a run: one ``error:`` line, exit status 2 (after the other directories).

The verdict (:func:`verdict`), from memorization.csv when there is one (``callbacks=memorization``), with the
signal s of the last probe, its threshold T, and the pair accuracy of training / held-out sources at the Euler
step count nearest 7 (a_tr, a_ho):

- memorizing: the alarm was raised, or a_tr >= 0.9 with a_tr - a_ho >= 0.5 (the training pairing is reproduced,
  an unseen one is not);
- generalizing: no alarm, s < T / 2 (held-out pairs fit within a factor 10^(T/2) of training pairs) and
  a_tr - a_ho < 0.5;
- unclear: anything between (e.g. s in [T/2, T): the training pairs are fit better, not yet past the alarm).

Without memorization.csv there is no held-out comparison: memorizing when the final ``eval/pair_acc@euler{K}``
(K nearest 7) is >= 0.9 and the coupling has no rule that could generalize (fixed, shuffled_ot, reflow), else
unclear.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowmatch.plots.memorization_run import PAIR_LEVEL, alarm_step, euler_ks, nearest_k, read_memorization

RUN_FILES = (".hydra/config.yaml", "metrics.json", "memorization.csv", "gradvar.csv")
NO_RULE = ("FixedCoupling", "ShuffledOTCoupling", "ReflowCoupling")  # pairings nothing but memory reproduces
GAP = 0.5  # a_tr - a_ho at or above this: the training pairing is reproduced far better than an unseen one


@dataclass
class Run:
    """What a run directory holds (each None / empty when the file is missing)."""

    path: Path
    config: dict | None = None
    metrics: dict | None = None
    memorization: list[dict] = field(default_factory=list)
    gradvar: Path | None = None
    eval_steps: dict[int, dict] = field(default_factory=dict)


@dataclass
class Verdict:
    label: str
    evidence: list[str]
    cannot_judge: list[str]


def load_run(path: str | Path) -> Run:
    """Read a run directory; ValueError (one line) when it holds none of the run files."""
    p = Path(path)
    if not p.is_dir() or not any((p / f).is_file() for f in RUN_FILES):
        raise ValueError(f"{str(p)!r} is not a run directory (none of {', '.join(RUN_FILES)} in it)")
    try:
        return _read(p)
    except (ValueError, yaml.YAMLError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{str(p)!r}: a run file cannot be read ({type(exc).__name__}: {exc})") from None


def _read(p: Path) -> Run:
    run = Run(p)
    if (p / ".hydra/config.yaml").is_file():
        run.config = yaml.safe_load((p / ".hydra/config.yaml").read_text()) or {}
    if (p / "metrics.json").is_file():
        run.metrics = json.loads((p / "metrics.json").read_text())
    if (p / "memorization.csv").is_file():
        run.memorization = read_memorization(p / "memorization.csv")
    if (p / "gradvar.csv").is_file():
        run.gradvar = p / "gradvar.csv"
    for f in sorted((p / "eval_steps").glob("step=*.json")):
        run.eval_steps[int(f.stem.split("=")[1])] = json.loads(f.read_text())
    return run


def _coupling(run: Run) -> str:
    c = (run.config or {}).get("coupling") or {}
    name = str(c.get("_target_", "?")).rsplit(".", 1)[-1]
    return name + (" (fresh sources)" if c.get("fresh_sources") else "")


def _patience(run: Run) -> int:
    cb = ((run.config or {}).get("callbacks") or {}).get("memorization") or {}
    return int(cb.get("patience", 3))


def _from_memorization(run: Run) -> Verdict:
    rows, last = run.memorization, run.memorization[-1]
    k = nearest_k(euler_ks(rows))
    a_tr, a_ho = last[f"pair_acc@euler{k}"], last[f"holdout_pair_acc@euler{k}"]
    s, thr, stat = last["signal"], last["threshold"], last["signal_stat"]
    step = alarm_step(rows)
    first_acc = next((r["step"] for r in rows if r[f"pair_acc@euler{k}"] >= PAIR_LEVEL), None)
    ev = [
        f"{len(rows)} probes, steps {rows[0]['step']}..{last['step']}; coupling {_coupling(run)}",
        f"last probe: {stat} gap {s:.2f} decades (threshold {thr:g}); held-out/train loss x{10 ** last['loss_gap']:.3g}"
        f", gradient variance x{10 ** last['var_gap']:.3g}",
        f"pair accuracy euler{k}: training {a_tr:.2f}, held-out {a_ho:.2f}"
        + (f"; training >= {PAIR_LEVEL} from step {first_acc}" if first_acc is not None else ""),
        f"alarm raised at step {step}" if step is not None else f"no alarm (patience {_patience(run)} probes)",
    ]
    if step is not None or (a_tr >= PAIR_LEVEL and a_tr - a_ho >= GAP):
        label = "memorizing"
    elif s < thr / 2 and a_tr - a_ho < GAP:
        label = "generalizing"
    else:
        label = "unclear"
        ev.append(f"the gap is between half the threshold ({thr / 2:g}) and the alarm, or pair accuracy disagrees")
    return Verdict(label, ev, [])


def _from_pair_accuracy(run: Run) -> Verdict:
    cannot = [
        "no memorization.csv: no held-out comparison of loss and gradient variance (train with callbacks=memorization)"
    ]
    m = run.metrics or {}
    ks = sorted(int(key.split("@euler")[1]) for key in m if key.startswith("eval/pair_acc@euler"))
    if not ks:
        cannot.append(
            "no eval/pair_acc in metrics.json: no pair accuracy (no finite training pairs, or no "
            "end-of-training evaluation)"
        )
        return Verdict("unclear", [f"coupling {_coupling(run)}"], cannot)
    k = nearest_k(ks)
    acc = m[f"eval/pair_acc@euler{k}"]
    ev = [f"coupling {_coupling(run)}; final eval/pair_acc@euler{k} = {acc:.2f}"]
    ev += [
        f"step {s}: eval/pair_acc@euler{k} = {v[f'eval/pair_acc@euler{k}']:.2f}"
        for s, v in run.eval_steps.items()
        if f"eval/pair_acc@euler{k}" in v
    ]
    if acc >= PAIR_LEVEL and _coupling(run) in NO_RULE:
        return Verdict("memorizing", ev + ["a pairing with no rule is reproduced: only memory does that"], cannot)
    cannot.append("pair accuracy alone cannot tell a learned rule or chance from generalization")
    return Verdict("unclear", ev, cannot)


def verdict(run: Run) -> Verdict:
    """The verdict of the module docstring, with its evidence and what the run's files cannot tell."""
    v = _from_memorization(run) if run.memorization else _from_pair_accuracy(run)
    if run.metrics is None:
        v.cannot_judge.append("no metrics.json: the run did not finish, no end-of-training evaluation")
    if run.config is None:
        v.cannot_judge.append("no .hydra/config.yaml: settings unknown")
    if run.gradvar is None:
        v.cannot_judge.append("no gradvar.csv: no training-probe gradient variance over training (callbacks=gradvar)")
    return v


def report(run: Run, v: Verdict, png: Path | None) -> str:
    """The printed text: verdict line, evidence, what cannot be judged, the figure."""
    lines = [f"{run.path}: {v.label}"] + [f"  - {e}" for e in v.evidence]
    lines += [f"  cannot judge: {c}" for c in v.cannot_judge]
    if png is not None:
        lines.append(f"  figure: {png}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: diagnose each RUN_DIR; exit status 2 when any of them is not a run directory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = ap.parse_args(argv)
    status = 0
    for path in args.runs:
        try:
            run = load_run(path)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        v = verdict(run)
        from flowmatch.plots.diagnosis import plot_diagnosis

        png = plot_diagnosis(run, v, run.path / "diagnosis.png")
        print(report(run, v, png), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
