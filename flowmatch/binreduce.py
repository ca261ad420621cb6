"""Per-bin reductions of per-sample gradients for all bins at once (plain torch; used by the engines of
:mod:`flowmatch.persample`).

A chunk's rows are sorted by local bin (:class:`~flowmatch.gradvar_plan.Rows`); every reduction below is one
batched operation per padded size class of the bins, never one per bin, so its cost does not grow with K. A
:class:`Sink` says where one chunk's per-bin results go: ``dense`` -> ``targets[name]`` is the (Kc, *shape) float64
slice of the per-bin gradient sums sum_{i in k} g_i, to add to; else ``targets[name]`` is the (Kc,) float64 slice
of ||sum_{i in k} g_i||^2 (the chunk holds whole bins, so the norm of the chunk's sum is the bin's).

Linear layers, one row per sample (g_i = d_i a_i^T, d the output gradient, a the input; S = 1):

    ||g_i||^2 = ||d_i||^2 ||a_i||^2                                   (per sample, float64, nothing materialised)
    sum_{i in k} g_i = D_k^T A_k                                     (one bmm over the bins)
    ||D_k^T A_k||^2 = sum_{i,j in k} (d_i . d_j)(a_i . a_j)           (Gram form, when n_k (o + i) < o i)

With large layers the products run in float32 on centred factors: with dbar_k, abar_k the bin means (float64),
delta_i = d_i - dbar_k, alpha_i = a_i - abar_k, exactly

    D_k^T A_k = n_k dbar_k abar_k^T + M_k,        M_k = sum_{i in k} delta_i alpha_i^T
    ||D_k^T A_k||^2 = n_k^2 ||dbar_k||^2 ||abar_k||^2 + 2 n_k sum_{i in k} (dbar_k . delta_i)(abar_k . alpha_i)
                      + ||M_k||^2

where only M_k (float32: its rounding is relative to the spread of the samples, not to the mean gradient, so
grad_var keeps float64 accuracy when the mean dominates) is a matrix product; the rest are float64 vectors.
Everything else (biases, S > 1 positions, convolutions, norms, embeddings) goes through per-sample gradients
``g`` (b, F), cast to float64 and reduced by :func:`add_materialised`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmatch.gradvar_plan import Rows

F64 = torch.float64
CENTRED_MIN_MACS = 2**21  # below this many multiply-adds a layer's float64 products cost less than the extra ops


@dataclass(frozen=True)
class Sink:
    """Where one chunk's per-bin results go (module docstring): ``dense`` sums or squared norms of sums."""

    dense: bool
    targets: dict[str, Tensor]


def vdot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot products of x, y (R, F) -> (R,)."""
    return torch.linalg.vecdot(x, y)


def bin_sum(x: Tensor, rows: Rows) -> Tensor:
    """(Kc, F) per-bin sums of the rows x (R, F), in x's dtype."""
    g = rows.groups[0]
    if len(rows.groups) == 1 and g.index is None:
        return x.view(-1, g.n, x.shape[1]).sum(1)
    return x.new_zeros(rows.count.shape[0], x.shape[1]).index_add_(0, rows.rb, x)


def _scatter(out: Tensor | None, g, res: Tensor, Kc: int) -> Tensor:
    """``res`` (Kg, ...) of group g written into the (Kc, ...) result (added for dense sums)."""
    if g.bins is None:
        return res if out is None else out.add_(res)
    out = res.new_zeros(Kc, *res.shape[1:]) if out is None else out
    return out.index_add_(0, g.bins, res.to(out.dtype))


def add_materialised(g: Tensor, rows: Rows, target: Tensor, dense: bool) -> Tensor:
    """Add the per-bin sums (dense) or their squared norms of the per-sample tensors g (b, ...) into ``target``;
    return the (b,) float64 ||g_i||^2. Both from a float64 copy of g."""
    g = g.reshape(g.shape[0], -1).to(F64)
    sums = bin_sum(g, rows)
    if dense:
        target.view(sums.shape).add_(sums)
    else:
        target.add_(vdot(sums, sums))
    return vdot(g, g)


def _outer_sqnorm(X: Tensor, Y: Tensor) -> Tensor:
    """(Kg,) ||X_k^T Y_k||^2 of blocks X (Kg, n, o), Y (Kg, n, i), by the Gram form when it is cheaper."""
    n, o, i = X.shape[1], X.shape[2], Y.shape[2]
    if n * (o + i) < o * i:
        return (torch.bmm(X, X.transpose(1, 2)) * torch.bmm(Y, Y.transpose(1, 2))).sum((1, 2))
    M = torch.bmm(X.transpose(1, 2), Y).view(X.shape[0], -1)
    return vdot(M, M)


