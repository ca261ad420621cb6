"""Where the gradient-variance probe's time goes on the MLP, as fractions of a training step, measured side by side
in one process (1 torch thread, interleaved as in benchmarks/gradvar_cost.py):

    step             forward + backward of the batch-mean flow-matching loss (no optimizer step)
    no statistics    bin_sums with the statistics of the Linear layers switched off: the hooks engine's forward and
                     its backward down to the layer outputs, plus the per-call bookkeeping
    backward only    the same forward + backward to the layer outputs, no hooks, no bookkeeping (the floor of any
                     engine that needs the output gradients)
    probe            bin_sums(model, batch, K, keep_sums=False), as the callback runs it

then the tensor operations of the statistics alone (torch.profiler over the Linear layers' reduction of the
probe's captured factors): count and self time per probe, the largest first.

Run: ``python benchmarks/gradvar_breakdown.py [--width 64] [--bins 10] [--batch 256] [--times random|stratified]
[--reps 31]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flowmatch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradvar_cost import BUDGET_MIB, make_batch, measure  # noqa: E402

from flowmatch import persample_hooks  # noqa: E402
from flowmatch.gradvar import bin_sums  # noqa: E402
from flowmatch.gradvar_memory import keep_host_heap  # noqa: E402
from flowmatch.losses import per_sample_loss  # noqa: E402
from flowmatch.models.mlp import MLP  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--times", choices=("random", "stratified"), default="random")
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    keep_host_heap()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, K = MLP(2, width=args.width, depth=3), args.bins
    batch = make_batch((2,), args.batch, K, args.times)
    Engine = persample_hooks.HooksEngine
    full, captured = Engine._row_layers, {}

    def capture(self, chunk, sink):  # keep one call's factors, then reduce them as usual
        captured["call"] = (self, list(self._rows), chunk, sink)
        return full(self, chunk, sink)

    def skip(self, chunk, sink):  # the held layers' statistics switched off
        self._rows = []
        return 0.0

    def step():
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, batch).mean().backward()

    def probe():
        Engine._row_layers = full
        bin_sums(model, batch, K, memory_budget_mib=BUDGET_MIB, keep_sums=False)

    def no_statistics():
        Engine._row_layers = skip
        bin_sums(model, batch, K, memory_budget_mib=BUDGET_MIB, keep_sums=False)

    layers, outs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)], []

    def backward_only():
        outs.clear()
        handles = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in layers]
        loss = per_sample_loss(model, batch)
        for h in handles:
            h.remove()
        torch.autograd.grad(loss.sum(), outs)

    try:
        Engine._row_layers = capture  # the first call also verifies the engine and plans the probe
        bin_sums(model, batch, K, memory_budget_mib=BUDGET_MIB, keep_sums=False)
        fns = {"step": step, "no statistics": no_statistics, "backward only": backward_only, "probe": probe}
        med = measure(fns, args.reps, time.thread_time)
    finally:
        Engine._row_layers = full
    print(
        f"MLP 3x{args.width}, B = {args.batch}, K = {K}, times {args.times}; median of {args.reps} interleaved "
        "repetitions (thread CPU time), 1 thread"
    )
    for name, v in med.items():
        print(f"  {name:<14} {v * 1e3:7.3f} ms  {v / med['step']:5.2f} x step")
    stats = med["probe"] - med["no statistics"]
    print(f"  {'statistics':<14} {stats * 1e3:7.3f} ms  {stats / med['step']:5.2f} x step  (probe - no statistics)")
    engine, items, chunk, sink = captured["call"]
    n = 50
    with torch.profiler.profile() as prof:
        for _ in range(n):
            engine._rows = list(items)
            full(engine, chunk, sink)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev) / n
    with Count() as count:
        engine._rows = list(items)
        full(engine, chunk, sink)
    print(f"statistics of the Linear layers: {count.n} tensor operations, {total:.0f} us self time (profiled)")
    for e in ev[:8]:
        print(f"  {e.key:<28} {e.count / n:5.1f} calls  {e.self_cpu_time_total / n:7.1f} us")


class Count(TorchDispatchMode):
    """Counts the tensor operations issued inside it (as tests/test_gradvar_reduce.py does)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    main()
