"""Gram-form statistics of the stacked Linear layers over bins packed whole into blocks of equal size (plain torch;
the small-bin route of :mod:`flowmatch.binreduce_passes`).

With small bins (many bins, or wide layers) the statistics of :func:`~flowmatch.binreduce_linear.plain_stats`
are cheapest from n x n Gram matrices, but one product per bin, padded to the largest bin, is a poor shape for
BLAS: with 50 bins of about 5 rows and width 256 the batched 10 x 10 products ran at 28 GFLOP/s on this CPU, against
65-90 GFLOP/s for blocks of 16-32 rows. Here the bins, in order, are packed whole into ``nblocks`` blocks of ``n``
rows (a new block when the next bin does not fit; ``n`` a multiple of 8, at least the largest bin, chosen by
:func:`packed_for`'s cost model), and one Gram matrix per block serves all of its bins, their pairs picked by a
same-bin mask M:

    ||sum_{r in k} d_r a_r^T||^2 = sum_{r, s in k} (d_r . d_s)(a_r . a_s)      (rows of G_D * G_A * M, then bins)
    ||sum_{r in k} d_r||^2       = sum_{r, s in k} d_r . d_s                      (rows of G_D * M, then bins)
    sum_{r in k} ||d_r||^2 ||a_r||^2                                              (diagonals)

summed per row inside the block, then per bin over its rows (one index_add). Float32 products are used only while
S / V is small enough (the same check as :func:`~flowmatch.binreduce_linear.pass_stats`); otherwise the rows are
taken back out of the blocks and the per-bin centred route runs (:func:`~flowmatch.binreduce_linear.centred_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmatch.binreduce_linear import Blocks, blocks_for, centred_stats, needs_centring, stack_factors
from flowmatch.gradvar_plan import Rows

__all__ = ["Packed", "packed_for", "choose_layout", "packed_pass_stats"]
F64 = torch.float64
# the fixed cost of one small matrix in a batched product, in multiply-adds (~0.7 us on this CPU at ~50 per ns)
MATRIX_MACS = 2**15
GRAM_EXTRA = 4 / 3  # a Gram-form multiply-add's cost relative to a direct one (the n x n products, the mask)


@dataclass(frozen=True)
class Packed:
    """Bins packed whole, in order, into ``nblocks`` blocks of ``n`` rows: ``slots`` (R,) the padded position of
    each row (None: the rows themselves), ``label`` (nblocks * n,) the bin of each padded position (Kc for
    padding), ``same`` (nblocks, n, n) 1 where both positions hold rows of the same bin, ``count`` (Kc,) float64
    rows per bin, ``per_bin`` the per-bin layouts of the same rows (:func:`~flowmatch.binreduce_linear.blocks_for`,
    for the centred route), ``gather`` the row at each padded position (padding rows hold a copy of row 0:
    ``same`` and the bin labels leave them out, so unlike a per-bin layout there is no padding ``mask``). ``rows``
    and ``bins`` are None: a packed layout holds every row and bin of the chunk."""

    n: int
    nblocks: int
    slots: Tensor | None
    label: Tensor
    same: Tensor
    count: Tensor
    per_bin: tuple[Blocks, ...]
    gather: Tensor  # (nblocks * n,) the row at each padded position (padding: row 0, never read)
    mask: None = None
    rows: None = None
    bins: None = None
    limit: dict = field(default_factory=dict, compare=False, repr=False)  # as Blocks.limit


def next_fit(counts: list[int], n: int) -> list[list[int]]:
    """The bins (indices into ``counts``, empty bins left out) of each block of ``n`` rows, filled in order: a new
    block when the next bin does not fit."""
    out: list[list[int]] = []
    used = n
    for k, c in enumerate(counts):
        if not c:
            continue
        if used + c > n:
            out.append([])
            used = 0
        out[-1].append(k)
        used += c
    return out


def _block_cost(n: int, width: int) -> float:
    """Estimated cost (multiply-adds) of the Gram products of one block of ``n`` rows over a layer of ``width`` =
    input + output width."""
    return GRAM_EXTRA * n * n * width + 2 * MATRIX_MACS


def packed_for(rows: Rows, width: int) -> Packed:
    """The packed layout of ``rows`` for a layer of input + output ``width`` (cached on ``rows``): the block size
    among the multiples of 8 from the largest bin up to max(64, largest bin) with the least estimated cost."""
    key = ("packed", width)
    got = rows.cache.get(key)
    if got is not None:
        return got
    counts = rows.count.round().long().tolist()
    lo = max(8, -(-max(counts, default=1) // 8) * 8)
    n = min(range(lo, max(lo, 64) + 1, 8), key=lambda m: (len(next_fit(counts, m)) * _block_cost(m, width), m))
    got = rows.cache.get(("packed_n", n))  # one layout per block size, shared by the widths that choose it
    if got is None:
        got = rows.cache[("packed_n", n)] = _pack(rows, counts, n)
    rows.cache[key] = got
    return got


def _pack(rows: Rows, counts: list[int], n: int) -> Packed:
    """The :class:`Packed` layout of ``rows`` (``counts`` per bin) in blocks of ``n`` rows."""
    blocks = next_fit(counts, n)
    dev, Kc = rows.rb.device, len(counts)
    label = [Kc] * (len(blocks) * n)
    slots, gather, start = [], [0] * (len(blocks) * n), 0
    for j, ks in enumerate(blocks):
        pos = j * n
        for k in ks:
            label[pos : pos + counts[k]] = [k] * counts[k]
            slots.extend(range(pos, pos + counts[k]))
            gather[pos : pos + counts[k]] = range(start, start + counts[k])
            pos, start = pos + counts[k], start + counts[k]
    lab = torch.tensor(label, device=dev)
    blk_lab = lab.view(len(blocks), n)
    same = ((blk_lab[:, :, None] == blk_lab[:, None, :]) & (blk_lab < Kc)[:, :, None]).float()
    slots_t = None if slots == list(range(len(label))) else torch.tensor(slots, device=dev)
    gather_t = torch.tensor(gather, device=dev)
    return Packed(n, len(blocks), slots_t, lab, same, rows.count, blocks_for(rows), gather_t)


def choose_layout(rows: Rows, Wi: int, Wo: int) -> tuple:
    """The layouts of a pass over layers of (padded) widths ``Wi``, ``Wo``: (:class:`Packed`,) (Gram form) when its
    estimated cost is below that of the per-bin blocks (direct form, one Wi x Wo product per bin) and it holds
    several bins in some block, else the per-bin blocks (whose own statistics take the Gram form where it pays,
    :func:`~flowmatch.binreduce_linear.gram_form`: with one bin a block they need no mask)."""
    per_bin = blocks_for(rows)
    direct = sum(b.nblocks * (b.n * Wi * Wo + MATRIX_MACS) for b in per_bin)
    pk = packed_for(rows, Wi + Wo)
    if pk.nblocks == int((pk.count > 0).sum()):
        return per_bin
    return (pk,) if pk.nblocks * _block_cost(pk.n, Wi + Wo) < direct else per_bin


def packed_stats(A: Tensor, D: Tensor, pk: Packed, pair: Tensor | None = None) -> Tensor:
    """(6, L, Kc) float64 as :func:`~flowmatch.binreduce_linear.plain_stats` (weight S_w and ||sum g||^2, bias on
    D's side S_b and ||sum g||^2, then on A's side), from the Gram matrices of the packed blocks A (L, nblocks, n,
    Wi), D (L, nblocks, n, Wo) (module docstring); ``pair``: the (2, L, nblocks, n, W) stack [D, A] of which they are
    views (equal widths: one product for both)."""
    L, nb, n, Wi = A.shape
    Wo, Kc = D.shape[3], pk.count.shape[0]
    if pair is not None:
        X = pair.reshape(2 * L * nb, n, Wo)
        G = torch.bmm(X, X.transpose(1, 2)).view(2, L, nb, n, n)
    else:
        dl, al = D.reshape(L * nb, n, Wo), A.reshape(L * nb, n, Wi)
        G = torch.stack([torch.bmm(dl, dl.transpose(1, 2)), torch.bmm(al, al.transpose(1, 2))]).view(2, L, nb, n, n)
    rn = G.diagonal(0, 3, 4)  # (2, L, nb, n): ||d_r||^2, ||a_r||^2
    same = torch.stack([G[0] * G[1], G[0], G[1]]).mul_(pk.same).sum(4)  # per row: sums over its bin's rows
    per_row = torch.stack([rn[0] * rn[1], same[0], rn[0], same[1], rn[1], same[2]]).view(6 * L, nb * n)
    out = torch.zeros(6 * L, Kc + 1, dtype=F64, device=A.device).index_add_(1, pk.label, per_row.to(F64))
    return out[:, :Kc].reshape(6, L, Kc)


def _centred_unpacked(A: Tensor, D: Tensor, pk: Packed) -> Tensor:
    """(6, L, Kc) float64 :func:`~flowmatch.binreduce_linear.centred_stats` of the rows held in the packed blocks A,
    D, laid out again per bin."""
    L, Kc = A.shape[0], pk.count.shape[0]
    sides = []
    for X in (A, D):
        flat = X.reshape(L, -1, X.shape[3])
        sides.append(flat if pk.slots is None else flat.index_select(1, pk.slots))
    out = torch.zeros(6, L, Kc, dtype=F64, device=A.device)
    for blk in pk.per_bin:
        Ab, Db = (stack_factors(list(s), blk, s.dtype) for s in sides)
        out[:, :, slice(None) if blk.bins is None else blk.bins] = centred_stats(Ab, Db, blk)
    return out


def packed_pass_stats(A: Tensor, D: Tensor, pk: Packed, pick: Tensor, pair: Tensor | None = None) -> Tensor:
    """(2 H, Kc) float64 the rows ``pick`` of :func:`packed_stats` while S / V allows float32 products
    (:func:`~flowmatch.binreduce_linear.needs_centring`, Gram form), else of the centred route."""
    Kc = pk.count.shape[0]
    vals = packed_stats(A, D, pk, pair).view(-1, Kc).index_select(0, pick)
    if needs_centring(vals, pk, A.dtype, True):
        return _centred_unpacked(A, D, pk).view(-1, Kc).index_select(0, pick)
    return vals
