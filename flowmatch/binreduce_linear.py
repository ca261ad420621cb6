"""Per-bin gradient statistics of one-row-per-sample Linear layers, several layers in one batched pass (plain torch;
the ``hooks`` engine's route for such layers when only the squared norms of the per-bin sums are kept).

Layer l of a pass has, per sample r, input a_r (i_l) and output gradient d_r (o_l): per-sample gradients
g_r = d_r a_r^T (weight) and d_r (bias). Per bin k (n rows) the pass returns S = sum ||g_r||^2 and ||sum g_r||^2
(float64) for weight and bias, whose difference V = S - ||sum g_r||^2 / n = sum ||g_r - gbar||^2 is the numerator
of grad_var. Two routes (:func:`linear_stats` picks one per pass):

* plain (:func:`plain_stats`): products of the factors themselves, ||g_r||^2 = ||d_r||^2 ||a_r||^2 and
  ||sum g_r||^2 = sum_{r,s} (d_r . d_s)(a_r . a_s) (Gram form) or ||D^T A||^2 (direct form, whichever needs fewer
  multiply-adds), in the factors' dtype. Its rounding is relative to S, so V loses precision as S / V grows: it
  is used while every S / V is at most ``KAPPA_MAX`` (float32 errors of V measured at <= 3e-7 S for the Gram form
  and 1.4e-6 S for the direct form, so grad_var stays within ~4e-5 of exact).
* centred (:func:`centred_stats`): the factors are centred on their bin means c = mean d_r, c' = mean a_r
  (float64), delta_r = d_r - c, alpha_r = a_r - c' (in the factors' dtype: rounding relative to the spread of the
  samples, not to the means); with p_r = c . delta_r, q_r = c' . alpha_r, x_r = ||delta_r||^2,
  y_r = ||alpha_r||^2 (so ||d_r||^2 = ||c||^2 + x_r + 2 p_r) and M = sum_r delta_r alpha_r^T,

      S_w = n ||c||^2 ||c'||^2 + ||c||^2 sum (y + 2q) + ||c'||^2 sum (x + 2p) + sum (x + 2p)(y + 2q)
      V_w = ||c||^2 sum y + ||c'||^2 sum x + sum [(x + 2p)(y + 2q) - 2 p q] - ||M||^2 / n
      S_b = n ||c||^2 + sum (x + 2p),   V_b = sum x

  (V uses sum delta_r = sum alpha_r = 0; every term is of the size of the spread, so V keeps the factors'
  relative precision, ~1e-7 in float32, however much the mean gradient dominates), and ||sum g||^2 = n (S - V).

Rows of a chunk are sorted by bin; they are laid out as (bins, n_pad, F) blocks with zero rows as padding
(:class:`Blocks`: views for equal bins, else a scatter into a zeroed buffer), all layers of a pass stacked, their
widths zero-padded to the widest (zero rows and columns change no dot product), so that every quantity is one
batched operation over layers, bins and rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowmatch.gradvar_plan import Rows

__all__ = ["Blocks", "blocks_for", "stack_factors", "linear_stats", "fusion_groups"]
F64 = torch.float64
# plain products while every S / V is at most this (Gram form, direct form), else centred: float32 errors of V
# measured at <= 3e-7 S (Gram) and 1.4e-6 S (direct), so grad_var stays within ~4e-5 of exact
KAPPA_MAX = {torch.float64: (1e8, 1e8), torch.float32: (128.0, 16.0)}
MAX_PAD = 4  # one padded block per size class of the bins when a single block would exceed MAX_PAD x the rows
# a padded bin of n > PAD_TO rows is rounded up to a multiple of PAD_TO when that adds 1-5 rows (n % 8 >= 3): MKL's
# batched n x n products (one thread, widths 64 and 256, 60 blocks) then take 0.33-0.95x the time of the exact n
# (n = 37 -> 40: 0.81x); adding 6-7 rows (n % 8 = 1, 2) made them 1.1-1.36x slower, so those stay exact
PAD_TO = 8


@dataclass(frozen=True)
class Blocks:
    """One block layout of a chunk's rows: ``bins`` (Kg,) the chunk's bins it holds (None: all, in order), ``n``
    padded rows per bin, ``slots`` (R_g,) the padded position of each of its rows (None: the rows themselves, all
    bins equal), ``rows`` (R_g,) which rows of the chunk (None: all), ``count`` (Kg,) float64 rows per bin,
    ``mask`` (Kg, n, 1) 1 for real rows (None: no padding), ``gather`` the same layout read from the chunk's rows
    (a gather, 2-3x faster than scattering into ``slots``; the padding then holds row 0 until masked)."""

    bins: Tensor | None
    n: int
    slots: Tensor | None
    rows: Tensor | None
    count: Tensor
    mask: Tensor | None
    gather: Tensor | None = None  # (Kg * n,) the chunk row at each padded position (padding: row 0, then masked)
    limit: dict = field(default_factory=dict, compare=False, repr=False)  # dtype -> weights of the S / V check

    @property
    def nblocks(self) -> int:
        """The number of blocks (bins) of this layout."""
        return self.count.shape[0]


def blocks_for(rows: Rows) -> tuple[Blocks, ...]:
    """The block layouts of ``rows`` (cached on it): one block padded to the largest bin when that is at most
    ``MAX_PAD`` x the rows, else one per size class 2^(j-1) < n <= 2^j of the non-empty bins (padding < 2x; the bins
    of at most 8 rows share one class)."""
    got = rows.cache.get("blocks")
    if got is not None:
        return got
    dev, counts = rows.rb.device, rows.count.round().long().tolist()
    R, Kc, n_max = sum(counts), len(counts), max(rows.count.round().long().tolist(), default=0)
    if n_max and all(c == n_max for c in counts):
        out: tuple[Blocks, ...] = (Blocks(None, n_max, None, None, rows.count, None),)
    elif Kc * n_max <= MAX_PAD * R:
        out = (_padded(counts, list(range(Kc)), dev, all_bins=True),)
    else:
        classes: dict[int, list[int]] = {}
        for k, c in enumerate(counts):
            if c:
                classes.setdefault(max((c - 1).bit_length(), 3), []).append(k)
        out = tuple(_padded(counts, ks, dev) for ks in classes.values())
    rows.cache["blocks"] = out
    return out


def _padded(counts: list[int], ks: list[int], dev, all_bins: bool = False) -> Blocks:
    """The block of bins ``ks`` (``all_bins``: every bin of the chunk, in order), padded to the largest of them
    rounded up to a multiple of ``PAD_TO`` rows when larger than ``PAD_TO`` and at most 5 rows short of one."""
    starts = [sum(counts[:k]) for k in range(len(counts))]
    n = max(max(counts[k] for k in ks), 1)
    n = n if n <= PAD_TO or n % PAD_TO < 3 else -(-n // PAD_TO) * PAD_TO
    slots = [j * n + i for j, k in enumerate(ks) for i in range(counts[k])]
    rows = [starts[k] + i for k in ks for i in range(counts[k])]
    mask = torch.tensor([[[float(i < counts[k])] for i in range(n)] for k in ks], device=dev)
    count = torch.tensor([float(counts[k]) for k in ks], dtype=F64, device=dev)
    bins = None if all_bins else torch.tensor(ks, device=dev)
    rows_t = None if all_bins else torch.tensor(rows, device=dev)
    gather = [starts[k] + i if i < counts[k] else 0 for k in ks for i in range(n)]
    return Blocks(bins, n, torch.tensor(slots, device=dev), rows_t, count, mask, torch.tensor(gather, device=dev))


def stack_factors(xs: list[Tensor], blk: Blocks, dtype) -> Tensor:
    """(L, Kg, n, W) the rows (R, w_l) of each layer laid out as ``blk``'s blocks, in ``dtype``, zero-padded to
    the widest layer W: a view of the rows for one layer of full width, a stack for equal bins and widths, else
    the rows written layer by layer into a zeroed buffer."""
    W, Kg, L = max(x.shape[1] for x in xs), blk.nblocks, len(xs)
    if blk.slots is None and all(x.shape[1] == W and x.dtype == dtype for x in xs):
        return xs[0].view(1, Kg, blk.n, W) if L == 1 else torch.stack(xs).view(L, Kg, blk.n, W)
    out = xs[0].new_zeros(L, Kg * blk.n, W, dtype=dtype)
    for j, x in enumerate(xs):
        dst = out[j, :, : x.shape[1]]
        if blk.slots is None:
            dst.copy_(x)
        else:
            dst.index_copy_(0, blk.slots, (x if blk.rows is None else x.index_select(0, blk.rows)).to(dtype))
    return out.view(L, Kg, blk.n, W)


def _centre(X: Tensor, blk: Blocks, inv_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bin means of X (L, Kg, n, W) in float64 (L, Kg, W) and rounded to X's dtype, and the deviations X - mean in
    X's dtype (zero on padding rows). Two passes in X's dtype, both with rounding relative to the spread of the
    rows: deviations from each bin's first row, then from their mean r (the bin mean is first row + r)."""
    first = X[:, :, :1]
    dev = X - first
    if blk.mask is not None:
        dev.mul_(blk.mask)
    r = dev.sum(2, keepdim=True).mul_(inv_n[:, :, None].to(X.dtype))
    dev.sub_(r)
    if blk.mask is not None:
        dev.mul_(blk.mask)
    c64 = first[:, :, 0].to(F64).add_(r[:, :, 0])
    return c64, c64.to(X.dtype), dev


