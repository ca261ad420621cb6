"""The ``hooks`` per-sample gradient engine: one forward + backward per chunk (see :mod:`flowmatch.persample`).

Forward hooks capture each layer's input a and (tensor hook) the output gradient delta, from which the per-sample
gradients follow exactly: Linear ``g_i = sum_s delta_is a_is^T`` with ``||g_i||^2 = sum_{s,s'} (delta_s .
delta_s')(a_s . a_s')`` (Gram trick, used when the S x S Gram matrix is smaller than the weight), Conv1d/Conv2d by
the weight gradient of a convolution with ``groups = b * groups`` (samples side by side as channel groups),
LayerNorm/GroupNorm ``g_gamma = sum delta * xhat``, ``g_beta = sum delta``, Embedding by scattering delta into the
looked-up rows (:mod:`flowmatch.persample_layers`: which layers qualify, the graph check, the convolution rule).
Each layer's per-bin sums (or their squared norms) are formed for all bins at once as the backward reaches it
(:mod:`flowmatch.binreduce`); when only the squared norms of the per-bin sums are kept, Linear layers applied once
per sample are held back and reduced together after the backward, a few stacked passes for all of them
(:mod:`flowmatch.binreduce_linear`). Violations of its assumptions raise
:class:`~flowmatch.persample.HooksUnsupported`.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.binreduce import (
    Sink,
    add_materialised,
    bin_sum,
    bin_sum64,
    linear_rows,
    sqnorm64,
    use_centred,
    vdot,
)
from flowmatch.binreduce_linear import blocks_for
from flowmatch.binreduce_passes import RowPasses, is_row_linear
from flowmatch.gradvar_plan import Chunk
from flowmatch.persample import F64, ChunkResult, HooksUnsupported, Job, _check_losses, _sqnorm
from flowmatch.persample_layers import CONV, conv_weight, graph_scan, hook_plan


def use_gram(S: int, rows: int, cols: int) -> bool:
    """Gram trick for a (rows x cols) weight seen over S positions iff the S x S Gram is the smaller matrix."""
    return S > 1 and S * S < rows * cols


class _Rec:
    """What the forward hook records of one layer: call count, first input and output, their versions, and for a
    held layer (``edge``) the gradient edge of its output (its gradient is asked of the backward directly)."""

    __slots__ = ("calls", "x", "xv", "out", "ov", "edge")

    def __init__(self) -> None:
        self.calls, self.x, self.xv, self.out, self.ov, self.edge = 0, None, 0, None, 0, None


def _fwd_hook(rec: _Rec, on_grad, hold: bool, mod, args, out) -> None:
    """Forward hook: count the call; on the first, record input and output, and either hook ``on_grad`` on the
    output or (``hold`` and a Linear layer applied once per sample) record the output's gradient edge, taken before
    any in-place change of the output."""
    rec.calls += 1
    if rec.calls == 1 and args and isinstance(out, Tensor) and out.requires_grad:
        rec.x, rec.xv, rec.out, rec.ov = args[0], args[0]._version, out, out._version
        if hold and is_row_linear(mod, args[0], out):
            rec.edge = torch.autograd.graph.get_gradient_edge(out)
        else:
            out.register_hook(partial(on_grad, mod, rec))


def _rows_of(x: Tensor, b: int) -> Tensor:
    """x as (b, F) rows (a view; x itself when it is already two-dimensional)."""
    return x if x.dim() == 2 else x.reshape(b, -1)


def _linear(x: Tensor, d: Tensor, chunk: Chunk, targets: dict, dense: bool) -> dict:
    """Linear layer: per-sample float64 squared norms {attr: (b,)} (S = 1: ||d_i||^2 ||a_i||^2 and ||d_i||^2;
    S > 1 positions: the Gram trick or the materialised per-sample gradients); per-bin sums into ``targets``
    (:func:`~flowmatch.binreduce.linear_rows`; rows are (sample, position) pairs, float64 products for S > 1)."""
    b, i, o = x.shape[0], x.shape[-1], d.shape[-1]
    a, dd = x.reshape(b, -1, i), d.reshape(b, -1, o)
    S, res = a.shape[1], {}
    if S == 1:
        a2, d2 = a.view(b, i), dd.view(b, o)
        centred = use_centred(a2, chunk.rows, o)
        if centred:  # float32 rows, float64 accumulators
            an, dn, sums = sqnorm64(a2), sqnorm64(d2), bin_sum64(d2, chunk.rows)
        else:
            a2, d2 = a2.to(F64), d2.to(F64)
            an, dn, sums = vdot(a2, a2), vdot(d2, d2), bin_sum(d2, chunk.rows)
        if "weight" in targets:
            res["weight"] = dn * an
            linear_rows(a2, d2, chunk.rows, targets["weight"], dense, centred)
        if "bias" in targets:
            targets["bias"].add_(sums if dense else vdot(sums, sums))
            res["bias"] = dn
        return res
    if "weight" in targets:
        if use_gram(S, o, i):
            a64, d64 = a.to(F64), dd.to(F64)
            res["weight"] = (torch.bmm(d64, d64.transpose(1, 2)) * torch.bmm(a64, a64.transpose(1, 2))).sum((1, 2))
        else:
            res["weight"] = _sqnorm(torch.bmm(dd.transpose(1, 2), a))
        linear_rows(
            a.reshape(-1, i).to(F64), dd.reshape(-1, o).to(F64), chunk.rows_for(S), targets["weight"], dense, False
        )
    if "bias" in targets:
        res["bias"] = add_materialised(dd.sum(1), chunk.rows, targets["bias"], dense)
    return res


def _embedding(m: nn.Embedding, x: Tensor, d: Tensor, chunk: Chunk, target: Tensor, dense: bool) -> Tensor:
    """Embedding: per-sample float64 ||g_i||^2 (rows looked up several times add up; padding_idx rows get no
    gradient); the per-bin sums (scattered into (Kc, N, D)) go to ``target``."""
    b = x.shape[0]
    idx, dd = x.reshape(b, -1), d.reshape(b, -1, d.shape[-1]).to(F64)
    if m.padding_idx is not None:
        dd = dd * (idx != m.padding_idx).unsqueeze(-1).to(dd.dtype)
    N, D, S = m.num_embeddings, dd.shape[-1], idx.shape[1]
    if S == 1:
        sq = dd[:, 0].pow(2).sum(1)
    elif use_gram(S, N, D):
        sq = (torch.bmm(dd, dd.transpose(1, 2)) * (idx[:, :, None] == idx[:, None, :])).sum((1, 2))
    else:
        rows = (torch.arange(b, device=idx.device)[:, None] * N + idx).reshape(-1)
        sq = dd.new_zeros(b * N, D).index_add_(0, rows, dd.reshape(-1, D)).reshape(b, -1).pow(2).sum(1)
    key = (chunk.kb[:, None] * N + idx).reshape(-1)
    sums = dd.new_zeros(chunk.Kc * N, D).index_add_(0, key, dd.reshape(-1, D)).view(chunk.Kc, N * D)
    target.view(sums.shape).add_(sums) if dense else target.add_(vdot(sums, sums))
    return sq


def _layer_grads(m: nn.Module, x: Tensor, d: Tensor, chunk: Chunk, targets: dict, dense: bool) -> dict:
    """Per-sample float64 squared norms {attr: (b,)} of one layer's parameters (those in ``targets``: attr ->
    this chunk's slice of the per-bin results, :class:`~flowmatch.binreduce.Sink`) from its input x and output
    gradient d; adds the per-bin sums (or their squared norms) into ``targets``. Factors in bfloat16/float16
    (autocast) are promoted to float32 first."""
    if isinstance(m, nn.Embedding):
        return {"weight": _embedding(m, x, d, chunk, targets["weight"], dense)}
    wd = torch.promote_types(torch.promote_types(x.dtype, d.dtype), torch.float32)
    x, d = x.to(wd), d.to(wd)
    if isinstance(m, nn.Linear):
        return _linear(x, d, chunk, targets, dense)
    b, rows, res = x.shape[0], chunk.rows, {}
    if isinstance(m, CONV):
        if "weight" in targets:
            res["weight"] = add_materialised(conv_weight(m, x, d), rows, targets["weight"], dense)
        gb = d.reshape(b, d.shape[1], -1).sum(2)
    else:  # LayerNorm, GroupNorm; ``red``: the dimension of ``shape`` that runs over the positions
        if isinstance(m, nn.LayerNorm):
            shape, red, xhat = (b, -1, *m.normalized_shape), 1, F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            shape, red, xhat = (b, x.shape[1], -1), 2, F.group_norm(x, m.num_groups, None, None, m.eps)
        if "weight" in targets:
            res["weight"] = add_materialised((d * xhat).reshape(shape).sum(red), rows, targets["weight"], dense)
        gb = d.reshape(shape).sum(red)
    if "bias" in targets:
        res["bias"] = add_materialised(gb, rows, targets["bias"], dense)
    return res


class HooksEngine:
    """One forward + backward per chunk; see the module docstring. Built once per model layout and reused (the
    caller caches it): the graph scan runs on the first chunk, and ``verify`` - comparing the first sample's
    ||g||^2 with a direct backward on that sample alone (rtol 1e-3), raising HooksUnsupported on disagreement -
    on the first call only."""

    def __init__(self, model: nn.Module, params: dict, verify: bool = True) -> None:
        self.plan, self.verify = hook_plan(model, params), verify
        self._structure: tuple = (None, ())  # (set of called layers, the lowest of them) from the last scan
        self._ctx: tuple | None = None
        self._rows: list = []  # (layer, input, output gradient) of one-row-per-sample Linear layers
        self._passes: dict = {}  # held layers, their widths, rows per bin and chunk size -> the stacked passes

    def _on_grad(self, m: nn.Module, rec: _Rec, delta: Tensor) -> None:
        """Tensor hook on a layer's output: turn (input, output gradient) into per-sample results at once, so
        neither is kept alive longer than in an ordinary backward (one-row-per-sample Linear layers, when only
        squared norms are kept, are held instead: :func:`_fwd_hook`)."""
        chunk, sink, sq, autocast = self._ctx
        names = self.plan[m]  # hooks run under the backward's grad mode (create_graph=False: no graph)
        x = rec.x.detach()
        rec.x = rec.out = None
        targets = {a: sink.targets[n] for a, n in names.items()}
        if autocast:
            with torch.autocast(delta.device.type, enabled=False):
                got = _layer_grads(m, x, delta, chunk, targets, sink.dense)
        else:
            got = _layer_grads(m, x, delta, chunk, targets, sink.dense)
        sq.update({names[a]: v for a, v in got.items()})

    def _row_layers(self, chunk: Chunk, sink: Sink) -> float:
        """The Linear layers held back by :func:`_fwd_hook` (``self._rows``: layer, input rows, output gradient
        rows), stacked into as few passes as pay off (:class:`~flowmatch.binreduce_passes.RowPasses`, cached per
        layers, widths, padded bin size and chunk size); their per-bin sums of ||g_i||^2 and squared norms of the
        per-bin gradient sums go to ``sink.stats``. Returns sample 0's ||g_0||^2 over these layers when the engine
        still has to verify itself (else 0)."""
        items, self._rows = self._rows, []
        if not items:
            return 0.0
        blocks = blocks_for(chunk.rows)
        n_max = max(blk.n for blk in blocks)
        key = (tuple(m for m, _, _ in items), tuple(x.shape[1:] + d.shape[1:] for _, x, d in items), n_max, len(chunk))
        passes = self._passes.get(key)
        if passes is None:
            shapes = [(x.shape[1], d.shape[1]) for _, x, d in items]
            owners = [self.plan[m] for m, _, _ in items]
            P, dev = sink.stats.shape[2], sink.stats.device
            passes = self._passes[key] = RowPasses(shapes, owners, sink.cols, P, n_max, len(chunk), dev)
        passes.run(items, chunk.rows, sink.stats.view(sink.stats.shape[0], -1))  # stats viewed (Kc, 2 P)
        if not self.verify:
            return 0.0
        got = 0.0
        for m, x, d in items:
            dn, an = float(d[0].double().square().sum()), float(x[0].double().square().sum())
            got += dn * an * ("weight" in self.plan[m]) + dn * ("bias" in self.plan[m])
        return got

    def __call__(self, job: Job, chunk: Chunk, sink: Sink) -> ChunkResult:
        """Per-sample results of one chunk from one forward and one (truncated) backward pass."""
        b, params = len(chunk), job.params
        recs = {m: _Rec() for m in self.plan}
        hold = not sink.dense
        handles = [m.register_forward_hook(partial(_fwd_hook, r, self._on_grad, hold)) for m, r in recs.items()]
        try:
            losses = _check_losses(job.loss_fn(job.model, chunk.path), b)
        finally:
            for h in handles:
                h.remove()
        used = {m: r for m, r in recs.items() if r.calls}
        for m, r in used.items():
            if r.calls > 1 or r.x is None or r.x.shape[:1] != (b,) or r.x._version != r.xv:
                raise HooksUnsupported(
                    f"layer owning {sorted(self.plan[m].values())} is called {r.calls} times "
                    "per forward, or its input is not batch-first or is modified in place"
                )
        if self._structure[0] != set(used):  # graph scan on the first chunk (and whenever the layers change)
            outs = {r.out.grad_fn: m for m, r in used.items() if r.out is not None}
            uses, below = graph_scan(losses.grad_fn, set(outs)) if losses.grad_fn is not None else ({}, {})
            for m, r in recs.items():
                if any(uses.get(id(params[n]), 0) != r.calls for n in self.plan[m].values()):
                    raise HooksUnsupported(
                        f"parameters {sorted(self.plan[m].values())} are used outside their layer's forward"
                    )
            self._structure = (set(used), [m for f, m in outs.items() if f in below and not below[f]])
        sq: dict = {}
        dev = losses.device.type
        self._ctx = (chunk, sink, sq, torch.is_autocast_enabled(dev) if dev in ("cuda", "cpu") else False)
        held = [(m, r) for m, r in used.items() if r.edge is not None]
        inputs: list = [r.edge for _, r in held]  # the held layers' output gradients, returned
        if any(r.out._version != r.ov for r in used.values() if r.edge is None):
            inputs += list(params.values())  # an output was modified in place: its grad_fn is no longer a stop
        else:  # backprop only down to the lowest hooked outputs: no weight gradients, hooks fire on the way
            inputs += [used[m].out for m in self._structure[1] if used[m].edge is None]
        del used, recs
        try:
            if inputs:
                grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                self._rows = [
                    (m, _rows_of(r.x.detach(), b), _rows_of(g, b)) for (m, r), g in zip(held, grads) if g is not None
                ]
            del held
            with torch.autocast(dev, enabled=False) if self._ctx[3] else contextlib.nullcontext():
                row_sq0 = self._row_layers(chunk, sink)
        finally:
            self._ctx, self._rows = None, []
        if self.verify:
            self.verify = False
            self._check_first_sample(job, chunk, sq, row_sq0)
        return ChunkResult(losses.detach(), sq)

    @staticmethod
    def _check_first_sample(job: Job, chunk: Chunk, sq: dict, extra: float) -> None:
        """Raise HooksUnsupported unless the hooks' ||g_0||^2 (``sq``'s per-sample values at sample 0, plus
        ``extra`` from the stacked Linear layers) matches a direct backward on sample 0 alone."""
        gs = torch.autograd.grad(
            job.loss_fn(job.model, chunk.path[0:1]).sum(), list(job.params.values()), allow_unused=True
        )
        ref = sum(float(_sqnorm(g.reshape(1, -1))) for g in gs if g is not None)
        per = torch.stack(list(sq.values())) if sq else torch.zeros(1, len(chunk), dtype=F64)
        got, scale = float(per[:, 0].sum()) + extra, float(per.mean(1).sum()) + extra
        if abs(got - ref) > 1e-3 * max(abs(got), abs(ref)) + 1e-7 * scale:
            raise HooksUnsupported(
                f"hooks ||g_0||^2 = {got:.6g} but a direct backward gives {ref:.6g} "
                "(the model mixes samples or uses a layer in an unsupported way)"
            )
