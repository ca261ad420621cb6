"""How much memory a chunk of the gradient-variance probe needs, and the largest chunk that fits a budget (plain
torch; ``chunk_size="auto"`` of :func:`flowmatch.gradvar.bin_sums`).

Estimate for a chunk of c samples: fixed + c * per_sample bytes, where

    per_sample = 2 * a + w      a = bytes autograd saves in a forward, per sample (measured on 1 and 2 probe samples:
                                the difference, so the parameters' share cancels); 2 a: the activations and, during
                                the backward, their gradients; w = the engine's working memory per sample (hooks:
                                the largest per-layer transient plus the stacked Linear pass, :func:`transient_bytes`;
                                vmap: 12 bytes a parameter)
    fixed      = (forward of 1 sample) - a + 8 P     (one bin's running float64 sum, for a bin cut into pieces)

(loop: per_sample = 0, one sample at a time whatever the chunk). The chunk is the largest c <= B that fits
(:func:`auto_chunk_size`), at least 1 (with a warning when even that exceeds the budget). The K x P float64 sums
kept for an all-reduce (8 P K bytes, ``sums_bytes``) are the result, needed whatever the chunk: not in the budget.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os

import torch
from torch import Tensor, nn

from flowmatch.interpolants import PATH_FIELDS, PathSample

__all__ = [
    "MIB",
    "chunk_size_for",
    "measure_pilot",
    "transient_bytes",
    "auto_chunk_size",
    "free_bytes",
    "keep_host_heap",
]
log = logging.getLogger(__name__)
MIB = 2**20


def chunk_size_for(cache: dict, key: tuple, modules, job, probe: PathSample, K: int, chunk_size, budget_mib, keep):
    """(chunk size, memory record) of engine ``key[0]`` (``modules``: the hooks engine's layers; ``job``: a
    :class:`~flowmatch.persample.Job`; ``keep``: the K x P sums are kept): ``chunk_size`` itself, or for "auto" the
    largest chunk whose estimate (module docstring) fits ``budget_mib`` MiB (None: a quarter of the free memory).
    The per-sample estimate and the result are cached in ``cache`` (under ``key``, and the probe's size and shape and
    the settings: the over-budget warning is logged once for them)."""
    if chunk_size != "auto":
        return int(chunk_size), {}
    B, P = len(probe), sum(p.numel() for p in job.params.values())
    shapes = tuple(getattr(probe, n).shape[1:] for n in PATH_FIELDS)
    ekey = ("estimate", *key, shapes, torch.is_autocast_enabled(probe.t.device.type))
    if ekey not in cache and B:
        s1, sizes = measure_pilot(job.model, job.loss_fn, probe[:1], modules)
        s2 = measure_pilot(job.model, job.loss_fn, probe[:2], [])[0] if B > 1 else 2 * s1
        act = max(s2 - s1, 0)  # saved activations per sample (the parameters' share cancels)
        if key[0] == "loop":  # one sample at a time, whatever the chunk
            cache[ekey] = (0, 2 * s1)
        else:  # activations and their gradients, plus the engine's working memory
            cache[ekey] = (2 * act + (transient_bytes(sizes, 1) if key[0] == "hooks" else 12 * P), max(s1 - act, 0))
    rkey = ("chunk", ekey, B, budget_mib, keep, K)
    if rkey in cache:  # the same probe shape and settings as before
        return cache[rkey]
    per, fixed = cache.get(ekey, (0, 0))
    fixed += 8 * P  # one bin's running sum (a bin cut into pieces)
    if budget_mib is None:  # measured once per model and estimate
        dev = next((p.device for p in job.params.values()), probe.t.device)
        budget_mib = cache.setdefault(("free", *ekey), free_bytes(dev) / 4 / MIB)
    budget = float(budget_mib) * MIB
    if fixed + per > budget:
        msg = "gradvar: one probe sample needs ~%.0f MiB, over the %.0f MiB budget"
        log.warning(msg, (fixed + per) / MIB, budget / MIB)
    cs = auto_chunk_size(per, fixed, budget, B)
    sums = 8 * P * K if keep else 0
    cache[rkey] = (
        cs,
        {
            "memory_budget_mib": budget / MIB,
            "bytes_per_sample": int(per),
            "fixed_bytes": int(fixed),
            "sums_bytes": sums,
        },
    )
    return cache[rkey]


def auto_chunk_size(per_sample: float, fixed: float, budget: float, B: int) -> int:
    """The largest chunk c <= B with fixed + c * per_sample <= budget (at least 1)."""
    if per_sample <= 0:
        return max(1, B)
    return int(min(max(B, 1), max(1, math.floor((budget - fixed) / per_sample))))


def free_bytes(device: torch.device) -> float:
    """Free memory of ``device``: CUDA free memory, else the host's MemAvailable (16 GiB if unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16.0 * 2**30


def measure_pilot(model: nn.Module, loss_fn, path: PathSample, modules) -> tuple[int, dict]:
    """One forward of ``loss_fn(model, path)``: the bytes autograd saves (views counted in full) and, for each of
    ``modules`` called, (input numel, output numel) of its first call."""
    total, sizes = [0], {}

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    def rec(mod, args, out):
        if mod not in sizes and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            sizes[mod] = (args[0].numel(), out.numel())

    handles = [m.register_forward_hook(rec) for m in modules]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model, path)
    finally:
        for h in handles:
            h.remove()
    return total[0], sizes


def transient_bytes(sizes: dict, b: int) -> int:
    """Per-sample working memory of the hooks engine's layer rules, from the (input, output) numels of ``b``
    samples per layer: the largest of the per-layer transients (float64 copies, centred factors and gathers of
    input and output gradient, 24 bytes an element, plus float32 and float64 per-sample weight gradients of
    convolutions, 12 bytes a weight), plus, for Linear layers applied once per sample, what the stacked pass holds
    for all of them at once (:mod:`flowmatch.binreduce_linear`: output gradients, stacked and padded factors,
    their deviations: 48 bytes an input or output element)."""
    out, rows = 0, 0
    for m, (x, o) in sizes.items():
        if isinstance(m, nn.Linear) and x == b * m.in_features:
            rows += (48 * (x + o)) // max(b, 1)
            continue
        w = m.weight.numel() if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.weight is not None else 0
        out = max(out, (24 * (x + o)) // max(b, 1) + 12 * w)
    return out + rows


_HOST_HEAP = {"done": False}


def keep_host_heap() -> None:
    """On a glibc host, serve the probe's large temporaries from the heap instead of fresh mappings: mallopt
    M_MMAP_THRESHOLD = 256 MiB, M_TRIM_THRESHOLD = 1 GiB, once per process (``FLOWMATCH_MALLOPT=0``: leave malloc
    alone). torch's CPU allocator has no cache, and glibc maps every block over its (adaptive) threshold afresh and
    unmaps it on free, so each call page-faults its temporaries in again; on a VM that cost up to half of a probe
    (MLP width 256, K = 50: 18.7 ms -> 8.4 ms). Freed memory then stays with the process (as with jemalloc or
    tcmalloc) rather than going back to the OS at once."""
    if _HOST_HEAP["done"] or os.environ.get("FLOWMATCH_MALLOPT", "1") == "0":
        return
    _HOST_HEAP["done"] = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * MIB)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * MIB)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