def gram_form(n: int, Wo: int, Wi: int) -> bool:
    """||M||^2 by Gram matrices when they need fewer multiply-adds (measured crossover on a CPU: n (Wo + Wi) below
    ~3/4 of Wo Wi)."""
    return 4 * n * (Wo + Wi) < 3 * Wo * Wi


def _sqnorm(x: Tensor, dim: int) -> Tensor:
    """Squared Euclidean norms of x along ``dim``, in x's dtype."""
    return torch.linalg.vector_norm(x, dim=dim).square_()


def plain_stats(A: Tensor, D: Tensor, blk: Blocks, pair: Tensor | None = None) -> Tensor:
    """(6, L, Kg) float64 per layer and bin: weight S_w and ||sum g||^2, bias S_b and ||sum g||^2 with the bias on
    D's side, then with the bias on A's side (a layer whose input and output are exchanged), from products of the
    factors themselves (no centring: the rounding of every term is relative to S, so V = S - ||sum g||^2 / n is
    accurate only while S / V is moderate; :func:`pass_stats` checks that). Padding rows and columns are zero.
    ``pair``: the (2, L, Kg, n, W) stack [D, A] of which D and A are views, when there is one (equal widths):
    each product then runs once for both."""
    L, Kg, n, Wi = A.shape
    Wo, LK = D.shape[3], L * Kg
    X = pair
    if gram_form(n, Wo, Wi):  # row norms on the diagonals, ||sum d||^2 = sum of all entries
        if X is not None:
            X = X.reshape(2 * LK, n, Wo)
            G = torch.bmm(X, X.transpose(1, 2)).view(2, LK, n, n)
        else:
            dl, al = D.view(LK, n, Wo), A.view(LK, n, Wi)
            G = torch.stack([torch.bmm(dl, dl.transpose(1, 2)), torch.bmm(al, al.transpose(1, 2))])
        rn, tot = G.diagonal(0, 2, 3), G.sum((2, 3))  # (2, LK, n) row norms, (2, LK) ||sum of rows||^2
        M2 = torch.linalg.vecdot(G[0].view(LK, -1), G[1].view(LK, -1))
    else:
        if X is not None:
            X = X.view(2, LK, n, Wo)
            rn, tot = _sqnorm(X, 3), _sqnorm(X.sum(2), 2)
            dl, al = X[0], X[1]
        else:
            dl, al = D.view(LK, n, Wo), A.view(LK, n, Wi)
            rn = torch.stack([_sqnorm(dl, 2), _sqnorm(al, 2)])
            tot = torch.stack([_sqnorm(dl.sum(1), 1), _sqnorm(al.sum(1), 1)])
        M2 = _sqnorm(torch.bmm(al.transpose(1, 2), dl).view(LK, -1), 1)
    Sr = rn.sum(2)  # (2, LK): sum of the row norms of D, of A
    out = torch.stack([torch.linalg.vecdot(rn[0], rn[1]), M2, Sr[0], tot[0], Sr[1], tot[1]])
    return out.to(F64).view(6, L, Kg)


