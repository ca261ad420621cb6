"""Steps per second of the Lightning training loop vs a bare PyTorch loop on the CPU (1 torch thread).

Cases (``--cases``, default all), each built from the project's configs (``benchmarks/loops.py``: same model, loss,
optimizer and scheduler, same training stream; trainer=cpu, float32, no callbacks):

- ``mlp256``: MLP 3x256 on 2-D Gaussian data, CFM sigma 0.05, independent coupling, batch 256;
- ``mlp2048``: the same at batch 2048;
- ``unet_digits``: the small ``unet`` model (base 32, 0.65 M parameters at 8x8x1) on the 8x8 digits, batch 64.

The two loops alternate (Lightning first in even rounds) so machine noise hits both; prints per round and the
median ratio lightning/bare of steps per second per case.
Run: ``.venv/bin/python benchmarks/training_loop.py [--rounds R] [--cases mlp256,unet_digits] [--scale S]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loops import bare_rate, lightning_rate, make_run  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

COMMON = ["trainer=cpu", "threads=1", "callbacks=none", "logger=none", "eval.enabled=false"]
MLP = ["data=gaussian", "data.dim=2", "model=mlp", "interpolant=cfm", "interpolant.sigma=0.05"]
CASES = {  # name: (overrides, timed steps per measurement at --scale 1)
    "mlp256": ([*MLP, "data.batch_size=256"], 600),
    "mlp2048": ([*MLP, "data.batch_size=2048"], 150),
    "unet_digits": (["data=digits", "model=unet", "interpolant=cfm", "data.batch_size=64"], 60),
}


def run_case(name: str, rounds: int, scale: float) -> list[float]:
    """Ratios lightning/bare over ``rounds`` alternating measurements of case ``name``."""
    overrides, steps = CASES[name]
    steps = max(5, int(steps * scale))
    run = make_run([*COMMON, *overrides], torch.device("cpu"))
    n_params = sum(p.numel() for p in run.module.model.parameters())
    print(f"{name}: {' '.join(overrides)} ({n_params:,} parameters), {steps} steps per measurement")
    warm = max(2, steps // 10)
    lightning_rate(run, "32-true", warm, warm), bare_rate(run, "32-true", warm, warm)  # warm-up
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            lt, b = lightning_rate(run, "32-true", steps, warm), bare_rate(run, "32-true", steps, warm)
        else:
            b, lt = bare_rate(run, "32-true", steps, warm), lightning_rate(run, "32-true", steps, warm)
        ratios.append(lt / b)
        print(f"  round {r}: bare {b:8.1f} steps/s   lightning {lt:8.1f} steps/s   ratio {lt / b:.3f}")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the steps per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [c.strip() for c in args.cases.split(",")]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"error: --cases {unknown[0]!r} is not one of {list(CASES)}")
    results = {name: run_case(name, args.rounds, args.scale) for name in names}
    print("lightning/bare steps-per-second ratio (median, min, max over rounds):")
    for name, ratios in results.items():
        print(f"  {name:12s} {statistics.median(ratios):.3f}  ({min(ratios):.3f}, {max(ratios):.3f})")


if __name__ == "__main__":
    main()
