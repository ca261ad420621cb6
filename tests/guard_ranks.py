"""Helper of tests/test_faults.py (not a test): R gloo processes each feed a :class:`flowmatch.finite.LossGuard`
(lazy or at once) a loss per step (its own per rank), NaN on rank 1 alone at step 3 and on every rank from step 4
(the NaN weights the gradient all-reduce spreads), call ``check`` at steps 2 and 5 and ``check_weights`` on NaN
weights after the first check, and save to OUT/rank{r}.json what each raised and where.

    python tests/guard_ranks.py OUT [--ranks 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def losses(rank: int) -> list[float]:
    """The loss of each step on ``rank``: 1 / (step + 1) + rank / 10, NaN on rank 1 at step 3 and on every rank
    from step 4."""
    out = [1.0 / (step + 1) + rank / 10 for step in range(8)]
    if rank == 1:
        out[3] = float("nan")
    return [float("nan") if step >= 4 else v for step, v in enumerate(out)]


def run_guard(lazy: bool, rank: int) -> dict:
    """Feed one guard; record the message of each check (None: passed) and of the weights check."""
    from flowmatch.finite import LossGuard, NonFiniteLoss

    guard, out = LossGuard(lazy=lazy), {"update": None, "checks": {}}
    for step, value in enumerate(losses(rank)):
        try:
            guard.update(torch.tensor(value), step)
        except NonFiniteLoss as exc:  # a rank that stopped alone here would leave the other in the next check
            out["update"] = str(exc)
            return out
        if step in (2, 5):
            try:
                guard.check()
                out["checks"][step] = None
            except NonFiniteLoss as exc:
                out["checks"][step] = str(exc)
        if step == 2:
            try:
                guard.check_weights([torch.tensor([1.0, float("nan")])], step + 1)
            except NonFiniteLoss as exc:
                out["weights"] = str(exc)
    return out


def rank_main(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.out}/init",
        rank=rank,
        world_size=args.ranks,
        timeout=datetime.timedelta(seconds=30),
    )
    result = {str(lazy): run_guard(lazy, rank) for lazy in (False, True)}
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(rank_main, args=(args,), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
