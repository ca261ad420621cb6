"""Per-time-bin variance of the per-sample loss gradient (the paper's diagnostic), plain torch.

Probe: B samples with times t_i, per-sample losses l_i(theta), g_i = grad_theta l_i (P parameters, flattened).
Time bins [e_k, e_{k+1}) with edges e_0 < ... < e_K in [0, 1]; the last bin is closed (t = e_K goes in it);
samples outside [e_0, e_K] are ignored. For bin k with n_k samples (I_k their indices):

    loss_k             = (1/n_k) sum_{i in I_k} l_i
    gbar_k             = (1/n_k) sum_{i in I_k} g_i
    grad_sqnorm_k      = (1/n_k) sum_{i in I_k} ||g_i||^2
    mean_grad_sqnorm_k = ||gbar_k||^2
    grad_var_k         = (sum_{i in I_k} ||g_i||^2 - n_k ||gbar_k||^2) / (n_k - 1)
                       = trace of the unbiased sample covariance of the g_i    (NaN when n_k < 2;
                                                          the other statistics are NaN for an empty bin)

Only the sufficient statistics n_k, sum l_i, sum ||g_i||^2 and sum g_i (K x P) are accumulated, streaming over
chunks of the probe (:class:`BinSums`), so memory is O(K P + chunk cost) and sums from several processes add up
exactly (one all-reduce SUM of :meth:`BinSums.as_tensor`). Per parameter group the same formulas hold with g_i
restricted to the group's parameters. Per-sample gradients are exact (:mod:`flowmatch.persample`); every sum
and squared norm is float64 whatever the model's dtype, because grad_var_k cancels the two terms of its
numerator E||g||^2 / tr Cov-fold (about 1e6 when the mean gradient is 1000 times the per-sample spread).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import fields

import torch
from torch import Tensor, nn

from flowmatch.gradvar_stats import BinSums, GradVarStats, Layout
from flowmatch.interpolants import PathSample
from flowmatch.losses import per_sample_loss
from flowmatch.persample import Chunk, HooksUnsupported, Job, LossFn, loop_engine, vmap_engine
from flowmatch.persample_hooks import HooksEngine

__all__ = [
    "bin_edges",
    "bin_index",
    "stratified_times",
    "param_groups",
    "BinSums",
    "GradVarStats",
    "bin_sums",
    "gradient_variance",
    "COLUMNS",
]
log = logging.getLogger(__name__)
COLUMNS = ("step", "t_lo", "t_hi", "n", "loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm")
_KEY = "callbacks.gradvar.bins"


def bin_edges(bins) -> Tensor:
    """Edges (K+1,) float64: ``K`` equal bins of [0, 1] for an int, else the given strictly increasing edges."""
    if isinstance(bins, Tensor):
        bins = bins.tolist()
    if (
        isinstance(bins, (bool, str))
        or isinstance(bins, numbers.Number)
        and (not float(bins).is_integer() or int(bins) < 1)
    ):
        raise ValueError(f"{_KEY} must be a bin count >= 1 or a list of edges in [0, 1], got {bins!r}")
    if isinstance(bins, numbers.Number):
        return torch.linspace(0.0, 1.0, int(bins) + 1, dtype=torch.float64)
    try:
        e = torch.tensor([float(v) for v in bins], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{_KEY} must be a bin count or a list of numeric edges, got {bins!r}") from None
    if e.numel() < 2 or not bool(torch.isfinite(e).all()) or bool((e.diff() <= 0).any()):
        raise ValueError(f"{_KEY} edges must be >= 2 finite, strictly increasing values, got {e.tolist()}")
    if e[0] < 0 or e[-1] > 1:
        raise ValueError(f"{_KEY} edges must lie within [0, 1], got {e.tolist()}")
    return e


def bin_index(t: Tensor, edges: Tensor) -> Tensor:
    """(B,) bin of each time: k for e_k <= t < e_{k+1}, K - 1 for t == e_K, K (= dropped) outside [e_0, e_K].
    Comparisons are made in t's floating dtype (edges rounded to it), so a float32 t = 0.3 lies on edge 0.3."""
    K, tt = edges.numel() - 1, t.detach().reshape(-1)
    tt = tt if tt.is_floating_point() else tt.double()
    e = edges.to(tt.device, tt.dtype)
    idx = torch.bucketize(tt, e, right=True) - 1
    idx = torch.where(tt == e[-1], K - 1, idx)
    return torch.where((tt < e[0]) | (tt > e[-1]) | tt.isnan(), K, idx)