def centred_stats(A: Tensor, D: Tensor, blk: Blocks) -> Tensor:
    """(6, L, Kg) float64 as :func:`plain_stats`, from the bin-centred factors (module docstring): V keeps the
    factors' relative precision however much the mean gradient dominates."""
    L, Kg, n, Wi = A.shape
    Wo = D.shape[3]
    cnt = blk.count
    inv_n = (1.0 / cnt.clamp_min(1.0))[:, None]
    c, c_lo, delta = _centre(D, blk, inv_n)
    ca, ca_lo, alpha = _centre(A, blk, inv_n)
    p = torch.matmul(c_lo[:, :, None], delta.transpose(2, 3))[:, :, 0]  # (L, Kg, n): c . delta_r
    q = torch.matmul(ca_lo[:, :, None], alpha.transpose(2, 3))[:, :, 0]
    x, y = torch.linalg.vector_norm(delta, dim=3).square_(), torch.linalg.vector_norm(alpha, dim=3).square_()
    t1, t2 = torch.add(x, p, alpha=2), torch.add(y, q, alpha=2)
    X, Y, T1, T2, T12, PQ = torch.stack([x, y, t1, t2, t1 * t2, p * q]).sum(3, dtype=F64)
    dl, al = delta.view(L * Kg, n, Wo), alpha.view(L * Kg, n, Wi)
    if gram_form(n, Wo, Wi):
        Gd, Ga = torch.bmm(dl, dl.transpose(1, 2)), torch.bmm(al, al.transpose(1, 2))
        M2 = torch.linalg.vecdot(Gd.view(L, Kg, -1), Ga.view(L, Kg, -1))
    else:
        M2 = torch.linalg.vector_norm(torch.bmm(al.transpose(1, 2), dl).view(L, Kg, -1), dim=2).square_()
    cc, ee = torch.linalg.vecdot(c, c), torch.linalg.vecdot(ca, ca)
    S_w = torch.addcmul(T12, cc * cnt, ee).addcmul_(cc, T2).addcmul_(ee, T1)
    V_w = (T12 - 2 * PQ).addcmul_(cc, Y).addcmul_(ee, X).sub_(M2.to(F64) * inv_n[:, 0])
    S_d, S_a = torch.addcmul(T1, cc, cnt), torch.addcmul(T2, ee, cnt)
    return torch.stack([S_w, (S_w - V_w).mul_(cnt), S_d, (S_d - X).mul_(cnt), S_a, (S_a - Y).mul_(cnt)])


