"""Exact per-sample gradient engines used by :mod:`flowmatch.gradvar` (plain torch).

An engine is called on one chunk of the probe (every tensor sliced along dim 0, b samples, sorted by bin) with
``kb`` (b,) the bin of each sample, ``segs`` = [(bin, start, end), ...] the runs of equal bins, and ``acc`` the
per-parameter (K, *shape) accumulators (parameter dtype). It adds, for every parameter name,

    acc[name][k] += sum_{i in chunk, kb[i] = k} g_i,     g_i = d l_i / d theta,

and returns ``(losses (b,), sq)`` with ``sq[name]`` (b,) = ||g_i||^2 restricted to that parameter (a missing name
means a zero gradient).

The per-sample gradient is the gradient of ``loss_fn(model, chunk_i)`` for the single-sample chunk ``chunk_i``.
No engine touches ``p.grad``: all use ``torch.autograd.grad`` or ``torch.func``.

* ``loop``  -- one forward + backward per sample (the reference; works for any model).
* ``vmap``  -- ``torch.func.vmap(grad(functional_call))`` over the chunk: any layer type, memory b x P.
* ``hooks`` -- ONE forward + backward of ``sum_i l_i`` per chunk; forward hooks capture each layer's input a
  and (tensor hook) the output gradient delta, from which the per-sample gradients follow exactly:
  Linear ``g_i = sum_s delta_is a_is^T`` with ``||g_i||^2 = sum_{s,s'} (delta_s . delta_s')(a_s . a_s')``
  (Gram trick, used when the S x S Gram matrix is smaller than the weight), Conv1d/Conv2d by the weight gradient
  of a convolution with ``groups = b * groups`` (samples side by side as channel groups), LayerNorm/GroupNorm
  ``g_gamma = sum delta * xhat``, ``g_beta = sum delta``, Embedding by scattering delta into the looked-up rows.
  Each layer is processed inside its output-gradient hook (so nothing outlives an ordinary backward), the
  backward stops at the lowest hooked outputs (no weight gradients), and the per-bin sums are formed on the fly
  (one matmul per run of equal bins for a Linear). Requires that every trainable parameter belongs to exactly
  one such layer, that each layer is called at most once per forward on a batch-first input, and that no
  parameter is used outside its layer; violations are detected (call counts, autograd-graph use counts, and one
  direct backward on the first sample) and raise :class:`HooksUnsupported` so the caller falls back to ``vmap``.
"""
from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Chunk = dict  # dict[str, Tensor], batch dim first


class HooksUnsupported(RuntimeError):
    """The hooks engine cannot be exact for this model (the caller falls back to ``vmap``)."""


def slice_chunk(chunk: Chunk, i: int, j: int) -> Chunk:
    return {k: v[i:j] for k, v in chunk.items()}


def _check_losses(losses: Tensor, b: int) -> Tensor:
    if losses.shape != (b,):
        raise ValueError(f"loss_fn must return per-sample losses of shape ({b},), got {tuple(losses.shape)}")
    return losses


def loop_engine(model, loss_fn, chunk: Chunk, kb: Tensor, segs: list, params: dict, acc: dict):
    """Reference: ``b`` separate forward/backward passes on single-sample chunks."""
    b, names, ps = kb.shape[0], list(params), list(params.values())
    sq = {n: p.new_zeros(b) for n, p in params.items()}
    losses = []
    for k, s, e in segs:
        for i in range(s, e):
            li = _check_losses(loss_fn(model, slice_chunk(chunk, i, i + 1)), 1)
            for n, g in zip(names, torch.autograd.grad(li.sum(), ps, allow_unused=True)):
                if g is not None:
                    sq[n][i] = g.pow(2).sum()
                    acc[n][k] += g
            losses.append(li.detach())
    return torch.cat(losses), sq


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, chunk: Chunk) -> Tensor:
        return self.loss_fn(self.model, chunk)