def stratified_times(
    n_per_bin: int, edges, generator: torch.Generator | None = None, dtype=torch.float32, device=None
) -> Tensor:
    """(K * n_per_bin,) times, ``n_per_bin`` drawn uniformly inside each bin (bin-major order)."""
    e = bin_edges(edges)
    K = e.numel() - 1
    u = torch.rand(K, int(n_per_bin), generator=generator, dtype=torch.float64)
    t64 = e[:-1, None] + (e[1:] - e[:-1])[:, None] * u
    t, want = t64.to(dtype).reshape(-1), torch.arange(K).repeat_interleave(int(n_per_bin))
    mid = ((e[:-1] + e[1:]) / 2)[:, None].expand(K, int(n_per_bin)).reshape(-1).to(dtype)
    t = torch.where(bin_index(t, e) != want, mid, t)  # a value rounded onto an edge moves to the bin's middle
    if bool((bin_index(t, e) != want).any()):
        raise ValueError(f"{_KEY}: bins {e.tolist()} are too narrow to hold times of dtype {dtype}")
    return t.to(device)


def param_groups(model: nn.Module, by: str = "module") -> dict[str, list[str]]:
    """Trainable parameter names grouped ``by`` "module" (top-level child) or "layer" (owning module)."""
    if by not in ("module", "layer"):
        raise ValueError(f"param_groups by must be 'module' or 'layer', got {by!r}")
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = n.split(".")[0] if by == "module" else (n.rsplit(".", 1)[0] if "." in n else n)
            out.setdefault(key, []).append(n)
    return out


def _resolve_groups(model: nn.Module, params: dict, groups) -> tuple:
    """``groups`` (None, "module", "layer" or {name: names}) as ((name, (parameter names...)), ...), checked."""
    if groups is None:
        return ()
    if isinstance(groups, str):
        groups = param_groups(model, groups)
    if not isinstance(groups, Mapping):
        raise ValueError(f"groups must be None, 'module', 'layer' or a dict name -> parameter names, got {groups!r}")
    out = []
    for name, members in groups.items():
        members = [members] if isinstance(members, str) else list(members)
        unknown = [m for m in members if m not in params]
        if unknown:
            raise ValueError(f"group {name!r}: {unknown} are not trainable parameter names of the model")
        out.append((str(name), tuple(members)))
    return tuple(out)