def pick_rows(swapped: list[bool], want: list[tuple[bool, bool]] | None = None) -> list[int]:
    """Rows of the flattened (6 L) :func:`plain_stats` output for layers ``swapped`` (bias on A's side) holding
    (``want`` per layer: weight, bias trainable; None: both): first every S, then in the same order every
    ||sum g||^2."""
    L, S, T = len(swapped), [], []
    for j, sw in enumerate(swapped):
        w, b = want[j] if want is not None else (True, True)
        for r, on in ((0, w), (4 if sw else 2, b)):
            if on:
                S.append(r * L + j)
                T.append((r + 1) * L + j)
    return S + T


def pass_stats(A: Tensor, D: Tensor, blk: Blocks, pick: Tensor, pair: Tensor | None = None) -> Tensor:
    """(2 H, Kg) float64 the rows ``pick`` (:func:`pick_rows`: H values of S, then their H values of
    ||sum g||^2) of :func:`plain_stats` when every picked S / V (bins of >= 2 rows) is at most ``KAPPA_MAX[dtype]``
    (grad_var then within ~4e-5 of exact for float32 factors), else of :func:`centred_stats` (``pair``: as
    :func:`plain_stats`)."""
    Kg = blk.count.shape[0]
    vals = plain_stats(A, D, blk, pair).view(-1, Kg).index_select(0, pick)
    if needs_centring(vals, blk, A.dtype, gram_form(A.shape[2], D.shape[3], A.shape[3])):
        return centred_stats(A, D, blk).view(-1, Kg).index_select(0, pick)
    return vals


