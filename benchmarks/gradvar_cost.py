"""Cost of the per-time-bin gradient-variance probe, measured side by side in one process (1 torch thread).

For each case (an MLP on 2-D data, B = 256; a small UNet on 32x32x3 images, B = 64) and K = 10 time bins it
prints, as medians over alternating repetitions on the same batch:

    probe / train step   probe = flowmatch.gradvar.bin_sums(..., method="auto") (default chunk_size=64, and
                         chunk_size=B); train step = forward + backward + Adam step on the same batch
    loop / probe         loop = the same statistics from B separate forward+backward passes (method="loop")
    peak extra memory    increase of the peak resident set size during one call (after a warm-up call), each
                         (case, function) measured in a fresh child process: Linux VmHWM, reset through
                         /proc/self/clear_refs just before the call, with glibc's mmap threshold pinned at 64 KiB
                         so freed buffers go back to the OS (resource.getrusage ru_maxrss growth if clear_refs is
                         not writable; the output says which).

Goals: probe <= 2x a training step on both cases; probe >= 10x faster than the loop on the MLP.
Run: ``python benchmarks/gradvar_cost.py [--reps N]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import statistics
import subprocess
import sys
import time

import torch

from flowmatch.gradvar import bin_sums
from flowmatch.interpolants import CFM
from flowmatch.losses import per_sample_loss
from flowmatch.models.mlp import MLP
from flowmatch.models.unet import UNet

K = 10


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mib(fn) -> tuple[float, str]:
    """Peak RSS increase during fn() in MiB, and the method used."""
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        fn()
        return (_status_kb("VmHWM") - base) / 1024, "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "ru_maxrss"


def make_cases():
    """(name, model, sample shape, B, description) of the two benchmark cases."""
    mlp = MLP(2, width=256, depth=3)
    unet = UNet(
        3,
        32,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.0,
        num_heads=4,
    )
    return [
        ("MLP", mlp, (2,), 256, "flowmatch.models.mlp.MLP(2, width=256, depth=3)"),
        (
            "UNet",
            unet,
            (3, 32, 32),
            64,
            "flowmatch.models.unet.UNet, preset 'unet' (base 32, mult (1,2), 1 res block, mid attention)",
        ),
    ]


def make_fns(name, model, shape, B):
    """The timed functions of one case on one fixed CFM(0.05) batch (a PathSample)."""
    torch.manual_seed(1)
    batch = CFM(0.05)(torch.randn(B, *shape), torch.randn(B, *shape), torch.rand(B), torch.randn(B, *shape))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    used = {}

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        per_sample_loss(model, batch).mean().backward()
        opt.step()

    def probe(chunk):
        def run():
            used[chunk] = bin_sums(model, batch, K, chunk_size=chunk).method

        return run

    def loop():
        bin_sums(model, batch, K, method="loop")

    chunks = sorted({64, B})
    return {"train step": train, **{f"probe chunk={c}": probe(c) for c in chunks}, "naive loop": loop}, chunks, used


def time_case(name, fns, reps):
    for fn in fns.values():  # warm-up (allocator, Adam state, first-call costs)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:  # alternate the order
            if k == "naive loop" and name != "MLP" and r >= 2:
                continue  # the UNet loop is slow; 2 repetitions
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def memory_child(case: str, key: str) -> None:
    """Child-process mode: print the peak extra memory of one warm call of fns[key] for one case."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large freed buffers are unmapped
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, model, shape, B, _ in make_cases():
        if name == case:
            fns = make_fns(name, model, shape, B)[0]
            fns["train step"]()
            fns[key]()
            mib, how = peak_extra_mib(fns[key])
            print(f"{mib:.1f} {how}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "FN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, K = {K} bins, loss = CFM(0.05) per-sample")
    for name, model, shape, B, note in make_cases():
        fns, chunks, used = make_fns(name, model, shape, B)
        times = time_case(name, fns, args.reps if name == "MLP" else max(3, args.reps // 2))
        med = {k: statistics.median(v) for k, v in times.items()}
        P = sum(p.numel() for p in model.parameters())
        print(f"\n== {name}: {note}; {P:,} parameters, B = {B}, engine used: {used[64]}")
        for k in fns:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, k], capture_output=True, text=True
            ).stdout.split()
            mem = f"{out[0]:>7} MiB ({out[1]})" if len(out) == 2 else "n/a"
            print(f"  {k:<16} {med[k] * 1e3:9.1f} ms (median of {len(times[k])})   peak extra memory {mem}")
        for c in chunks:
            p = med[f"probe chunk={c}"]
            print(
                f"  chunk={c:<4} probe / train step = {p / med['train step']:5.2f}   "
                f"naive loop / probe = {med['naive loop'] / p:6.1f}"
            )


if __name__ == "__main__":
    main()
