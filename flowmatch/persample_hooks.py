"""The ``hooks`` per-sample gradient engine: one forward + backward per chunk (see :mod:`flowmatch.persample`).

Forward hooks capture each layer's input a and (tensor hook) the output gradient delta, from which the per-sample
gradients follow exactly: Linear ``g_i = sum_s delta_is a_is^T`` with ``||g_i||^2 = sum_{s,s'} (delta_s .
delta_s')(a_s . a_s')`` (Gram trick, used when the S x S Gram matrix is smaller than the weight), Conv1d/Conv2d by
the weight gradient of a convolution with ``groups = b * groups`` (samples side by side as channel groups),
LayerNorm/GroupNorm ``g_gamma = sum delta * xhat``, ``g_beta = sum delta``, Embedding by scattering delta into the
looked-up rows. Violations of its assumptions raise :class:`~flowmatch.persample.HooksUnsupported`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.persample import F64, Chunk, ChunkResult, HooksUnsupported, Job, _add_bins, _check_losses, _sqnorm

_CONV = (nn.Conv1d, nn.Conv2d)
_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def use_gram(S: int, rows: int, cols: int) -> bool:
    """Gram trick for a (rows x cols) weight seen over S positions iff the S x S Gram is the smaller matrix."""
    return S > 1 and S * S < rows * cols


def _why_unsupported(m: nn.Module) -> str | None:
    """Why the hooks engine has no exact rule for layer ``m`` (None when it has one)."""
    kind = next((k for k in _KINDS if isinstance(m, k)), None)
    if kind is None:
        return f"{type(m).__name__} has no per-sample hook rule"
    if type(m).forward is not kind.forward:
        return f"{type(m).__name__} overrides forward"
    if isinstance(m, _CONV):
        if (
            m.padding_mode != "zeros"
            or m.padding == "same"
            and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size))
        ):
            return f"{type(m).__name__} padding {m.padding!r}/{m.padding_mode}"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse or m.scale_grad_by_freq):
        return "Embedding with max_norm/sparse/scale_grad_by_freq"
    return None


def hook_plan(model: nn.Module, params: dict) -> dict:
    """Map each layer owning trainable parameters to ``{attr: param_name}``; raise HooksUnsupported if any
    trainable parameter is not owned by exactly one supported layer."""
    by_id = {id(p): n for n, p in params.items()}
    owners, plan = {}, {}
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
    """What the forward hook records of one layer: call count, first input and output, their versions."""

    __slots__ = ("calls", "x", "xv", "out", "ov")

    def __init__(self) -> None:
        self.calls, self.x, self.xv, self.out, self.ov = 0, None, 0, None, 0


def _fwd_hook(rec: _Rec, on_grad, mod, args, out) -> None:
    """Forward hook: count the call; on the first, record input and output and hook ``on_grad`` on the output."""
    rec.calls += 1
    if rec.calls == 1 and args and isinstance(out, Tensor) and out.requires_grad:
        rec.x, rec.xv, rec.out, rec.ov = args[0], args[0]._version, out, out._version
        out.register_hook(partial(on_grad, mod, rec))


def _graph_scan(root, marked: set) -> tuple[dict[int, int], dict]:
    """Walk the autograd graph below ``root``: the number of edges into each leaf (by id of the leaf tensor),
    and for every node whether some node of ``marked`` lies strictly below it."""
    uses, kids, below = {}, {}, {}
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


def _linear_weight(a: Tensor, d: Tensor, chunk: Chunk, acc: Tensor) -> Tensor:
    """a (b,S,i), d (b,S,o): per-sample ||sum_s d_s a_s^T||^2 (float64); adds the per-bin sums of
    sum_s d_s a_s^T into ``acc`` (float64). Squared norms and bin sums are formed from float64 copies of the
    factors (the materialised per-sample gradients of the non-Gram case are cast instead)."""
    b, S, i = a.shape
    o = d.shape[2]
    if S > 1 and not use_gram(S, o, i):
        return _add_bins(acc, chunk.kb, torch.bmm(d.transpose(1, 2), a))
    a, d = a.to(F64), d.to(F64)
    if S == 1:
        sq = _sqnorm(d) * _sqnorm(a)
    else:
        sq = (torch.bmm(d, d.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    d2, a2 = d.reshape(b, S * o), a.reshape(b, S * i)
    for k, s, e in chunk.segs:
        acc[k].addmm_(d2[s:e].view(-1, o).T, a2[s:e].view(-1, i))
    return sq


def _conv_weight(m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    """(b, *weight.shape) per-sample weight gradients of a Conv1d/Conv2d from its input and output gradient."""
    b, G, k = x.shape[0], m.groups, m.kernel_size
    if G == 1 and all(v == 1 for v in (*k, *m.stride)) and all(p == 0 for p in m.padding):
        return torch.bmm(d.reshape(b, d.shape[1], -1), x.reshape(b, x.shape[1], -1).transpose(1, 2)).reshape(
            b, *m.weight.shape
        )
    pad = (
        [dl * (kk - 1) // 2 for dl, kk in zip(m.dilation, k)]
        if m.padding == "same"
        else [0] * len(k)
        if m.padding == "valid"
        else list(m.padding)
    )
    w = m.weight.new_empty((b * m.weight.shape[0], *m.weight.shape[1:]))
    g = torch.ops.aten.convolution_backward(
        d.reshape(1, -1, *d.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        w,
        None,
        list(m.stride),
        pad,
        list(m.dilation),
        False,
        [0] * len(k),
        b * G,
        [False, True, False],
    )[1]
    return g.reshape(b, *m.weight.shape)


def _layer_grads(m: nn.Module, x: Tensor, d: Tensor, chunk: Chunk, acc: dict) -> dict:
    """Per-sample float64 squared norms {attr: (b,)} of one layer's parameters (those in ``acc``: attr ->
    float64 accumulator) from its input x and output gradient d; adds the per-bin gradient sums into ``acc``."""
    b, kb, res = x.shape[0], chunk.kb, {}
    if isinstance(m, nn.Linear):
        a, dd = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])
        if "weight" in acc:
            res["weight"] = _linear_weight(a, dd, chunk, acc["weight"])
        gb = dd.sum(1)
    elif isinstance(m, _CONV):
        if "weight" in acc:
            res["weight"] = _add_bins(acc["weight"], kb, _conv_weight(m, x, d))
        gb = d.reshape(b, d.shape[1], -1).sum(2)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        if isinstance(m, nn.LayerNorm):  # ``red``: the dimension of ``shape`` that runs over the positions
            shape, red, xhat = (b, -1, *m.normalized_shape), 1, F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            shape, red, xhat = (b, x.shape[1], -1), 2, F.group_norm(x, m.num_groups, None, None, m.eps)
        if "weight" in acc:
            res["weight"] = _add_bins(acc["weight"], kb, (d * xhat).reshape(shape).sum(red))
        gb = d.reshape(shape).sum(red)
    else:  # Embedding
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
        acc["weight"].view(-1, D).index_add_(0, (kb[:, None] * N + idx).reshape(-1), dd.reshape(-1, D))
        return {"weight": sq}
    if "bias" in acc:
        res["bias"] = _add_bins(acc["bias"], kb, gb)
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
        job, chunk, sq = self._ctx
        names = self.plan[m]  # hooks run under the backward's grad mode (create_graph=False: no graph)
        got = _layer_grads(m, rec.x.detach(), delta, chunk, {a: job.acc[n] for a, n in names.items()})
        sq.update({names[a]: v for a, v in got.items()})
        rec.x = rec.out = None

    def __call__(self, job: Job, chunk: Chunk) -> ChunkResult:
        """Per-sample results of one chunk from one forward and one (truncated) backward pass."""
        b, params = len(chunk), job.params
        recs = {m: _Rec() for m in self.plan}
        handles = [m.register_forward_hook(partial(_fwd_hook, r, self._on_grad)) for m, r in recs.items()]
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
            uses, below = _graph_scan(losses.grad_fn, set(outs)) if losses.grad_fn is not None else ({}, {})
            for m, r in recs.items():
                if any(uses.get(id(params[n]), 0) != r.calls for n in self.plan[m].values()):
                    raise HooksUnsupported(
                        f"parameters {sorted(self.plan[m].values())} are used outside their layer's forward"
                    )
            self._structure = (set(used), [m for f, m in outs.items() if f in below and not below[f]])
        sq: dict = {}
        self._ctx = (job, chunk, sq)
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
            self._check_first_sample(job, chunk, sq)
        return ChunkResult(losses.detach(), sq)

    @staticmethod
    def _check_first_sample(job: Job, chunk: Chunk, sq: dict) -> None:
        """Raise HooksUnsupported unless the hooks' ||g_0||^2 matches a direct backward on sample 0 alone."""
        gs = torch.autograd.grad(
            job.loss_fn(job.model, chunk.path[0:1]).sum(), list(job.params.values()), allow_unused=True
        )
        ref = sum(float(_sqnorm(g.reshape(1, -1))) for g in gs if g is not None)
        per = torch.stack(list(sq.values())) if sq else torch.zeros(1, len(chunk), dtype=F64)
        got, scale = float(per[:, 0].sum()), float(per.mean(1).sum())
        if abs(got - ref) > 1e-3 * max(abs(got), abs(ref)) + 1e-7 * scale:
            raise HooksUnsupported(
                f"hooks ||g_0||^2 = {got:.6g} but a direct backward gives {ref:.6g} "
                "(the model mixes samples or uses a layer in an unsupported way)"
            )
