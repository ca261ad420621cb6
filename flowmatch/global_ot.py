"""Minibatch OT over the union of the DDP ranks' batches (``coupling.global_ot=true``).

Under data parallelism every rank draws its own independent batch (x0_r, x1_r) of B pairs. Per-rank OT (the
default) re-pairs each batch alone. Global OT gathers the R batches into the union X0 = [x0_0; ...; x0_{R-1}],
X1 = [x1_0; ...; x1_{R-1}] (rank order), solves one exact assignment perm minimising
sum_i ||X0_i - X1_perm[i]||^2 on global rank 0 (:func:`flowmatch.ot_large.exact_permutation`), broadcasts perm,
and gives rank r its own sources with their partners in the union: (X0[rB:(r+1)B], X1[perm][rB:(r+1)B]). The
result is exactly the single-process OT pairing of the union batch, split by rank.

Plain ``torch.distributed``: the collectives run on the CPU with gloo and on the current CUDA device with NCCL.
Every rank must call :func:`global_ot_pair` once per training batch (the training stream does; nothing else may).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from flowmatch.ot_large import exact_permutation

__all__ = ["world", "global_ot_pair"]


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where the tensors of a collective must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(x: Tensor, size: int, device: torch.device) -> Tensor:
    """The concatenation, in rank order, of every rank's ``x`` (all of the same shape)."""
    parts = [torch.empty_like(x, device=device) for _ in range(size)]
    dist.all_gather(parts, x.to(device).contiguous())
    return torch.cat(parts)


def global_ot_pair(x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's sources ``x0`` and their partners under the exact OT assignment of the union of all ranks'
    batches (module docstring); without a process group (or with one rank), exact OT of this batch."""
    rank, size = world()
    if size == 1:
        return x0, x1[exact_permutation(x0, x1)]
    device = _collective_device()
    union0, union1 = _gather(x0, size, device), _gather(x1, size, device)
    n = x0.shape[0]
    perm = torch.empty(size * n, dtype=torch.int64, device=device)
    if rank == 0:
        perm.copy_(exact_permutation(union0, union1).to(device))
    dist.broadcast(perm, src=0)
    mine = perm[rank * n : (rank + 1) * n]
    return x0, union1[mine].to(x1.device)
