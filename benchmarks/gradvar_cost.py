"""Cost of the per-time-bin gradient-variance probe as a ratio to a training step, measured side by side in one
process (1 torch thread), the two interleaved (alternating order) on the same model, batch and inputs.

    step    forward + backward of the batch-mean flow-matching loss (no optimizer step)
    probe   flowmatch.gradvar.bin_sums(model, batch, K, keep_sums=False) - what GradientVarianceCallback runs in one
            process (chunk_size "auto", memory budget 2048 MiB as in conf/callbacks/gradvar.yaml; engine and
            chunk printed); times t uniform on [0, 1] (uneven bins) or, with --times stratified, equal bins
    ratio   median probe time / median step time over --reps repetitions after a warm-up

Rows: the MLP (flowmatch.models.mlp.MLP(2, width, depth=3)) at widths 64/256/1024 x K = 1/10/50 with B = 256, and
at width 256, K = 10 with B = 64 and 1024; a plain conv net on 32x32x3 images (B = 64, K = 10); the small UNet
(preset 'unet': GroupNorm, mid-level attention; B = 64, K = 10). With --loop the naive loop (B separate
backward passes, method="loop") gets its ratio too. When BackPACK or Opacus is importable (optional, not
dependencies of flowmatch) their per-sample gradients, reduced to the same statistics, get rows of their own.
Goal (issue 13): ratio <= 1.3 for the MLP at B = 256 (every width and K) and for the UNet.

Run: ``python benchmarks/gradvar_cost.py [--reps N] [--only mlp,conv,unet] [--times random|stratified] [--loop]
[--clock wall|cpu]`` (cpu: this thread's CPU time, for a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flowmatch, not an installed one
from flowmatch.gradvar import bin_edges, bin_index, bin_sums, stratified_times  # noqa: E402
from flowmatch.gradvar_memory import keep_host_heap  # noqa: E402
from flowmatch.interpolants import CFM  # noqa: E402
from flowmatch.losses import per_sample_loss  # noqa: E402
from flowmatch.models.mlp import MLP  # noqa: E402
from flowmatch.models.unet import UNet  # noqa: E402

BUDGET_MIB = 2048


class ConvNet(nn.Module):
    """A plain conv net v(x, t): conv3x3 32, stride-2 conv 64, conv 64, nearest x2 + conv 32, conv3x3 out; SiLU;
    the time enters through a Linear(1, 32) added to the first features."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.t = nn.Linear(1, 32)
        self.c1, self.c2 = nn.Conv2d(c, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.c3, self.c4 = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 32, 3, padding=1)
        self.out = nn.Conv2d(32, c, 3, padding=1)

    def forward(self, x, t):
        h = F.silu(self.c1(x) + self.t(t[:, None].to(x.dtype))[:, :, None, None])
        h = F.silu(self.c3(F.silu(self.c2(h))))
        return self.out(F.silu(self.c4(F.interpolate(h, scale_factor=2.0, mode="nearest"))))


def cases(only: set[str]):
    """(row name, model factory, sample shape, B, K)."""
    out = []
    if "mlp" in only:
        out += [
            (f"MLP 3x{w}", lambda w=w: MLP(2, width=w, depth=3), (2,), 256, K)
            for w in (64, 256, 1024)
            for K in (1, 10, 50)
        ]
        out += [("MLP 3x256", lambda: MLP(2, width=256, depth=3), (2,), B, 10) for B in (64, 1024)]
    if "conv" in only:
        out.append(("conv net 32x32", ConvNet, (3, 32, 32), 64, 10))
    if "unet" in only:
        unet = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=4)
        out.append(("UNet (preset unet)", lambda: UNet(3, 32, dropout=0.0, **unet), (3, 32, 32), 64, 10))
    return out