def vmap_engine(model, loss_fn, chunk: Chunk, kb: Tensor, segs: list, params: dict, acc: dict):
    """``vmap(grad(l_i))`` over the chunk with ``functional_call``; buffers are used as stored in the model."""
    wrap, names = _LossModule(model, loss_fn), list(params)

    def one(pvals, sample):
        batch = {k: v.unsqueeze(0) for k, v in sample.items()}
        li = torch.func.functional_call(wrap, {"model." + n: v for n, v in zip(names, pvals)}, (batch,))
        li = _check_losses(li, 1)[0]
        return li, li.detach()

    with warnings.catch_warnings():  # functorch's fallback for ops without a batching rule is exact, only slower
        warnings.filterwarnings("ignore", message=".*not yet implemented the batching rule.*")
        grads, losses = torch.func.vmap(torch.func.grad(one, has_aux=True), in_dims=(None, 0))(
            tuple(p.detach() for p in params.values()), chunk)
    for n, g in zip(names, grads):
        acc[n].index_add_(0, kb, g)
    return losses, {n: g.pow(2).flatten(1).sum(1) for n, g in zip(names, grads)}


# ----------------------------------------------------------------------------------------------- hooks engine
_CONV = (nn.Conv1d, nn.Conv2d)
_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def use_gram(S: int, rows: int, cols: int) -> bool:
    """Gram trick for a (rows x cols) weight seen over S positions iff the S x S Gram is the smaller matrix."""
    return S > 1 and S * S < rows * cols


def _why_unsupported(m: nn.Module) -> str | None:
    kind = next((k for k in _KINDS if isinstance(m, k)), None)
    if kind is None:
        return f"{type(m).__name__} has no per-sample hook rule"
    if type(m).forward is not kind.forward:
        return f"{type(m).__name__} overrides forward"
    if isinstance(m, _CONV):
        if m.padding_mode != "zeros" or m.padding == "same" and any(d * (k - 1) % 2 for d, k in
                                                                      zip(m.dilation, m.kernel_size)):
            return f"{type(m).__name__} padding {m.padding!r}/{m.padding_mode}"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse or m.scale_grad_by_freq):
        return "Embedding with max_norm/sparse/scale_grad_by_freq"
    return None


def hook_plan(model: nn.Module, params: dict) -> dict:
    """Map each layer owning trainable parameters to ``{attr: param_name}``; raise HooksUnsupported if any
    trainable parameter is not owned by exactly one supported layer."""
    by_id = {id(p): n for n, p in params.items()}
    owners: dict[int, set] = {}
    plan: dict[nn.Module, dict] = {}
    for m in model.modules():
        for attr, p in m.named_parameters(recurse=False):
            if id(p) in by_id:
                owners.setdefault(id(p), set()).add(id(m))
                plan.setdefault(m, {})[attr] = by_id[id(p)]
    shared = [by_id[i] for i, s in owners.items() if len(s) > 1]
    if shared:
        raise HooksUnsupported(f"parameters shared between layers: {shared}")
    for m in plan:
        why = _why_unsupported(m)
        if why:
            raise HooksUnsupported(f"{why} (parameters {sorted(plan[m].values())})")
    return plan


class _Rec:
    __slots__ = ("calls", "x", "xv", "out", "ov")

    def __init__(self) -> None:
        self.calls, self.x, self.xv, self.out, self.ov = 0, None, 0, None, 0


def _fwd_hook(rec: _Rec, on_grad, mod, args, out) -> None:
    rec.calls += 1
    if rec.calls == 1 and args and isinstance(out, Tensor) and out.requires_grad:
        rec.x, rec.xv, rec.out, rec.ov = args[0], args[0]._version, out, out._version
        out.register_hook(partial(on_grad, mod, rec))


def _graph_scan(root, marked: set) -> tuple[dict[int, int], dict]:
    """Walk the autograd graph below ``root``: the number of edges into each leaf (by id of the leaf tensor),
    and for every node whether some node of ``marked`` lies strictly below it."""
    uses: dict[int, int] = {}
    kids: dict = {}
    below: dict = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            below[node] = any(c in marked or below[c] for c in kids[node])
            continue
        if node in kids:
            continue
        kids[node] = [c for c, _ in node.next_functions if c is not None]
        for c in kids[node]:
            if hasattr(c, "variable"):
                uses[id(c.variable)] = uses.get(id(c.variable), 0) + 1
        stack.append((node, True))
        stack.extend((c, False) for c in kids[node] if c not in kids)
    return uses, below