class TrainModeGuard:
    """model.eval() for the probe (dropout off, BatchNorm on running stats), restoring every module's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.modes = model, [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def bin_sums(
    model: nn.Module,
    probe: PathSample,
    edges,
    *,
    loss_fn: LossFn = per_sample_loss,
    method: str = "auto",
    chunk_size: int = 64,
    groups=None,
    verify: bool = True,
) -> BinSums:
    """Stream the probe in chunks of ``chunk_size`` and accumulate :class:`BinSums` (see module docstring).

    ``probe``: a :class:`~flowmatch.interpolants.PathSample` (B samples); ``probe.t`` bins them.
    ``loss_fn(model, path) -> (b,)`` per-sample losses on a slice of the probe (default: the flow-matching loss
    :func:`~flowmatch.losses.per_sample_loss`), deterministic given the slice. ``method``: "hooks" (one
    forward+backward per chunk, exact for Linear/Conv1d/Conv2d/LayerNorm/GroupNorm/Embedding), "vmap", "loop"
    or "auto" (hooks when every
    trainable parameter is in a supported layer, else vmap). If an engine cannot handle the model it falls back
    hooks -> vmap -> loop (logged; ``result.method`` names the engine used). The model runs in eval mode (its
    modes are restored) and no ``.grad`` is touched. ``groups``: None, "module", "layer" or {name: [param
    names]}. ``verify`` (hooks): check the first sample against a direct backward on it alone.

    The probe is reordered by bin and processed ``chunk_size`` samples at a time. Memory: K x P float64 sums
    plus, per chunk, about a training step's activations (hooks; Conv layers add chunk x weight-size per layer
    while it is processed), chunk x P per-sample gradients (vmap), or one sample's graph (loop). Under DDP call
    it on the bare module of every rank with that rank's probe shard, all-reduce ``as_tensor()`` (SUM) and read
    it back with ``from_tensor``: the result equals one process on the union probe.
    """
    if method not in ("auto", "hooks", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'hooks', 'vmap' or 'loop', got {method!r}")
    e = bin_edges(edges)
    if not isinstance(probe, PathSample):
        raise ValueError(f"probe must be a flowmatch.interpolants.PathSample, got {type(probe).__name__}")
    B = len(probe)
    bad = [f.name for f in fields(probe) if getattr(probe, f.name).shape[:1] != (B,)]
    if bad:
        raise ValueError(f"probe fields {bad} do not have batch dimension {B} first")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = Layout(tuple(params), tuple(p.numel() for p in params.values()), _resolve_groups(model, params, groups))
    order = ["hooks", "vmap", "loop"][["hooks", "vmap", "loop"].index(method if method != "auto" else "hooks") :]
    p0 = next(iter(params.values()), None)
    dev = p0.device if p0 is not None else probe.t.device
    with TrainModeGuard(model), torch.enable_grad():
        for i, name in enumerate(order):
            out = BinSums.zeros(e, layout, dev, name)  # fresh sums for every engine tried
            acc = {n: b.view(b.shape[0], *p.shape) for (n, b), p in zip(out.blocks().items(), params.values())}
            try:
                if name == "hooks":
                    engine = HooksEngine(model, params, verify=verify)
                else:
                    engine = vmap_engine if name == "vmap" else loop_engine
                return _accumulate(engine, Job(model, loss_fn, params, acc), out, _chunks(probe, e, chunk_size, dev))
            except RuntimeError as err:  # HooksUnsupported, or vmap's "not supported" errors
                if name == "loop":
                    raise
                planned = isinstance(err, HooksUnsupported) and method == "auto" and i == 0
                level = logging.DEBUG if planned else logging.INFO
                log.log(level, "gradvar: %s engine not usable (%s); falling back to %s", name, err, order[i + 1])
    raise AssertionError("unreachable")


def _chunks(probe: PathSample, e: Tensor, chunk_size: int, device) -> Iterator[Chunk]:
    """The probe sorted by bin (sums are order-free; chunks then hold few runs of equal bins), without the
    samples outside the edges, cut into :class:`~flowmatch.persample.Chunk` s of ``chunk_size`` samples."""
    K, step = e.numel() - 1, max(1, int(chunk_size))
    bins = bin_index(probe.t, e)
    order = torch.argsort(bins, stable=True)[: int((bins < K).sum())]
    probe, bins = probe[order], bins[order].tolist()
    for i in range(0, len(bins), step):
        cb = bins[i : i + step]
        starts = [j for j in range(len(cb)) if j == 0 or cb[j] != cb[j - 1]]
        segs = tuple((cb[s], s, t) for s, t in zip(starts, starts[1:] + [len(cb)]))
        yield Chunk(probe[i : i + len(cb)], torch.tensor(cb, device=device), segs)


def _accumulate(engine, job: Job, out: BinSums, chunks: Iterator[Chunk]) -> BinSums:
    """Run ``engine(job, chunk)`` on every chunk: the engine adds the per-bin gradient sums into ``job.acc``
    (views of ``out.grad_flat``); the counts, losses and squared norms (total and per group) are added here."""
    layout = out.layout
    group_idx = [[layout.names.index(m) for m in members] for _, members in layout.groups]
    for chunk in chunks:
        res, kb = engine(job, chunk), chunk.kb
        zero = torch.zeros(len(chunk), dtype=torch.float64, device=out.n.device)
        out.n.index_add_(0, kb, torch.ones_like(zero))
        out.loss_sum.index_add_(0, kb, res.losses.detach().double())
        sqs = [res.sqnorms.get(n, zero) for n in layout.names]
        out.sqnorm_sum.index_add_(0, kb, torch.stack(sqs).sum(0) if sqs else zero)
        if group_idx:
            out.group_sqnorm_sum.index_add_(
                0, kb, torch.stack([sum((sqs[m] for m in ms), zero) for ms in group_idx], 1)
            )
    return out


def gradient_variance(model: nn.Module, probe: PathSample, edges, **kw) -> GradVarStats:
    """``bin_sums(model, probe, edges, **kw).to_stats()``."""
    return bin_sums(model, probe, edges, **kw).to_stats()
