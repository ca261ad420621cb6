"""The stacked passes of the ``hooks`` engine over its one-row-per-sample Linear layers (plain torch): which held
layers share a :func:`~flowmatch.binreduce_linear.pass_stats` pass, which of a pass's statistics are trainable
parameters and where they go in the sink, and the padded factor buffers of the last chunk layout.

A pass lays its layers' inputs A and output gradients D out as (L, bins, n_pad, W) blocks
(:func:`~flowmatch.binreduce_linear.stack_factors`); when both sides have the same width W they share one
(2, L, bins * n_pad, W) buffer, so that each batched product serves both. The rows are gathered into place (padding
rows masked back to zero where they would count); the buffers of the most recent chunk layout are kept between
calls (the probe's layout is fixed across training) while they total at most ``KEEP_BYTES``; a new layout replaces
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowmatch.binreduce_linear import fusion_groups, pass_stats, pick_rows
from flowmatch.binreduce_packed import Packed, choose_layout, packed_pass_stats
from flowmatch.gradvar_plan import Rows

__all__ = ["RowPasses", "KEEP_BYTES"]
F64 = torch.float64
KEEP_BYTES = 64 * 2**20  # factor buffers kept between calls while one chunk layout needs at most this


@dataclass(frozen=True)
class _Pass:
    """Layers ``group`` (indices into the held layers) with ``swapped`` orientation (input and output gradient
    exchanged: the narrower side is A), input width ``Wi`` and output width ``Wo`` after padding, ``pick`` the rows
    of :func:`pass_stats` wanted (trainable parameters) and ``cols`` their columns in the sink's (Kc, 2 P) stats."""

    group: list[int]
    swapped: list[bool]
    Wi: int
    Wo: int
    pick: Tensor
    cols: Tensor