def _sqnorm(g: Tensor) -> Tensor:
    """(b,) squared norms of the per-sample tensors g (b, ...)."""
    g = g.reshape(g.shape[0], -1)
    return (g * g).sum(1)


def _linear_weight(a: Tensor, d: Tensor, kb: Tensor, segs: list, acc: Tensor) -> Tensor:
    """a (b,S,i), d (b,S,o): per-sample ||sum_s d_s a_s^T||^2; adds the per-bin sums of sum_s d_s a_s^T."""
    b, S, i = a.shape
    o = d.shape[2]
    if S == 1:
        sq = _sqnorm(d) * _sqnorm(a)
    elif use_gram(S, o, i):
        sq = (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    else:
        g = torch.bmm(d.transpose(1, 2), a)
        acc.index_add_(0, kb, g)
        return _sqnorm(g)
    d2, a2 = d.reshape(b, S * o), a.reshape(b, S * i)
    for k, s, e in segs:
        acc[k].addmm_(d2[s:e].view(-1, o).T, a2[s:e].view(-1, i))
    return sq


def _conv_weight(m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    """(b, *weight.shape) per-sample weight gradients of a Conv1d/Conv2d from its input and output gradient."""
    b, G, k = x.shape[0], m.groups, m.kernel_size
    if G == 1 and all(v == 1 for v in (*k, *m.stride)) and all(p == 0 for p in m.padding):
        return torch.bmm(d.reshape(b, d.shape[1], -1), x.reshape(b, x.shape[1], -1).transpose(1, 2)).reshape(
            b, *m.weight.shape)
    pad = [dl * (kk - 1) // 2 for dl, kk in zip(m.dilation, k)] if m.padding == "same" else \
        [0] * len(k) if m.padding == "valid" else list(m.padding)
    w = m.weight.new_empty((b * m.weight.shape[0], *m.weight.shape[1:]))
    g = torch.ops.aten.convolution_backward(
        d.reshape(1, -1, *d.shape[2:]), x.reshape(1, -1, *x.shape[2:]), w, None, list(m.stride), pad,
        list(m.dilation), False, [0] * len(k), b * G, [False, True, False])[1]
    return g.reshape(b, *m.weight.shape)


def _layer_grads(m: nn.Module, x: Tensor, d: Tensor, kb: Tensor, segs: list, acc: dict) -> dict:
    """Per-sample squared norms {attr: (b,)} of one layer's parameters (those in ``acc``: attr -> accumulator)
    from its input x and output gradient d; adds the per-bin gradient sums into ``acc``."""
    b, res = x.shape[0], {}
    if isinstance(m, nn.Linear):
        a, dd = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])
        if "weight" in acc:
            res["weight"] = _linear_weight(a, dd, kb, segs, acc["weight"])
        gb = dd.sum(1)
    elif isinstance(m, _CONV):
        if "weight" in acc:
            g = _conv_weight(m, x, d)
            acc["weight"].index_add_(0, kb, g)
            res["weight"] = _sqnorm(g)
        gb = d.reshape(b, d.shape[1], -1).sum(2)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        if isinstance(m, nn.LayerNorm):
            shape = (b, -1, *m.normalized_shape)
            xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            shape = (b, x.shape[1], -1)
            xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
        red = 1 if isinstance(m, nn.LayerNorm) else 2
        if "weight" in acc:
            g = (d * xhat).reshape(shape).sum(red)
            acc["weight"].index_add_(0, kb, g)
            res["weight"] = _sqnorm(g)
        gb = d.reshape(shape).sum(red)
    else:  # Embedding
        idx, dd = x.reshape(b, -1), d.reshape(b, -1, d.shape[-1])
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
        acc["weight"].view(-1, D).index_add_(0, (kb[:, None] * N + idx).reshape(-1), dd.reshape(-1, D))
        return {"weight": sq}
    if "bias" in acc:
        acc["bias"].index_add_(0, kb, gb)
        res["bias"] = _sqnorm(gb)
    return res


class HooksEngine:
    """One forward + backward per chunk; see the module docstring. ``verify``: on the first chunk, compare the
    first sample's ||g||^2 with a direct backward on that sample alone (rtol 1e-3) and raise HooksUnsupported
    on disagreement."""

    def __init__(self, model: nn.Module, params: dict, verify: bool = True) -> None:
        self.plan, self.verify = hook_plan(model, params), verify
        self._structure: tuple = (None, ())  # (set of called layers, the lowest of them) from the last scan

    def _on_grad(self, m: nn.Module, rec: _Rec, delta: Tensor) -> None:
        """Tensor hook on a layer's output: turn (input, output gradient) into per-sample results at once, so
        neither is kept alive longer than in an ordinary backward."""
        kb, segs, acc, sq = self._ctx
        names = self.plan[m]  # hooks run under the backward's grad mode (create_graph=False: no graph)
        got = _layer_grads(m, rec.x.detach(), delta, kb, segs, {a: acc[n] for a, n in names.items()})
        sq.update({names[a]: v for a, v in got.items()})
        rec.x = rec.out = None

    def __call__(self, model, loss_fn, chunk: Chunk, kb: Tensor, segs: list, params: dict, acc: dict):
        b = kb.shape[0]
        recs = {m: _Rec() for m in self.plan}
        handles = [m.register_forward_hook(partial(_fwd_hook, r, self._on_grad)) for m, r in recs.items()]
        try:
            losses = _check_losses(loss_fn(model, chunk), b)
        finally:
            for h in handles:
                h.remove()
        used = {m: r for m, r in recs.items() if r.calls}
        for m, r in used.items():
            if r.calls > 1 or r.x is None or r.x.shape[:1] != (b,) or r.x._version != r.xv:
                raise HooksUnsupported(f"layer owning {sorted(self.plan[m].values())} is called {r.calls} times "
                                       "per forward, or its input is not batch-first or is modified in place")
        if self._structure[0] != set(used):  # graph scan on the first chunk (and whenever the layers change)
            outs = {r.out.grad_fn: m for m, r in used.items() if r.out is not None}
            uses, below = _graph_scan(losses.grad_fn, set(outs)) if losses.grad_fn is not None else ({}, {})
            for m, r in recs.items():
                if any(uses.get(id(params[n]), 0) != r.calls for n in self.plan[m].values()):
                    raise HooksUnsupported(f"parameters {sorted(self.plan[m].values())} are used outside "
                                           "their layer's forward")
            self._structure = (set(used), [m for f, m in outs.items() if f in below and not below[f]])
        sq: dict = {}
        self._ctx = (kb, segs, acc, sq)
        if any(r.out._version != r.ov for r in used.values()):
            inputs = list(params.values())  # an output was modified in place: its grad_fn is no longer a stop
        else:  # backprop only down to the lowest hooked outputs: no weight gradients, hooks fire on the way
            inputs = [used[m].out for m in self._structure[1]]
        del used, recs
        if inputs:
            torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        self._ctx = None
        if self.verify:
            self.verify = False
            gs = torch.autograd.grad(loss_fn(model, slice_chunk(chunk, 0, 1)).sum(), list(params.values()),
                                     allow_unused=True)
            flat = torch.cat([g.reshape(-1) for g in gs if g is not None] + [losses.new_zeros(1)])
            ref = float(torch.linalg.vector_norm(flat, dtype=torch.float64)) ** 2
            per = torch.stack([s.double() for s in sq.values()]) if sq else torch.zeros(1, b, dtype=torch.float64)
            got, scale = float(per[:, 0].sum()), float(per.mean(1).sum())
            if abs(got - ref) > 1e-3 * max(abs(got), abs(ref)) + 1e-7 * scale:
                raise HooksUnsupported(f"hooks ||g_0||^2 = {got:.6g} but a direct backward gives {ref:.6g} "
                                       "(the model mixes samples or uses a layer in an unsupported way)")
        return losses.detach(), sq
