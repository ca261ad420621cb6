"""Cost of global minibatch OT under DDP (``coupling.global_ot=true``) vs per-rank OT, on the CPU with gloo.

R processes (1 torch thread each) draw batches of B pairs per rank from the training stream of ``coupling=ot`` on
Gaussian ends of dimension D and time, per batch (median over ``--reps`` after one warm-up, on rank 0, ranks
aligned by a barrier before each timed batch):

- per-rank OT: ``OTCoupling.sample`` (each rank solves its own B x B assignment, in parallel);
- global OT: ``draw_independent`` + :func:`flowmatch.global_ot.global_ot_pair` (all-gather of x0 and x1, one
  RB x RB assignment on rank 0, broadcast of the permutation).

Run: ``.venv/bin/python benchmarks/global_ot_cost.py [--ranks 2] [--batches 64,256,1024] [--dims 2,3072]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up, ranks aligned before each call."""
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_main(rank: int, args: argparse.Namespace, init: str) -> None:
    """One rank: time both pairings for every (dim, batch) and print the table on rank 0."""
    from flowmatch.couplings import OTCoupling
    from flowmatch.data import GaussianDataModule
    from flowmatch.global_ot import global_ot_pair

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.ranks)
    if rank == 0:
        print(f"{args.ranks} gloo processes, 1 thread each; seconds per batch (median of {args.reps})")
        print(f"{'dim':>5s} {'B/rank':>7s} {'per-rank OT':>12s} {'global OT':>10s} {'ratio':>7s}")
    for dim in args.dims:
        for b in args.batches:
            dm = GaussianDataModule(OTCoupling(), dim=dim, batch_size=b, seed=0)
            dm.setup()
            g = torch.Generator().manual_seed(rank)
            c = dm.coupling
            local = _time(lambda c=c, b=b, g=g: c.sample(b, g), args.reps)
            glob = _time(lambda c=c, b=b, g=g: global_ot_pair(*c.draw_independent(b, g)), args.reps)
            if rank == 0:
                print(f"{dim:5d} {b:7d} {local:12.4f} {glob:10.4f} {glob / local:7.1f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batches", default="64,256,1024")
    ap.add_argument("--dims", default="2,3072")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    args.dims = [int(x) for x in args.dims.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(args, f"file://{tmp}/init"), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
