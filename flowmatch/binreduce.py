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
    ||D_k^T A_k||^2 = sum_{i,j in k} (d_i . d_j)(a_i . a_j)           (Gram form, when n_k (o + i) < 3/4 o i)

With float32 (or bfloat16) factors the products run in float32 on factors centred on their bin means
(:func:`centred`: D_k^T A_k = n_k u_k v_k^T + M'_k with u_k, v_k the bin means in float64 and M'_k the
float32 product of the deviations, whose rounding is relative to the spread of the samples, not to the mean
gradient, so grad_var keeps float64 accuracy when the mean dominates; the per-sample ||d_i||^2 ||a_i||^2 accumulate
in float64); layers below ``CENTRED_MIN_MACS`` multiply-adds use float64 products. This is the route of Linear
layers when the per-bin sums themselves are kept (dense sinks) or over S > 1 positions; with squared norms only,
Linear layers applied once per sample go to the stacked passes of :mod:`flowmatch.binreduce_linear`. Everything
else (biases over positions, S > 1 positions, convolutions, norms, embeddings) goes through per-sample gradients
``g`` (b, F), reduced with float64 accumulators by :func:`add_materialised`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.gradvar_plan import Rows

F64 = torch.float64
CENTRED_MIN_MACS = 2**21  # layers below this many multiply-adds: float64 products (centring costs more there)