def _linear_group(D: Tensor, A: Tensor, cnt: Tensor, mask: Tensor | None, dense: bool, centred: bool) -> Tensor:
    """One size class of bins, float64 blocks D (Kg, n, o), A (Kg, n, i) (zero padding rows, ``mask`` (Kg, n, 1)
    marks the real ones; ``cnt`` (Kg,) their number): the (Kg, o, i) sums D_k^T A_k (dense) or their (Kg,)
    squared norms, from centred factors in float32 when ``centred`` (module docstring)."""
    if not centred:
        return torch.bmm(D.transpose(1, 2), A) if dense else _outer_sqnorm(D, A)
    dbar, abar = D.sum(1) / cnt[:, None], A.sum(1) / cnt[:, None]
    delta, alpha = D - dbar[:, None], A - abar[:, None]
    if mask is not None:
        delta, alpha = delta * mask, alpha * mask
    if dense:
        return torch.bmm((cnt[:, None] * dbar)[:, :, None], abar[:, None]).add_(
            torch.bmm(delta.float().transpose(1, 2), alpha.float())
        )
    cross = (torch.bmm(delta, dbar[:, :, None]) * torch.bmm(alpha, abar[:, :, None])).sum((1, 2))
    big = cnt * cnt * vdot(dbar, dbar) * vdot(abar, abar)
    return big + 2 * cnt * cross + _outer_sqnorm(delta.float(), alpha.float()).double()


def linear_rows(a64: Tensor, d64: Tensor, rows: Rows, target: Tensor, dense: bool, centred: bool) -> None:
    """Per-bin sum_{r in k} d_r a_r^T of the float64 rows a64 (R, i), d64 (R, o), or its squared norm, added into
    ``target`` (module docstring: from centred float32 factors when ``centred``, else float64 products)."""
    Kc, out = rows.count.shape[0], None
    for g in rows.groups:
        cnt = rows.count if g.bins is None else rows.count.index_select(0, g.bins)
        mask = None
        if g.index is not None and centred:
            mask = (torch.arange(g.n, device=cnt.device)[None, :, None] < cnt[:, None, None]).to(F64)
        res = _linear_group(rows.blocks(d64, g), rows.blocks(a64, g), cnt, mask, dense, centred)
        if dense:
            target.add_(res) if g.bins is None else target.index_add_(0, g.bins, res)
        else:
            out = _scatter(out, g, res, Kc)
    if not dense:
        target.add_(out)


def use_centred(a: Tensor, rows: Rows, o: int) -> bool:
    """Centred float32 products pay off for float32/bfloat16 factors with >= ``CENTRED_MIN_MACS`` multiply-adds."""
    i = a.shape[1]
    return a.dtype != F64 and a.shape[0] * min(rows.n_pad * (o + i), o * i) >= CENTRED_MIN_MACS


def is_small_linear(x: Tensor, d: Tensor, rows: Rows) -> bool:
    """A one-row-per-sample Linear layer whose float64 products cost less than ``CENTRED_MIN_MACS``: its
    statistics are cheapest in one batched pass with the chunk's other small layers (:func:`fused_linear`)."""
    b, i, o = x.shape[0], x.shape[-1], d.shape[-1]
    return x.numel() == b * i and d.numel() == b * o and b * min(rows.n_pad * (o + i), o * i) < CENTRED_MIN_MACS


def fused_linear(a: Tensor, d: Tensor, rows: Rows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L small one-row-per-sample Linear layers of one shape in one float64 pass: inputs a (L, b, i), output
    gradients d (L, b, o). Returns per-sample ||d_l||^2 ||a_l||^2 and ||d_l||^2 (L, b) (weight and bias) and per
    bin ||sum_{i in k} d_li a_li^T||^2 and ||sum_{i in k} d_li||^2 (L, Kc) (:func:`_outer_sqnorm` per block)."""
    L, o, i = a.shape[0], d.shape[2], a.shape[2]
    a, d = a.to(F64), d.to(F64)
    dn, an = d.square().sum(2), a.square().sum(2)
    Kc, w, bias = rows.count.shape[0], None, None
    for g in rows.groups:
        if g.index is None:
            Dg, Ag = d.reshape(-1, g.n, o), a.reshape(-1, g.n, i)
        else:  # row b of the padded copies is the zero row the index pads the bins with
            Dg = F.pad(d, (0, 0, 0, 1)).index_select(1, g.index).view(-1, g.n, o)
            Ag = F.pad(a, (0, 0, 0, 1)).index_select(1, g.index).view(-1, g.n, i)
        s = Dg.sum(1)
        wv, bv = _outer_sqnorm(Dg, Ag).view(L, -1).T, vdot(s, s).view(L, -1).T  # (Kg, L)
        w, bias = _scatter(w, g, wv, Kc), _scatter(bias, g, bv, Kc)
    return dn * an, dn, w.T, bias.T