def make_batch(shape, B, K, times):
    """A CFM(0.05) PathSample of B samples; t uniform or stratified (equal counts in the K bins)."""
    g = torch.Generator().manual_seed(1)
    if times == "stratified":
        t = stratified_times(-(-B // K), K, g)[torch.randperm(-(-B // K) * K, generator=g)[:B]]
    else:
        t = torch.rand(B, generator=g)
    x0, x1, eps = (torch.randn(B, *shape, generator=g) for _ in range(3))
    return CFM(0.05)(x0, x1, t, eps)


def library_probe(kind: str, model, batch, K):
    """BackPACK / Opacus per-sample gradients reduced to the same per-bin statistics (float64), or None."""
    try:
        if kind == "BackPACK":
            from backpack import backpack, extend
            from backpack.extensions import BatchGrad
        else:
            from opacus import GradSampleModule
    except ImportError:
        return None
    kb = bin_index(batch.t, bin_edges(K))
    if kind == "BackPACK":
        net = extend(model)

        def grads():
            with backpack(BatchGrad()):
                loss = per_sample_loss(net, batch).sum()
                net.zero_grad()
                loss.backward()
            return [p.grad_batch for p in net.parameters()]
    else:
        net = GradSampleModule(model)

        def grads():
            net.zero_grad()
            per_sample_loss(net, batch).sum().backward()
            return [p.grad_sample for p in net.parameters()]

    def run():
        G = torch.cat([g.reshape(g.shape[0], -1) for g in grads()], 1).double()
        sums = torch.zeros(K + 1, G.shape[1], dtype=torch.float64).index_add_(0, kb, G)
        return (G * G).sum(1), sums

    return run


def measure(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """Median seconds of each function, called in alternating order after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = clock()
            fns[k]()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    keep_host_heap()  # as GradientVarianceCallback does on the CPU (flowmatch/gradvar_memory.py)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--only", default="mlp,conv,unet")
    ap.add_argument("--times", choices=("random", "stratified"), default="random")
    ap.add_argument("--loop", action="store_true", help="also time the naive loop (slow)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this thread's CPU time (a shared, loaded machine)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, times {args.times}, loss CFM(0.05), "
        f"median of {args.reps} interleaved repetitions ({args.clock} clock); ratio = probe / (forward + backward); "
        f"load average {' '.join(open('/proc/loadavg').read().split()[:3]) if Path('/proc/loadavg').exists() else '?'}"
    )
    print(
        f"{'model':<20} {'B':>5} {'K':>3} {'params':>9} {'step ms':>9} {'probe ms':>9} {'ratio':>6}  engine/chunk"
        + ("   loop ratio" if args.loop else "")
    )
    for name, factory, shape, B, K in cases(set(args.only.split(","))):
        model, batch, used = factory(), make_batch(shape, B, K, args.times), {}

        def step(model=model, batch=batch):
            model.zero_grad(set_to_none=True)
            per_sample_loss(model, batch).mean().backward()

        def probe(model=model, batch=batch, K=K, used=used):
            s = bin_sums(model, batch, K, memory_budget_mib=BUDGET_MIB, keep_sums=False)
            used.update(s.info)

        fns = {"step": step, "probe": probe}
        if args.loop:
            fns["loop"] = lambda model=model, batch=batch, K=K: bin_sums(model, batch, K, method="loop")
        for kind in ("BackPACK", "Opacus"):
            run = library_probe(kind, copy.deepcopy(model), batch, K)
            if run is not None:
                fns[kind] = run
        med = measure(fns, args.reps, time.perf_counter if args.clock == "wall" else time.thread_time)
        P = sum(p.numel() for p in model.parameters())
        extra = f"   {med['loop'] / med['step']:10.1f}" if args.loop else ""
        print(
            f"{name:<20} {B:>5} {K:>3} {P:>9,} {med['step'] * 1e3:9.2f} {med['probe'] * 1e3:9.2f} "
            f"{med['probe'] / med['step']:6.2f}  {used['engine']}/{used['chunk_size']}{extra}"
        )
        for kind in ("BackPACK", "Opacus"):
            if kind in med:
                print(
                    f"{'  ' + kind:<20} {B:>5} {K:>3} {'':>9} {'':>9} {med[kind] * 1e3:9.2f} "
                    f"{med[kind] / med['step']:6.2f}"
                )


if __name__ == "__main__":
    main()
