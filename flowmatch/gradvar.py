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
exactly (one all-reduce SUM of :meth:`BinSums.as_tensor`); in one process (``keep_sums=False``) sum g_i is
replaced by ||sum g_i||^2 per bin and parameter, all the statistics need, with no K x P memory traffic. Per
parameter group the same formulas hold with g_i restricted to the group's parameters. Per-sample gradients are
exact (:mod:`flowmatch.persample`), reduced for all bins of a chunk at once (:mod:`flowmatch.binreduce`: cost
independent of K; :mod:`flowmatch.binreduce_linear` for Linear layers applied once per sample when only squared
norms are kept); every sum and squared norm is float64 whatever the model's dtype (or formed from centred factors
whose float32 rounding is relative to the spread, or from plain float32 products only while S / V is small enough
for them), because grad_var_k cancels the two terms of its numerator E||g||^2 / tr Cov-fold (about 1e6 when the
mean gradient is 1000 times the per-sample spread).
"""

from __future__ import annotations

import logging
import numbers
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from flowmatch.gradvar_accumulate import accumulate, new_sums, sorted_probe
from flowmatch.gradvar_memory import chunk_size_for
from flowmatch.gradvar_plan import Chunk, ProbePlan, plan_probe
from flowmatch.gradvar_stats import BinSums, GradVarStats, Layout
from flowmatch.interpolants import PATH_FIELDS, PathSample
from flowmatch.losses import per_sample_loss
from flowmatch.persample import HooksUnsupported, Job, LossFn, loop_engine, vmap_engine
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
ENGINES = ("hooks", "vmap", "loop")
_FUNCS = {"vmap": vmap_engine, "loop": loop_engine}
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: engine, estimate or plan}
_KEY = "callbacks.gradvar.bins"
_EDGES: dict[int, Tensor] = {}  # bin count -> its edges, for bin_sums (never handed out: BinSums gets a copy)


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


def walk(model: nn.Module) -> tuple[dict[str, Tensor], list[nn.Module]]:
    """The trainable parameters {name: parameter} (as ``named_parameters``: the first name of a shared one, in its
    order) and every module (as ``modules()``), in one walk of the module tree."""
    params: dict[str, Tensor] = {}
    mods, seen, stack = [], set(), [("", model)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        mods.append(m)
        for n, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    params[prefix + n] = p
        stack.extend(reversed([(f"{prefix}{n}.", c) for n, c in m._modules.items() if c is not None]))
    return params, mods


class TrainModeGuard:
    """Eval mode for the probe (dropout off, BatchNorm on running stats), restoring every module's mode
    (``modules``: the model's modules when already at hand)."""

    def __init__(self, model: nn.Module, modules: list | None = None) -> None:
        self.modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]

    def __enter__(self):  # object.__setattr__: ``training`` is a plain attribute; skips Module.__setattr__'s checks
        for m, mode in self.modes:
            if mode:
                object.__setattr__(m, "training", False)

    def __exit__(self, *exc):
        for m, mode in self.modes:
            if m.training != mode:
                object.__setattr__(m, "training", mode)


