"""Which layers the ``hooks`` engine (:mod:`flowmatch.persample_hooks`) can handle, how it checks a model's autograd
graph, and the per-sample weight gradients of convolutions (plain torch).

A model qualifies when every trainable parameter belongs to exactly one Linear, Conv1d, Conv2d, LayerNorm,
GroupNorm or Embedding layer with the stock forward (:func:`hook_plan`) and is used only inside that layer's
forward (:func:`graph_scan` counts the edges into each parameter). Convolutions: the per-sample weight gradients
are the weight gradient of one convolution with ``groups = b * groups`` (samples side by side as channel groups),
:func:`conv_weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmatch.persample import HooksUnsupported

__all__ = ["CONV", "hook_plan", "graph_scan", "conv_weight"]

CONV = (nn.Conv1d, nn.Conv2d)
KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def _why_unsupported(m: nn.Module) -> str | None:
    """Why the hooks engine has no exact rule for layer ``m`` (None when it has one)."""
    kind = next((k for k in KINDS if isinstance(m, k)), None)
    if kind is None:
        return f"{type(m).__name__} has no per-sample hook rule"
    if type(m).forward is not kind.forward:
        return f"{type(m).__name__} overrides forward"
    if isinstance(m, CONV):
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


def graph_scan(root, marked: set) -> tuple[dict[int, int], dict]:
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


def conv_weight(m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
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
    w = x.new_empty((b * m.weight.shape[0], *m.weight.shape[1:]))
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
