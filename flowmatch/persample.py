"""Exact per-sample gradient engines used by :mod:`flowmatch.gradvar` (plain torch).

An engine is called as ``engine(job, chunk, sink) -> ChunkResult``: :class:`Job` is what stays fixed during one
:func:`~flowmatch.gradvar.bin_sums` call, :class:`~flowmatch.gradvar_plan.Chunk` one slice of the probe sorted by
bin (whole bins, or a piece of one), :class:`~flowmatch.binreduce.Sink` where its per-bin results go: for every
parameter name either ``sink.targets[name][k] += sum_{i in chunk, bin k} g_i`` (dense) or
``sink.targets[name][k] += ||sum_{i in chunk, bin k} g_i||^2`` (g_i = d l_i / d theta, the gradient of
``loss_fn(model, chunk.path[i:i+1])``), all bins in one batched reduction (:mod:`flowmatch.binreduce`). It returns
the losses and per-sample ||g_i||^2 (or adds per-bin sums of ||g_i||^2 per parameter into ``sink.stats`` itself,
as the hooks engine does for its stacked Linear layers). Sums and squared norms are float64 whatever the model's
dtype (or, for Linear layers, products of bin-centred factors whose rounding is relative to the spread, not the
mean, or plain float32 products while S / V is moderate), since (sum ||g_i||^2 - n ||gbar||^2) / (n - 1) cancels
E||g||^2 / tr Cov-fold.
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

from flowmatch.binreduce import add_materialised
from flowmatch.interpolants import PathSample

F64 = torch.float64
LossFn = Callable[[nn.Module, PathSample], Tensor]  # (model, path) -> (b,) per-sample losses


class HooksUnsupported(RuntimeError):
    """The hooks engine cannot be exact for this model (the caller falls back to ``vmap``)."""


@dataclass(frozen=True)
class Job:
    """What stays fixed during one bin_sums call: ``loss_fn(model, path) -> (b,)`` per-sample losses and the
    trainable ``params`` {name: parameter}."""

    model: nn.Module
    loss_fn: LossFn
    params: dict[str, Tensor]


@dataclass(frozen=True)
class ChunkResult:
    """``losses`` (b,) detached; ``sqnorms`` {name: (b,) float64 ||g_i||^2 restricted to that parameter} (a
    missing name means a zero gradient, or one the engine summed per bin into ``sink.stats`` itself)."""

    losses: Tensor
    sqnorms: dict[str, Tensor]


def _check_losses(losses: Tensor, b: int) -> Tensor:
    """``losses``, after checking that loss_fn returned one loss per sample (shape (b,))."""
    if losses.shape != (b,):
        raise ValueError(f"loss_fn must return per-sample losses of shape ({b},), got {tuple(losses.shape)}")
    return losses


def loop_engine(job: Job, chunk, sink) -> ChunkResult:
    """Reference: ``b`` separate forward/backward passes on single-sample chunks; per-bin running sums (one
    gradient's memory), folded into the sink when the bin changes."""
    names, ps = list(job.params), list(job.params.values())
    sq = {n: torch.zeros(len(chunk), dtype=F64, device=p.device) for n, p in job.params.items()}
    run = {n: torch.zeros(p.shape, dtype=F64, device=p.device) for n, p in job.params.items()}
    kb, losses = chunk.kb.tolist(), []
    for i in range(len(chunk)):
        li = _check_losses(job.loss_fn(job.model, chunk.path[i : i + 1]), 1)
        for n, g in zip(names, torch.autograd.grad(li.sum(), ps, allow_unused=True)):
            if g is not None:
                g = g.to(F64)
                sq[n][i] = g.pow(2).sum()
                run[n] += g
        losses.append(li.detach())
        if i + 1 == len(chunk) or kb[i + 1] != kb[i]:
            for n, r in run.items():
                sink.targets[n][kb[i]] += r if sink.dense else r.pow(2).sum()
                r.zero_()
    return ChunkResult(torch.cat(losses), sq)


class _LossModule(nn.Module):
    """``loss_fn(model, path)`` as a module, so that ``functional_call`` can substitute the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, path: PathSample) -> Tensor:
        return self.loss_fn(self.model, path)


def vmap_engine(job: Job, chunk, sink) -> ChunkResult:
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
    rows, dense = chunk.rows, sink.dense
    return ChunkResult(losses, {n: add_materialised(g, rows, sink.targets[n], dense) for n, g in zip(names, grads)})


def _sqnorm(g: Tensor) -> Tensor:
    """(b,) float64 squared norms of the per-sample tensors g (b, ...)."""
    g = g.reshape(g.shape[0], -1).to(F64)
    return (g * g).sum(1)
