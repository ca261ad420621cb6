"""Helper of tests/test_scaling.py (not a test): R gloo processes each take STEPS training batches from the real
training stream (``FlowDataModule.train_dataloader``'s PairStream, rank seeds as under DDP) with
``coupling=ot coupling.global_ot=true`` on Gaussian ends, and save them to OUT/rank{r}.pt.

    python tests/global_ot_ranks.py OUT [--ranks 2] [--batch 16] [--steps 3] [--dim 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rank_main(rank: int, args: argparse.Namespace) -> None:
    """One rank: join the gloo group, draw ``steps`` batches from this rank's training stream, save them."""
    from flowmatch.couplings import OTCoupling
    from flowmatch.data import GaussianDataModule, PairStream
    from flowmatch.streams import stream_seed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.out}/init", rank=rank, world_size=args.ranks)
    dm = GaussianDataModule(OTCoupling(global_ot=True), dim=args.dim, batch_size=args.batch, seed=0)
    dm.setup()
    batches = iter(PairStream(dm.coupling, args.batch, stream_seed(0, "train", rank)))
    torch.save([next(batches) for _ in range(args.steps)], Path(args.out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dim", type=int, default=3)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(rank_main, args=(args,), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