class RowPasses:
    """The passes over one set of held layers (same modules, widths, padded bin size and chunk size): built once
    from ``shapes`` (input, output widths per layer), ``owners`` ({attr: parameter name} per layer), ``cols``
    (parameter name -> column of the sink's stats), ``P`` (the number of parameter columns), rows per padded bin
    ``n`` and chunk size ``b``."""

    def __init__(self, shapes: list, owners: list, cols: dict, P: int, n: int, b: int, device) -> None:
        self.passes = []
        for group, swapped in fusion_groups(shapes, n, b):
            want = [("weight" in owners[j], "bias" in owners[j]) for j in group]
            pick = pick_rows(swapped, want)
            names = [owners[j][a] for j, (w, bb) in zip(group, want) for a, on in (("weight", w), ("bias", bb)) if on]
            cols_ = [cols[nm] for nm in names] + [P + cols[nm] for nm in names]
            Wi = max(min(shapes[j]) for j in group)
            Wo = max(max(shapes[j]) for j in group)
            t = long_tensor(pick, device), long_tensor(cols_, device)
            self.passes.append(_Pass(group, swapped, Wi, Wo, *t))
        self._kept: tuple = (None, None, [])  # (rows, dtype, their jobs) of the last call, buffers included

    def _jobs(self, items: list, rows: Rows, dt, device) -> list:
        """Per pass and block of its layout (:func:`~flowmatch.binreduce_packed.choose_layout`: bins packed into
        blocks for the Gram form, or per-bin blocks): (pass, block, A, D, pair, writes, stack): the factor buffers
        A (L, Kg, n, Wi) and D (L, Kg, n, Wo) (zero columns beyond a layer's width; one (2, L, Kg, n, W) ``pair``
        buffer for equal widths), and how the rows
        get there: ``writes`` (destination view, layer, side) one layer at a time, or ``stack`` ((L, R, W) view,
        [(layer, side)...]) all at once (equal bins and widths). A and D are None for one layer of equal bins
        (views of its rows, made in :meth:`run`). Kept for the next call while they total <= ``KEEP_BYTES``."""
        if self._kept[0] is rows and self._kept[1] == dt:
            return self._kept[2]
        jobs, size = [], 0
        for ps in self.passes:
            sides = (
                [(j, 2 if s else 1) for j, s in zip(ps.group, ps.swapped)],
                [(j, 1 if s else 2) for j, s in zip(ps.group, ps.swapped)],
            )
            L = len(ps.group)
            for blk in choose_layout(rows, ps.Wi, ps.Wo):
                Kg, n = blk.nblocks, blk.n
                if blk.slots is None and L == 1:
                    jobs.append((ps, blk, None, None, None, [], []))
                    continue
                pair = None
                if ps.Wi == ps.Wo:
                    pair = torch.zeros(2, L, Kg * n, ps.Wo, dtype=dt, device=device)
                    bufs = pair[1], pair[0]
                else:
                    bufs = tuple(torch.zeros(L, Kg * n, W, dtype=dt, device=device) for W in (ps.Wi, ps.Wo))
                size += sum(t.numel() * t.element_size() for t in bufs)
                writes, stack = [], []
                for buf, side in zip(bufs, sides):
                    widths = [items[j][k].shape[1] for j, k in side]
                    if blk.slots is None and all(w == buf.shape[2] for w in widths):
                        stack.append((buf, side))
                    else:
                        writes += [(buf[i, :, :w], j, k) for i, ((j, k), w) in enumerate(zip(side, widths))]
                A, D = (t.view(L, Kg, n, t.shape[2]) for t in bufs)
                jobs.append((ps, blk, A, D, None if pair is None else pair.view(2, L, Kg, n, ps.Wo), writes, stack))
        self._kept = (rows, dt, jobs) if size <= KEEP_BYTES else (None, None, [])
        return jobs

    def run(self, items: list, rows: Rows, stats: Tensor) -> None:
        """Add every pass's per-bin statistics of the held layers ``items`` ((layer, input rows, output gradient
        rows) each, in the bin order of ``rows``) into ``stats`` (Kc, 2 P)."""
        dt = F64 if any(t.dtype == F64 for _, x, d in items for t in (x, d)) else torch.float32
        for ps, blk, A, D, pair, writes, stack in self._jobs(items, rows, dt, items[0][1].device):
            if A is None:  # one layer, equal bins: its rows themselves
                j, s = ps.group[0], ps.swapped[0]
                A, D = (items[j][k].to(dt).view(1, -1, blk.n, items[j][k].shape[1]) for k in ((2, 1) if s else (1, 2)))
            for buf, side in stack:
                srcs = [items[j][k] for j, k in side]
                if all(t.dtype == dt for t in srcs):
                    torch.stack(srcs, out=buf)
                else:
                    for i, t in enumerate(srcs):
                        buf[i].copy_(t)
            for dst, j, k in writes:
                _write(dst, items[j][k], blk)
            if writes and blk.mask is not None:  # per-bin padding rows back to zero (packed ones are never read)
                for t in (A, D) if pair is None else (pair,):
                    t.mul_(blk.mask)
            vals = (packed_pass_stats if isinstance(blk, Packed) else pass_stats)(A, D, blk, ps.pick, pair)
            if blk.bins is None:
                stats.index_add_(1, ps.cols, vals.T)
            else:
                stats.index_put_((blk.bins[:, None], ps.cols[None, :]), vals.T, accumulate=True)


def _write(dst: Tensor, src: Tensor, blk) -> None:
    """Lay the rows ``src`` (R, w) out in ``dst`` (positions, w) as the layout ``blk`` says: a plain copy when it
    holds the rows themselves, else a gather of ``blk.gather`` (padding positions get a copy of row 0: a per-bin
    layout masks them afterwards, a packed one never reads them)."""
    if blk.slots is None:
        dst.copy_(src)
    elif src.dtype == dst.dtype and dst.is_contiguous():
        torch.index_select(src, 0, blk.gather, out=dst)
    else:
        dst.copy_(src.index_select(0, blk.gather))


def long_tensor(values: list[int], device) -> Tensor:
    """``values`` as a long tensor on ``device``."""
    return torch.tensor(values, dtype=torch.long, device=device)


def is_row_linear(m: nn.Module, x: Tensor, out: Tensor) -> bool:
    """A Linear layer applied once per sample (one row of input x and output per sample)."""
    return (
        isinstance(m, nn.Linear)
        and x.numel() == x.shape[0] * x.shape[-1]
        and out.numel() == out.shape[0] * out.shape[-1]
    )
