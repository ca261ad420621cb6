"""Running one :func:`flowmatch.gradvar.bin_sums` call's engine over the chunks of its probe and adding up the
per-bin sums (plain torch): the probe sorted by bin (cached while its tensors are unchanged) and the accumulation
of counts, losses, per-parameter sums of ||g_i||^2 and the engine's per-bin gradient sums or their squared norms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flowmatch.binreduce import Sink
from flowmatch.gradvar_plan import ProbePlan
from flowmatch.gradvar_stats import BinSums, Layout
from flowmatch.interpolants import PATH_FIELDS, PathSample
from flowmatch.persample import Job

__all__ = ["sorted_probe", "new_sums", "accumulate"]


def sorted_probe(cache: dict, probe: PathSample, plan: ProbePlan) -> PathSample:
    """The probe sorted by bin (``plan.order``), reused while the probe holds the same tensors with unchanged
    version counters (an in-place change makes a new copy; the cache holds the tensors, so their ids stay theirs)."""
    if plan.order is None:
        return probe
    now = [(getattr(probe, n), getattr(probe, n)._version) for n in PATH_FIELDS]
    got = cache.get("sorted")
    if got is None or got[0] is not plan or any(a is not x or v != w for (a, v), (x, w) in zip(now, got[1])):
        got = cache["sorted"] = (plan, now, probe[plan.order])
    return got[2]


class _Columns(Mapping):
    """{parameter name: column ``cols[name]`` of ``table`` (rows, n_params)}, each view made when asked for."""

    def __init__(self, table: Tensor, cols: dict[str, int]) -> None:
        self.table, self.cols = table, cols

    def __getitem__(self, name: str) -> Tensor:
        return self.table[:, self.cols[name]]

    def __iter__(self):
        return iter(self.cols)

    def __len__(self) -> int:
        return len(self.cols)


def new_sums(edges: Tensor, layout: Layout, device, method: str, keep: bool) -> tuple[BinSums, Tensor]:
    """Zero :class:`BinSums` whose (K,) and (K, G) sums are views of one float64 table (K, 3 + G + 2 n_params), and
    the (K, 2, n_params) rest of it: per bin and parameter the sum of ||g_i||^2 and (``keep`` False: the
    ``sum_sqnorm`` of the result) ||sum g_i||^2."""
    K, G, N = edges.numel() - 1, len(layout.groups), len(layout.names)
    table = torch.zeros(K, 3 + G + 2 * N, dtype=torch.float64, device=device)
    both = table[:, 3 + G :].view(K, 2, N)
    flat = torch.zeros(K * sum(layout.sizes), dtype=torch.float64, device=device) if keep else None
    out = BinSums(
        edges.to("cpu", torch.float64, copy=True),
        *table[:, :3].unbind(1),
        table[:, 3 : 3 + G],
        flat,
        layout,
        method,
        None if keep else both[:, 1],
    )
    return out, both


def accumulate(engine, job: Job, out: BinSums, both: Tensor, chunks, plan: ProbePlan) -> BinSums:
    """Run ``engine(job, chunk, sink)`` on every chunk: the engine adds the per-bin gradient sums (into
    ``out.grad_flat``) or their squared norms (``both[:, 1]``, :func:`new_sums`; a bin cut into pieces sums its
    pieces first, then takes the norm), and per-bin sums of ||g_i||^2 per parameter either itself (``sink.stats``
    = ``both``) or as per-sample values (``ChunkResult.sqnorms``, summed per bin here); counts and losses are added
    here, and at the end the per-parameter sums of ||g_i||^2 are added up in total and per group."""
    layout, keep, dev = out.layout, out.grad_flat is not None, out.n.device
    names = layout.names
    col = {n: j for j, n in enumerate(names)}
    per = both[:, 0]  # per bin and parameter
    blocks = out.blocks() if keep else {}
    tmp: dict = {}
    out.n.copy_(plan.n)
    for chunk in chunks:
        k0, Kc = chunk.k0, chunk.Kc
        stats = both if k0 == 0 and Kc == both.shape[0] else both[k0 : k0 + Kc]
        if keep or chunk.split:
            shapes = {n: p.shape for n, p in job.params.items()}
            if keep:
                targets = {n: blocks[n][k0 : k0 + Kc].view(Kc, *shapes[n]) for n in names}
            else:
                tmp = tmp or {n: torch.zeros(1, *s, dtype=torch.float64, device=dev) for n, s in shapes.items()}
                targets = tmp
            sink = Sink(True, targets, stats, col)
        else:
            sink = Sink(False, _Columns(stats[:, 1], col), stats, col)
        res = engine(job, chunk, sink)
        if chunk.split and chunk.last and not keep:
            for n, acc in tmp.items():
                out.sum_sqnorm[k0, col[n]] += acc.square().sum()
                acc.zero_()
        out.loss_sum[k0 : k0 + Kc].index_add_(0, chunk.kb, res.losses.detach().to(torch.float64))
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