def bin_sums(
    model: nn.Module,
    probe: PathSample,
    edges,
    *,
    loss_fn: LossFn = per_sample_loss,
    method: str = "auto",
    chunk_size: int | str = "auto",
    memory_budget_mib: float | None = None,
    groups=None,
    verify: bool = True,
    keep_sums: bool = True,
) -> BinSums:
    """Stream the probe in chunks and accumulate :class:`BinSums` (see module docstring).

    ``probe``: a :class:`~flowmatch.interpolants.PathSample` (B samples); ``probe.t`` bins them.
    ``loss_fn(model, path) -> (b,)`` per-sample losses on a slice of the probe (default: the flow-matching loss
    :func:`~flowmatch.losses.per_sample_loss`), deterministic given the slice. ``method``: "hooks" (one
    forward+backward per chunk, exact for Linear/Conv1d/Conv2d/LayerNorm/GroupNorm/Embedding), "vmap", "loop"
    or "auto" (hooks when every trainable parameter is in a supported layer, else vmap). If an engine cannot
    handle the model it falls back hooks -> vmap -> loop (logged; ``result.method`` names the engine used). The
    model runs in eval mode (its modes are restored) and no ``.grad`` is touched. ``groups``: None, "module",
    "layer" or {name: [param names]}. ``verify`` (hooks): check the first sample against a direct backward on it
    alone, on the first call for this model and parameter layout.

    The probe is sorted by bin and packed into chunks of whole bins of at most ``chunk_size`` samples
    (:mod:`flowmatch.gradvar_plan`); every per-bin reduction covers all bins of a chunk at once
    (:mod:`flowmatch.binreduce`). ``chunk_size="auto"``: the largest chunk whose estimated memory (activations
    saved for the backward and their gradients, the engine's per-layer working memory, the sums) fits
    ``memory_budget_mib`` MiB (None: a quarter of the device's free memory). Engine, sorting, chunk plan and
    memory estimate are cached per model, parameter layout and probe times: repeated probes pay them once.
    ``keep_sums=False``: the (K, P) gradient sums are never formed, only their squared norms (same statistics,
    no K x P memory traffic; cannot be merged or all-reduced). ``result.info`` records engine, chunk size, number
    of chunks and memory estimate. Under DDP call it (``keep_sums=True``) on the bare module of every rank with
    that rank's probe shard, all-reduce ``as_tensor()`` (SUM) and read it back with ``from_tensor``: the result
    equals one process on the union probe.
    """
    if method not in ("auto", *ENGINES):
        raise ValueError(f"method must be one of {['auto', *ENGINES]}, got {method!r}")
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be 'auto' or an integer >= 1, got {chunk_size!r}")
    budget_ok = isinstance(memory_budget_mib, numbers.Real) and not isinstance(memory_budget_mib, bool)
    if memory_budget_mib is not None and not (budget_ok and memory_budget_mib > 0):
        raise ValueError(f"memory_budget_mib must be a number > 0 (MiB) or None, got {memory_budget_mib!r}")
    e = _EDGES.get(edges) if type(edges) is int else None  # a bin count (an int, not a bool)
    if e is None:
        e = bin_edges(edges)
        if type(edges) is int and len(_EDGES) < 64:
            _EDGES[edges] = e
    if not isinstance(probe, PathSample):
        raise ValueError(f"probe must be a flowmatch.interpolants.PathSample, got {type(probe).__name__}")
    B = len(probe)
    bad = [n for n in PATH_FIELDS if getattr(probe, n).shape[:1] != (B,)]
    if bad:
        raise ValueError(f"probe fields {bad} do not have batch dimension {B} first")
    params, modules = walk(model)
    layout = Layout(tuple(params), tuple(p.numel() for p in params.values()), _resolve_groups(model, params, groups))
    order = ENGINES[ENGINES.index(method if method != "auto" else "hooks") :]
    p0, K = next(iter(params.values()), None), e.numel() - 1
    dev = p0.device if p0 is not None else probe.t.device
    cache = _CACHE.setdefault(model, {})
    sig = (loss_fn, tuple((n, id(p), tuple(p.shape), p.dtype, p.device) for n, p in params.items()))
    sig = (cache.setdefault(("layout", sig), object()),)  # a token: the cache keys below hash fast
    job = Job(model, loss_fn, params)
    with TrainModeGuard(model, modules), torch.enable_grad():
        for i, name in enumerate(order):
            try:
                engine = _engine(cache, (name, *sig), model, params, verify)
                mods = list(engine.plan) if name == "hooks" else []
                cs, est = chunk_size_for(
                    cache, (name, *sig), mods, job, probe, K, chunk_size, memory_budget_mib, keep_sums
                )
                plan = _probe_plan(cache, probe.t, e, cs, dev)
                path = sorted_probe(cache, probe, plan)
                one = len(plan.specs) == 1 and plan.specs[0].end == len(path)
                chunks = (Chunk(path if one else path[s.start : s.end], s) for s in plan.specs)
                out = accumulate(engine, job, *new_sums(e, layout, dev, name, keep_sums), chunks, plan)
                amp = dev.type in ("cpu", "cuda") and torch.is_autocast_enabled(dev.type)
                out.info = {"engine": name, "chunk_size": cs, "chunk_size_setting": chunk_size}
                out.info.update(n_chunks=len(plan.specs), keep_sums=keep_sums, device=str(dev), **est)
                out.info.update(dtype=str(p0.dtype) if p0 is not None else None, autocast=amp)
                return out
            except RuntimeError as err:  # HooksUnsupported, or vmap's "not supported" errors
                if isinstance(err, HooksUnsupported):  # remembered: later calls skip the engine at once
                    cache[("unsupported", name, *sig)] = err
                    cache.pop((name, *sig), None)
                if name == "loop":
                    raise
                planned = isinstance(err, HooksUnsupported) and method == "auto" and i == 0
                level = logging.DEBUG if planned else logging.INFO
                log.log(level, "gradvar: %s engine not usable (%s); falling back to %s", name, err, order[i + 1])
    raise AssertionError("unreachable")


def _engine(cache: dict, key: tuple, model: nn.Module, params: dict, verify: bool):
    """The engine ``key[0]`` for this model and parameter layout, built once (with ``verify``, the hooks engine
    checks its first call); a hooks engine found unusable before raises its HooksUnsupported again at once."""
    if ("unsupported", *key) in cache:
        raise cache[("unsupported", *key)]
    engine = cache.get(key)
    if engine is None:
        engine = cache[key] = HooksEngine(model, params, verify=verify) if key[0] == "hooks" else _FUNCS[key[0]]
    return engine


def _probe_plan(cache: dict, t: Tensor, e: Tensor, chunk_size: int, device) -> ProbePlan:
    """The probe's sorting and chunk plan, cached for these times, edges and chunk size."""
    key = ("plan", tuple(e.tolist()), int(chunk_size), str(device))
    plan = cache.get(key)
    if plan is None or plan.t.shape != t.shape or plan.t.dtype != t.dtype or not torch.equal(plan.t, t):
        plan = cache[key] = plan_probe(t, bin_index(t, e), e.numel() - 1, chunk_size, device)
    return plan


def gradient_variance(model: nn.Module, probe: PathSample, edges, **kw) -> GradVarStats:
    """``bin_sums(model, probe, edges, keep_sums=False, **kw).to_stats()`` (only the statistics are kept)."""
    return bin_sums(model, probe, edges, **{"keep_sums": False, **kw}).to_stats()
