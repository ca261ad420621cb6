"""How :func:`flowmatch.gradvar.bin_sums` cuts a probe into chunks, and how big a chunk may be (plain torch).

The probe is sorted by time bin and packed into chunks of whole bins, at most ``chunk_size`` samples each; a bin
larger than that is cut into pieces that are chunks of their own (``Chunk.split``). Inside a chunk the samples of
local bin j (global bin ``k0 + j``) are consecutive; :class:`Rows` lays any per-sample rows (S rows per sample) out
as (bins, n, F) blocks: with equal bins (stratified probes) one block, a view without copies; else one block padded
with zero rows up to the largest bin when that at most triples the rows, otherwise one per size class
2^(j-1) < n <= 2^j (padding < 2x; at most log2(n) + 1 blocks). A per-bin reduction of all bins is one batched
operation per block: its cost does not grow with K.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmatch.interpolants import PathSample

__all__ = ["Group", "Rows", "ChunkSpec", "Chunk", "ProbePlan", "rows_layout", "pack_chunks", "plan_probe"]


@dataclass(frozen=True)
class Group:
    """Bins of one size class: ``bins`` (Kg,) local bins (None: all bins, in order), ``n`` rows per bin after
    padding, ``index`` (Kg * n,) rows to gather, R = the zero pad row (None: the rows themselves, viewed)."""

    bins: Tensor | None
    n: int
    index: Tensor | None


@dataclass(frozen=True)
class Rows:
    """R rows sorted by local bin: ``rb`` (R,) local bin of each row, ``count`` (Kc,) float64 rows per bin,
    ``groups`` the padded blocks (:class:`Group`)."""

    rb: Tensor
    count: Tensor
    groups: tuple[Group, ...]
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # layouts derived from these rows

    @property
    def n_pad(self) -> int:
        """The largest padded bin (rows)."""
        return max((g.n for g in self.groups), default=0)

    def blocks(self, x: Tensor, g: Group) -> Tensor:
        """(Kg, n, F) rows of x (R, F) of group ``g`` (zero rows as padding)."""
        if g.index is None:
            return x.view(-1, g.n, x.shape[1])
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, g.index).view(-1, g.n, x.shape[1])


def rows_layout(counts: list[int], S: int, device) -> Rows:
    """:class:`Rows` of bins holding ``counts`` samples each (in order), ``S`` consecutive rows per sample."""
    c = [int(v) * S for v in counts]
    R, Kc = sum(c), len(c)
    rb = torch.repeat_interleave(torch.arange(Kc, device=device), torch.tensor(c, device=device))
    count = torch.tensor(c, dtype=torch.float64, device=device)
    if all(v == c[0] for v in c) and c[0] > 0:
        return Rows(rb, count, (Group(None, c[0], None),))
    starts = [sum(c[:k]) for k in range(Kc)]
    nz = [k for k in range(Kc) if c[k]]
    if max(c) * len(nz) <= 3 * R:  # one block padded to the largest bin (at most 3x the rows)
        classes = {0: nz}
    else:  # one block per size class 2^(j-1) < n <= 2^j: padding < 2x
        classes: dict[int, list[int]] = {}
        for k in nz:
            classes.setdefault((c[k] - 1).bit_length(), []).append(k)
    groups = []
    for ks in classes.values():
        n = max(c[k] for k in ks)
        idx = [list(range(starts[k], starts[k] + c[k])) + [R] * (n - c[k]) for k in ks]
        bins = None if ks == list(range(Kc)) else torch.tensor(ks, device=device)
        groups.append(Group(bins, n, torch.tensor(idx, device=device).reshape(-1)))
    return Rows(rb, count, tuple(groups))


@dataclass
class ChunkSpec:
    """Samples ``start:end`` of the sorted probe: bins ``k0 .. k0 + Kc - 1``, ``kb`` (b,) local bins, ``rows`` their
    layout; ``split``: a piece of a bin larger than the chunk size (``last``: its final piece)."""

    start: int
    end: int
    k0: int
    counts: list[int]
    kb: Tensor
    rows: Rows
    split: bool = False
    last: bool = True
    _by_s: dict = field(default_factory=dict)

    @property
    def Kc(self) -> int:
        return len(self.counts)

    def rows_for(self, S: int) -> Rows:
        """The layout of S rows per sample (cached)."""
        if S == 1:
            return self.rows
        if S not in self._by_s:
            self._by_s[S] = rows_layout(self.counts, S, self.kb.device)
        return self._by_s[S]


class Chunk:
    """One chunk of the current probe: ``path`` (its samples) and the cached :class:`ChunkSpec` fields."""

    __slots__ = ("path", "spec")

    def __init__(self, path: PathSample, spec: ChunkSpec) -> None:
        self.path, self.spec = path, spec

    def __len__(self) -> int:
        return self.spec.end - self.spec.start

    def __getattr__(self, name):
        return getattr(self.spec, name)


def pack_chunks(bins: list[int], K: int, chunk_size: int, device) -> list[ChunkSpec]:
    """Chunks of whole bins (at most ``chunk_size`` samples) over samples sorted by bin (``bins``, all < K)."""
    cs = max(1, int(chunk_size))
    counts = torch.bincount(torch.tensor(bins, dtype=torch.long), minlength=K).tolist() if bins else [0] * K
    specs: list[ChunkSpec] = []

    def spec(start, ks, piece=None, last=True):
        cnt = [counts[k] for k in range(ks[0], ks[-1] + 1)] if piece is None else [piece]
        kb = torch.repeat_interleave(torch.arange(len(cnt), device=device), torch.tensor(cnt, device=device))
        return ChunkSpec(start, start + sum(cnt), ks[0], cnt, kb, rows_layout(cnt, 1, device), piece is not None, last)

    cur, cur_start, cur_n, pos = [], 0, 0, 0  # cur: the bins of the chunk being filled
    for k in range(K):
        c = counts[k]
        if c == 0:
            continue
        if cur and (c > cs or cur_n + c > cs):
            specs.append(spec(cur_start, cur))
            cur, cur_n = [], 0
        if c > cs:
            specs.extend(spec(pos + s, [k], min(cs, c - s), s + cs >= c) for s in range(0, c, cs))
        else:
            cur_start = pos if not cur else cur_start
            cur.append(k)
            cur_n += c
        pos += c
    if cur:
        specs.append(spec(cur_start, cur))
    return specs


@dataclass
class ProbePlan:
    """The cached layout of one probe: its times ``t``, ``order`` (sorting by bin, None: already sorted, all
    kept), the per-bin counts ``n`` (K,) float64 and the chunk specs."""

    t: Tensor
    order: Tensor | None
    n: Tensor
    specs: list[ChunkSpec]


def plan_probe(t: Tensor, bins: Tensor, K: int, chunk_size: int, device) -> ProbePlan:
    """Sort the probe by bin (dropping the samples outside the edges, bin K) and pack it into chunks."""
    order = torch.argsort(bins, stable=True)[: int((bins < K).sum())]
    identity = order.numel() == bins.numel() and bool((order == torch.arange(order.numel(), device=order.device)).all())
    sorted_bins = bins[order].tolist()
    n = torch.bincount(bins[order].cpu(), minlength=K).to(device=device, dtype=torch.float64)
    return ProbePlan(t.clone(), None if identity else order, n, pack_chunks(sorted_bins, K, chunk_size, device))