@dataclass(frozen=True)
class Sink:
    """Where one chunk's per-bin results go (module docstring): ``dense`` sums or squared norms of sums, per
    parameter name in ``targets``. ``stats`` (Kc, 2, n_params) float64: per bin and parameter (column
    ``cols[name]``) the sum of ||g_i||^2 ([:, 0], for engines that sum them per bin themselves) and, when not
    dense, the squared norm of the sum of g_i ([:, 1], whose columns the ``targets`` are)."""

    dense: bool
    targets: dict[str, Tensor]
    stats: Tensor
    cols: dict[str, int]


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
    return the (b,) float64 ||g_i||^2. Both accumulate in float64 (equal bins: reductions with a float64
    accumulator; else from a float64 copy of g)."""
    g = g.reshape(g.shape[0], -1)
    grp = rows.groups[0]
    if g.dtype != F64 and len(rows.groups) == 1 and grp.index is None:  # no float64 copy of g
        sums, sq = bin_sum64(g, rows), sqnorm64(g)
    else:
        g = g.to(F64)
        sums, sq = bin_sum(g, rows), vdot(g, g)
    if dense:
        target.view(sums.shape).add_(sums)
    else:
        target.add_(vdot(sums, sums))
    return sq


def _outer_sqnorm(X: Tensor, Y: Tensor) -> Tensor:
    """(Kg,) ||X_k^T Y_k||^2 of blocks X (Kg, n, o), Y (Kg, n, i), by the Gram form when it is cheaper."""
    n, o, i = X.shape[1], X.shape[2], Y.shape[2]
    if 4 * n * (o + i) < 3 * o * i:  # measured crossover (CPU): the Gram form pays below ~3/4 of o i
        return (torch.bmm(X, X.transpose(1, 2)) * torch.bmm(Y, Y.transpose(1, 2))).sum((1, 2))
    M = torch.bmm(X.transpose(1, 2), Y).view(X.shape[0], -1)
    return vdot(M, M)


def _plain_group(D: Tensor, A: Tensor, dense: bool) -> Tensor:
    """Float64 blocks D (Kg, n, o), A (Kg, n, i) (zero padding rows): the (Kg, o, i) sums D_k^T A_k (dense) or
    their (Kg,) squared norms."""
    return torch.bmm(D.transpose(1, 2), A) if dense else _outer_sqnorm(D, A)


def expand(x: Tensor, rows: Rows) -> Tensor:
    """(R, F) the per-bin rows x (Kc, F) repeated for every row of their bin."""
    g = rows.groups[0]
    if len(rows.groups) == 1 and g.index is None:
        return x[:, None].expand(-1, g.n, -1).reshape(-1, x.shape[1])
    return x.index_select(0, rows.rb)


def _thin(X: Tensor, W: Tensor) -> Tensor:
    """(Kg, 2, n) = (X_k W_k)^T for X (Kg, n, F), W (Kg, F, 2), as W^T X^T (BLAS is slow with a 2-column right
    factor: 75 us against 12 us for a 256 x 256 block on this CPU)."""
    return torch.bmm(W.transpose(1, 2).contiguous(), X.transpose(1, 2))


def centred(d: Tensor, a: Tensor, rows: Rows, dense: bool) -> tuple[Tensor, Tensor]:
    """Per bin k, sum_{r in k} d_r a_r^T (dense, (Kc, o, i)) or its squared norm ((Kc,)), both float64, of float32
    rows d (R, o), a (R, i), exactly, via centres c, c' (float32 bin means, rounded) and the deviations
    delta_r = d_r - c, alpha_r = a_r - c' (float32): with s_d = sum delta_r, s_a = sum alpha_r, u = c + s_d / n,
    v = c' + s_a / n (the exact means, float64) and M = sum delta_r alpha_r^T (float32 products),

        D^T A = n u v^T + M',   M' = M - s_d s_a^T / n
        ||D^T A||^2 = n^2 ||u||^2 ||v||^2 + 2 n u^T M' v + ||M'||^2
        u^T M' v = sum_r (u . delta_r)(v . alpha_r) - (u . s_d)(v . s_a) / n
        ||M'||^2 = ||M||^2 - 2 sum_r (s_d . delta_r)(s_a . alpha_r) / n + ||s_d||^2 ||s_a||^2 / n^2

    Every float32 rounding is relative to the deviations (the spread of the samples), not to the means. The
    centring runs on the rows; only M's products see the padded blocks. Also returns the (Kc, o) float64 bin sums
    of d, n u."""
    n, g = rows.count, rows.groups[0]
    if len(rows.groups) == 1 and g.index is None:  # equal bins: (Kc, n, F) views, bin values broadcast
        d3, a3 = d.view(-1, g.n, d.shape[1]), a.view(-1, g.n, a.shape[1])
        c, ca = d3.mean(1), a3.mean(1)
        delta, alpha = d3 - c[:, None], a3 - ca[:, None]
        sd, sa = delta.sum(1).to(F64), alpha.sum(1).to(F64)  # small (the spread): float32 sums suffice
    else:  # uneven bins: the bin values gathered for every row
        c, ca = bin_sum(d, rows) / n.to(d.dtype)[:, None], bin_sum(a, rows) / n.to(a.dtype)[:, None]
        delta, alpha = d - c.index_select(0, rows.rb), a - ca.index_select(0, rows.rb)
        sd, sa = bin_sum(delta, rows).to(F64), bin_sum(alpha, rows).to(F64)
    u, v = c.to(F64) + sd / n[:, None], ca.to(F64) + sa / n[:, None]
    Kc = n.shape[0]
    if dense:
        out = (
            torch.bmm((n[:, None] * u)[:, :, None], v[:, None])
            - torch.bmm(sd[:, :, None], sa[:, None]) / n[:, None, None]
        )
        if delta.dim() == 3:
            return out.add_(torch.bmm(delta.transpose(1, 2), alpha)), n[:, None] * u
        for grp in rows.groups:
            res = torch.bmm(rows.blocks(delta, grp).transpose(1, 2), rows.blocks(alpha, grp))
            out.add_(res) if grp.bins is None else out.index_add_(0, grp.bins, res.to(F64))
        return out, n[:, None] * u
    W, Wa = torch.stack([u, sd], 2).to(d.dtype), torch.stack([v, sa], 2).to(a.dtype)  # (Kc, F, 2)
    if delta.dim() == 3:  # (Kc, n, 2): u . delta_r, s_d . delta_r (and v, s_a with alpha_r)
        PQ = (_thin(delta, W) * _thin(alpha, Wa)).sum(2).to(F64)
        M2 = _outer_sqnorm(delta, alpha).to(F64)
    else:  # the same on the padded blocks of each size class (zero rows add nothing)
        PQ = M2 = None
        for grp in rows.groups:
            X, Y = rows.blocks(delta, grp), rows.blocks(alpha, grp)
            Wg, Wag = (W, Wa) if grp.bins is None else (W.index_select(0, grp.bins), Wa.index_select(0, grp.bins))
            PQ = _scatter(PQ, grp, (_thin(X, Wg) * _thin(Y, Wag)).sum(2).to(F64), Kc)
            M2 = _scatter(M2, grp, _outer_sqnorm(X, Y).to(F64), Kc)
    uMv = PQ[:, 0] - vdot(u, sd) * vdot(v, sa) / n
    M2 = M2 - 2 * PQ[:, 1] / n + vdot(sd, sd) * vdot(sa, sa) / n**2
    return n * n * vdot(u, u) * vdot(v, v) + 2 * n * uMv + M2, n[:, None] * u


def linear_rows(a: Tensor, d: Tensor, rows: Rows, target: Tensor, dense: bool, centre: bool) -> None:
    """Per-bin sum_{r in k} d_r a_r^T of the rows a (R, i), d (R, o), or its squared norm, added into ``target``:
    float64 rows by float64 products, or (``centre``) float32 rows by :func:`centred`."""
    if centre:
        target.add_(centred(d, a, rows, dense)[0])
        return
    Kc, out = rows.count.shape[0], None
    for g in rows.groups:
        res = _plain_group(rows.blocks(d, g), rows.blocks(a, g), dense)
        if dense:
            target.add_(res) if g.bins is None else target.index_add_(0, g.bins, res.to(target.dtype))
        else:
            out = _scatter(out, g, res, Kc)
    if not dense:
        target.add_(out)


def bin_sum64(x: Tensor, rows: Rows) -> Tensor:
    """(Kc, F) float64 per-bin sums of the rows x (R, F) (equal bins: a float64 accumulator, no copy of x)."""
    g = rows.groups[0]
    if len(rows.groups) == 1 and g.index is None:
        return x.view(-1, g.n, x.shape[1]).sum(1, dtype=F64)
    return bin_sum(x.to(F64), rows)


def sqnorm64(x: Tensor) -> Tensor:
    """(R,) float64 squared norms of the rows x (R, F), accumulated in float64."""
    return torch.linalg.vector_norm(x, dim=1, dtype=F64).square()


def use_centred(a: Tensor, rows: Rows, o: int) -> bool:
    """Centred float32 products pay off for float32/bfloat16 factors with >= ``CENTRED_MIN_MACS`` multiply-adds."""
    i = a.shape[1]
    return a.dtype != F64 and a.shape[0] * min(rows.n_pad * (o + i), o * i) >= CENTRED_MIN_MACS
