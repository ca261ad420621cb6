"""Running one :func:`flowmatch.gradvar.bin_sums` call's engine over the chunks of its probe and adding up the
per-bin sums (plain torch): the probe sorted by bin (cached while its tensors are unchanged) and the accumulation
of counts, losses, per-parameter sums of ||g_i||^2 and the engine's per-bin gradient sums or their squared norms.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from flowmatch.binreduce import Sink
from flowmatch.gradvar_plan import ProbePlan
from flowmatch.gradvar_stats import BinSums
from flowmatch.interpolants import PathSample
from flowmatch.persample import Job

__all__ = ["sorted_probe", "accumulate"]


def sorted_probe(cache: dict, probe: PathSample, plan: ProbePlan) -> PathSample:
    """The probe sorted by bin (``plan.order``), reused while the probe holds the same tensors with unchanged
    version counters (an in-place change makes a new copy; the cache holds the tensors, so their ids stay theirs)."""
    if plan.order is None:
        return probe
    now = [(getattr(probe, f.name), getattr(probe, f.name)._version) for f in fields(probe)]
    got = cache.get("sorted")
    if got is None or got[0] is not plan or any(a is not x or v != w for (a, v), (x, w) in zip(now, got[1])):
        got = cache["sorted"] = (plan, now, probe[plan.order])
    return got[2]


def accumulate(engine, job: Job, out: BinSums, chunks, plan: ProbePlan) -> BinSums:
    """Run ``engine(job, chunk, sink)`` on every chunk: the engine adds the per-bin gradient sums (into
    ``out.grad_flat``) or their squared norms (``out.sum_sqnorm``; a bin cut into pieces sums its pieces first,
    then takes the norm), and per-bin sums of ||g_i||^2 per parameter either itself (``sink.stats``) or as per-sample
    values (``ChunkResult.sqnorms``, summed per bin here); counts and losses are added here, and at the end the
    per-parameter sums of ||g_i||^2 are added up in total and per group."""
    layout, keep, dev = out.layout, out.grad_flat is not None, out.n.device
    names, K = layout.names, out.n.shape[0]
    col = {n: j for j, n in enumerate(names)}
    both = torch.zeros(K, 2, len(names), dtype=torch.float64, device=dev)  # per bin: sum ||g_i||^2, ||sum g_i||^2
    per = both[:, 0]  # per bin and parameter
    if not keep:
        out.sum_sqnorm = both[:, 1]
    blocks = out.blocks() if keep else {}
    tmp: dict = {}
    out.n.copy_(plan.n)
    for chunk in chunks:
        k0, Kc = chunk.k0, chunk.Kc
        if keep or chunk.split:
            shapes = {n: p.shape for n, p in job.params.items()}
            if keep:
                targets = {n: blocks[n][k0 : k0 + Kc].view(Kc, *shapes[n]) for n in names}
            else:
                tmp = tmp or {n: torch.zeros(1, *s, dtype=torch.float64, device=dev) for n, s in shapes.items()}
                targets = tmp
            sink = Sink(True, targets, both[k0 : k0 + Kc], col)
        else:
            sink = Sink(False, dict(zip(names, both[k0 : k0 + Kc, 1].unbind(1))), both[k0 : k0 + Kc], col)
        res = engine(job, chunk, sink)
        if chunk.split and chunk.last and not keep:
            for n, acc in tmp.items():
                out.sum_sqnorm[k0, col[n]] += acc.square().sum()
                acc.zero_()
        out.loss_sum[k0 : k0 + Kc].index_add_(0, chunk.kb, res.losses.detach().double())
        if res.sqnorms:
            got = list(res.sqnorms)
            per_bin = per.new_zeros(Kc, len(got)).index_add_(0, chunk.kb, torch.stack([res.sqnorms[n] for n in got], 1))
            per[k0 : k0 + Kc].index_add_(1, torch.tensor([col[n] for n in got], device=dev), per_bin)
    out.sqnorm_sum.add_(per.sum(1))
    if layout.groups:
        member = torch.zeros(len(names), len(layout.groups), dtype=torch.float64, device=dev)
        for g, (_, members) in enumerate(layout.groups):
            member[[col[m] for m in members], g] = 1.0
        out.group_sqnorm_sum.add_(per @ member)
    return out
