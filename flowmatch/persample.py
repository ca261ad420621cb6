"""Exact per-sample gradient engines used by :mod:`flowmatch.gradvar` (plain torch).

An engine is called as ``engine(job, chunk) -> ChunkResult``: :class:`Job` is what stays fixed during one
:func:`~flowmatch.gradvar.bin_sums` call, :class:`Chunk` one slice of the probe sorted by bin. It adds, for
every parameter name, ``job.acc[name][k] += sum_{i in chunk, kb[i] = k} g_i`` (g_i = d l_i / d theta, the
gradient of ``loss_fn(model, chunk.path[i:i+1])``) and returns the losses and per-sample ||g_i||^2. Sums and
squared norms are float64 whatever the model's dtype: per-sample gradients (or the factors a rule forms them
from) are cast first, since (sum ||g_i||^2 - n ||gbar||^2) / (n - 1) cancels E||g||^2 / tr Cov-fold.
No engine touches ``p.grad``: all use ``torch.autograd.grad`` or ``torch.func``.

* ``loop``  -- one forward + backward per sample (the reference; works for any model).
* ``vmap``  -- ``torch.func.vmap(grad(functional_call))`` over the chunk: any layer type, memory b x P.
* ``hooks`` -- (:mod:`flowmatch.persample_hooks`) ONE forward + backward of ``sum_i l_i`` per chunk; per-layer
  rules turn each layer's input and output gradient into exact per-sample gradients. Requires that every
  trainable parameter belongs to exactly one supported layer (Linear, Conv1d/2d, LayerNorm, GroupNorm,
  Embedding) called at most once per forward on a batch-first input; violations are detected and raise
  :class:`HooksUnsupported` so the caller falls back to ``vmap``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from flowmatch.interpolants import PathSample

F64 = torch.float64
LossFn = Callable[[nn.Module, PathSample], Tensor]  # (model, path) -> (b,) per-sample losses


class HooksUnsupported(RuntimeError):
    """The hooks engine cannot be exact for this model (the caller falls back to ``vmap``)."""


@dataclass(frozen=True)
class Job:
    """What stays fixed during one bin_sums call: ``loss_fn(model, path) -> (b,)`` per-sample losses, the
    trainable ``params`` {name: parameter} and ``acc`` {name: (K, *shape) float64 per-bin sum of g_i}."""

    model: nn.Module
    loss_fn: LossFn
    params: dict[str, Tensor]
    acc: dict[str, Tensor]


@dataclass(frozen=True)
class Chunk:
    """b consecutive probe samples sorted by bin: ``path`` (a PathSample), ``kb`` (b,) their bins (long, on
    the accumulators' device) and ``segs`` the runs of equal bins, ((bin, start, end), ...)."""

    path: PathSample
    kb: Tensor
    segs: tuple[tuple[int, int, int], ...]

    def __len__(self) -> int:
        return self.kb.shape[0]


@dataclass(frozen=True)
class ChunkResult:
    """``losses`` (b,) detached; ``sqnorms`` {name: (b,) float64 ||g_i||^2 restricted to that parameter} (a
    missing name means a zero gradient)."""

    losses: Tensor
    sqnorms: dict[str, Tensor]


def _check_losses(losses: Tensor, b: int) -> Tensor:
    """``losses``, after checking that loss_fn returned one loss per sample (shape (b,))."""
    if losses.shape != (b,):
        raise ValueError(f"loss_fn must return per-sample losses of shape ({b},), got {tuple(losses.shape)}")
    return losses


def loop_engine(job: Job, chunk: Chunk) -> ChunkResult:
    """Reference: ``b`` separate forward/backward passes on single-sample chunks."""
    b, names, ps = len(chunk), list(job.params), list(job.params.values())
    sq = {n: torch.zeros(b, dtype=F64, device=p.device) for n, p in job.params.items()}
    losses = []
    for k, s, e in chunk.segs:
        for i in range(s, e):
            li = _check_losses(job.loss_fn(job.model, chunk.path[i : i + 1]), 1)
            for n, g in zip(names, torch.autograd.grad(li.sum(), ps, allow_unused=True)):
                if g is not None:
                    g = g.to(F64)
                    sq[n][i] = g.pow(2).sum()
                    job.acc[n][k] += g
            losses.append(li.detach())
    return ChunkResult(torch.cat(losses), sq)


class _LossModule(nn.Module):
    """``loss_fn(model, path)`` as a module, so that ``functional_call`` can substitute the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, path: PathSample) -> Tensor:
        return self.loss_fn(self.model, path)


def vmap_engine(job: Job, chunk: Chunk) -> ChunkResult:
    """``vmap(grad(l_i))`` over the chunk with ``functional_call``; buffers are used as stored in the model."""
    wrap, names = _LossModule(job.model, job.loss_fn), list(job.params)

    def one(pvals, sample):
        path = PathSample(**{k: v.unsqueeze(0) for k, v in sample.items()})
        li = torch.func.functional_call(wrap, {"model." + n: v for n, v in zip(names, pvals)}, (path,))
        li = _check_losses(li, 1)[0]
        return li, li.detach()

    with warnings.catch_warnings():  # functorch's fallback for ops without a batching rule is exact, only slower
        warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")
        grads, losses = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))(
            tuple(p.detach() for p in job.params.values()),
            {f.name: getattr(chunk.path, f.name) for f in fields(chunk.path)},
        )
    return ChunkResult(losses, {n: _add_bins(job.acc[n], chunk.kb, g) for n, g in zip(names, grads)})


def _sqnorm(g: Tensor) -> Tensor:
    """(b,) float64 squared norms of the per-sample tensors g (b, ...)."""
    g = g.reshape(g.shape[0], -1).to(F64)
    return (g * g).sum(1)


def _add_bins(acc: Tensor, kb: Tensor, g: Tensor) -> Tensor:
    """Add the per-sample gradients g (b, ...) into their bins' rows of the float64 ``acc`` (K, ...); return
    their (b,) float64 squared norms."""
    g = g.to(F64)
    acc.index_add_(0, kb, g)
    return _sqnorm(g)
