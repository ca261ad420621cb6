"""GPU throughput: the Lightning training loop vs a bare PyTorch loop on the same model, bf16 autocast on and off,
``torch.compile`` on and off, and the gradient-variance probe's cost relative to a training step.

    python benchmarks/gpu_loop.py [--out JSON] [--steps 40] [--warmup 10] [--rounds 2]
        [--precision bf16-mixed,32-true] [--compile false,true] [--probe-size 400] [train.py overrides ...]

Default run: ``unet_cifar`` (35.7 M parameters) on CIFAR-shaped random tensors (``data=random_images``, on the
GPU), batch 128, Adam, EMA 0.9999 (as ``make gpu-check``'s train.py run), ``trainer=gpu`` (its cuDNN autotuning).
Both loops (``benchmarks/loops.py``) run on the same objects, alternating (Lightning first in even rounds, bare
first in odd ones) so drifts of clock and temperature hit both; each cell is the median over rounds of steps/s
after ``--warmup`` steps (the first measurement of each (precision, compile) cell is a discarded warm-up:
compilation, autotuning). The probe: ``GradientVarianceCallback`` with the callback's own code
(``scripts/probe_cost.py``'s ``time_probe``: bin_sums on ``--probe-size`` samples, 10 bins, chunk size auto, under
the first precision) vs the bare step of the first precision without compile.

Prints one summary block (``flowmatch gpu-loop: summary``) and writes ``--out`` (JSON). Without CUDA: one line and
exit status 3 (``--allow-cpu`` runs on the CPU, for a tiny model: the tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
DEFAULTS = [
    "data=random_images",
    "model=unet_cifar",
    "data.batch_size=128",
    "data.device=auto",
    "callbacks=[ema]",
    "callbacks.ema.decay=0.9999",
    "callbacks.ema.warmup=false",
    "scheduler=constant",
    "logger=none",
    "eval.enabled=false",
]
GOAL = 0.90
PRECISIONS = ("bf16-mixed", "32-true")  # 32-true vs bf16 autocast; the bare loop has no loss scaler for 16-mixed


def _flag_list(text: str) -> list[bool]:
    out = [v.strip().lower() for v in text.split(",")]
    if not set(out) <= {"true", "false"}:
        raise SystemExit(f"error: --compile takes true,false values, got {text!r}")
    return [v == "true" for v in out]


def _precisions(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",")]
    bad = [p for p in out if p not in PRECISIONS]
    if bad:
        raise SystemExit(f"error: --precision {bad[0]!r} is not one of {list(PRECISIONS)}")
    return out


def measure(run, precisions, compiles, steps, warmup, rounds) -> list[dict]:
    """Median steps/s of both loops per (precision, compile) cell, alternating the loops' order over rounds."""
    from loops import bare_rate, lightning_rate

    cells = []
    for compile_ in compiles:
        run.module.compile_model = compile_
        for precision in precisions:
            lightning_rate(run, precision, steps, warmup), bare_rate(run, precision, steps, warmup)  # warm-up
            rates = {"lightning": [], "bare": []}
            for r in range(rounds):
                order = ("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")
                for loop in order:
                    fn = lightning_rate if loop == "lightning" else bare_rate
                    rates[loop].append(fn(run, precision, steps, warmup))
            lt, bt = statistics.median(rates["lightning"]), statistics.median(rates["bare"])
            cells.append(
                {
                    "precision": precision,
                    "compile": compile_,
                    "lightning": lt,
                    "bare": bt,
                    "ratio": lt / bt,
                    "lightning_rounds": rates["lightning"],
                    "bare_rounds": rates["bare"],
                }
            )
            print(f"flowmatch gpu-loop: {precision:10s} compile={compile_!s:5s} lightning {lt:7.2f}  bare {bt:7.2f}")
    run.module.compile_model = False
    return cells


def probe_cost(run, probe_size: int, step_s: float, bf16: bool) -> dict:
    """Seconds of one interpolant probe as the callback runs it (chunk_size auto; bf16 autocast when ``bf16``) and
    that time in bare training steps."""
    from probe_cost import time_probe

    from flowmatch.callbacks.gradvar import GradientVarianceCallback

    cb = GradientVarianceCallback(bins=10, probe_size=probe_size, plot=False)
    module = run.module.to(run.device)
    probe_s, info = time_probe(cb, module, run.datamodule.coupling, run.device, repeats=2, bf16=bf16)
    return {
        "probe_size": probe_size,
        "probe_s": probe_s,
        "step_s": step_s,
        "probe_in_steps": probe_s / step_s,
        "engine": {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str, type(None)))},
    }


def summary(info: dict, cells: list[dict], probe: dict | None) -> str:
    """The block to compare between machines and commits."""
    lines = [
        "flowmatch gpu-loop: summary",
        f"device {info['device']} | torch {info['torch']} | {info['model']} {info['parameters']:,} parameters | "
        f"batch {info['batch_size']} | EMA {info['ema']} | grad clip {info['clip']} | cudnn.benchmark "
        f"{info['cudnn_benchmark']}",
        f"{'precision':10s} {'compile':7s} {'lightning steps/s':>17s} {'bare steps/s':>12s} {'ratio':>6s}",
    ]
    for c in cells:
        flag = "" if c["ratio"] >= GOAL else f"  < goal {GOAL}"
        lines.append(
            f"{c['precision']:10s} {('on' if c['compile'] else 'off'):7s} {c['lightning']:17.2f} {c['bare']:12.2f} "
            f"{c['ratio']:6.3f}{flag}"
        )
    if probe:
        lines.append(
            f"gradient-variance probe ({probe['probe_size']} samples, 10 bins, chunk "
            f"{probe['engine'].get('chunk_size', '?')}): {probe['probe_s']:.3f} s = "
            f"{probe['probe_in_steps']:.1f} bare training steps ({cells[0]['precision']}, compile off)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="bf16-mixed,32-true")
    ap.add_argument("--compile", default="false,true")
    ap.add_argument("--probe-size", type=int, default=400, help="0: no probe timing")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no CUDA (tests)")
    args = ap.parse_args(argv)
    precisions, compiles = _precisions(args.precision), _flag_list(args.compile)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "flowmatch gpu-loop: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured.",
            file=sys.stderr,
        )
        raise SystemExit(3)
    device = torch.device("cuda" if cuda else "cpu")
    from loops import make_run  # Lightning and Hydra: imported once the arguments are known to be usable

    given = any(o.startswith("trainer=") for o in args.overrides)
    trainer = [] if given else ["trainer=gpu" if cuda else "trainer=cpu"]
    run = make_run([*DEFAULTS, *trainer, *args.overrides], device)
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "model": run.cfg.model._target_.rsplit(".", 1)[-1],
        "parameters": sum(p.numel() for p in run.module.model.parameters()),
        "batch_size": int(run.cfg.data.batch_size),
        "ema": run.ema.decay if run.ema is not None else "off",
        "clip": run.clip,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
    }
    cells = measure(run, precisions, compiles, args.steps, args.warmup, args.rounds)
    info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    base = next(c for c in cells if not c["compile"]) if not all(c["compile"] for c in cells) else cells[0]
    bf16 = base["precision"].startswith("bf16")
    probe = probe_cost(run, args.probe_size, 1.0 / base["bare"], bf16) if args.probe_size > 0 else None
    text = summary(info, cells, probe)
    print(text)
    result = {**info, "cells": cells, "probe": probe, "summary": text}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