def needs_centring(vals: Tensor, blk, dtype, gram: bool) -> bool:
    """Whether any bin (of >= 2 rows) of ``vals`` (2 H, Kc) (H values of S, then their ||sum g||^2) has S / V above
    ``KAPPA_MAX[dtype]`` for the Gram (``gram``) or direct form: ||sum g||^2 w > S  <=>  S > kappa V, with
    V = S - ||sum g||^2 / n and w = kappa / (kappa - 1) / n (cached on the layout ``blk``, per dtype and form)."""
    w = blk.limit.get((dtype, gram))
    if w is None:
        k = KAPPA_MAX.get(dtype, (1.0, 1.0))[0 if gram else 1]
        w = blk.limit[dtype, gram] = torch.where(blk.count > 1, k / (k - 1) / blk.count.clamp_min(1.0), 0.0)
    H = vals.shape[0] // 2
    return bool((vals[H:] * w > vals[:H]).any())


def linear_stats(A: Tensor, D: Tensor, blk: Blocks, swap: Tensor | None = None) -> Tensor:
    """(4, L, Kg) float64 per layer and bin: weight S_w = sum ||g_i||^2 and ||sum g_i||^2, then the same for the
    bias, from the stacked inputs A (L, Kg, n, Wi) and output gradients D (L, Kg, n, Wo) (:func:`pass_stats`;
    ``swap`` (L, 1) bool: layers whose bias gradient is A's rows, None for none)."""
    L = A.shape[0]
    swapped = [False] * L if swap is None else [bool(v) for v in swap.reshape(-1).tolist()]
    rows = pick_rows(swapped)
    vals = pass_stats(A, D, blk, torch.tensor(rows, device=A.device))
    H = L * 2  # pick_rows: per layer (weight, bias) S values, then their ||sum g||^2 in the same order
    out = torch.empty(4, L, vals.shape[1], dtype=F64, device=A.device)
    out[0], out[2], out[1], out[3] = vals[0:H:2], vals[1:H:2], vals[H::2], vals[H + 1 :: 2]
    return out


def fusion_groups(shapes: list[tuple[int, int]], n: int, b: int, slack: float = 2**22) -> list[tuple[list, list]]:
    """The stacked passes over layers of (input, output) widths ``shapes``: (layer indices, swapped flags) each.
    A layer is oriented with its narrower side as the input (``swapped``: input and output gradient exchanged;
    ||sum d a^T|| = ||sum a d^T||, the bias then sits on the input side), layers of one oriented shape share a
    pass, and a shape joins an earlier (costlier) pass when padding it to that pass's widths wastes at most
    ``slack`` multiply-adds (about what a pass costs in fixed overhead); cost b min(n (o + i), o i) a layer."""

    def cost(i, o):
        return b * min(n * (o + i), o * i)

    by: dict = {}
    for j, (i, o) in enumerate(shapes):
        by.setdefault((min(i, o), max(i, o)), []).append(j)
    passes: list[list] = []  # [widths (Wi, Wo), members, cost of the members]
    for sh, js in sorted(by.items(), key=lambda kv: -len(kv[1]) * cost(*kv[0])):
        best = None
        for ps in passes:
            W = (max(ps[0][0], sh[0]), max(ps[0][1], sh[1]))
            waste = (len(ps[1]) + len(js)) * cost(*W) - ps[2] - len(js) * cost(*sh)
            if waste <= slack and (best is None or waste < best[0]):
                best = (waste, ps, W)
        if best is None:
            passes.append([sh, list(js), len(js) * cost(*sh)])
        else:
            best[1][0], best[1][2] = best[2], best[1][2] + len(js) * cost(*sh)
            best[1][1].extend(js)
    return [(js, [shapes[j][0] > shapes[j][1] for j in js]) for _, js, _ in passes]
