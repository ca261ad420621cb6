"""Time one training step and each gradient-variance probe of a training config on this machine's device.

    python scripts/probe_cost.py OUT.json [train.py overrides ...]

Composes ``conf/train.yaml`` with the overrides, builds the run as ``train.py`` does (``flowmatch.entry.build``),
then on CUDA when available (else the CPU):

- a training step: forward, backward and optimizer step of one batch (``data.batch_size`` pairs from the coupling,
  t ~ U(0, 1)), under bf16 autocast when ``trainer.precision`` is bf16-mixed; mean of ``--steps`` steps after
  ``--warmup`` steps;
- each ``GradientVarianceCallback`` of ``callbacks``: its probe exactly as the callback measures it in one process
  (``draw_fixed``, ``probe`` - the Euler trajectory for integrated samples - and ``flowmatch.gradvar.bin_sums`` with
  the callback's chunk size and memory budget, under bf16 autocast like the training step), the best of
  ``--repeats`` runs after one warm-up run, with its engine record (engine, chunk size);

and writes OUT.json: seconds per step, seconds per probe, the probe's cost in training steps, its amortized overhead
(probe seconds / (every_n_steps x step seconds)) and the peak GPU memory of the steps and of each probe.
Used by ``scripts/paper_scale_check.sh``; runs on a CPU too (slowly) for small configs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_training_step(module, coupling, batch: int, device, bf16: bool, warmup: int, steps: int) -> float:
    """Mean seconds of one optimizer step (forward, backward, step) on fresh batches from the coupling."""
    from flowmatch.losses import per_sample_loss

    out = module.configure_optimizers()
    opt = out["optimizer"] if isinstance(out, dict) else out
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = _sync(device)
        x0, x1 = (x.to(device) for x in coupling.sample(batch, g))
        t, eps = module.draw_t_eps(x0)
        with autocast:
            loss = per_sample_loss(module.model, module.interpolant(x0, x1, t, eps)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (_sync(device) - t0) / steps


def time_probe(cb, module, coupling, device, repeats: int, bf16: bool = False) -> tuple[float, dict]:
    """Best-of-``repeats`` seconds of one probe of callback ``cb`` (after a warm-up run; one process, so the sums'
    squared norms only, as the callback does; under bf16 autocast when training uses it) and the probe's engine
    record (``BinSums.info``)."""
    from flowmatch import gradvar as gv

    cb.fixed = cb.draw_fixed(coupling, module.interpolant)
    best, info = float("inf"), {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for i in range(repeats + 1):
        t0 = _sync(device)
        with autocast:
            sums = gv.bin_sums(
                module.model,
                cb.probe(module),
                cb.edges,
                method=cb.method,
                chunk_size=cb.chunk_size,
                memory_budget_mib=cb.memory_budget_mib,
                keep_sums=False,
            )
        if i > 0:
            best = min(best, _sync(device) - t0)
        info = sums.info
    return best, info


def main(argv: list[str] | None = None) -> dict:
    """Command line (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from flowmatch.entry import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datamodule, module, _ = build(cfg)
    module.to(device).train()
    bf16 = device.type == "cuda" and "bf16" in str(cfg.trainer.get("precision", ""))
    _reset_peak(device)
    step_s = time_training_step(
        module, datamodule.coupling, int(cfg.data.batch_size), device, bf16, args.warmup, args.steps
    )
    result = {
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16 autocast" if bf16 else "float32",
        "batch_size": int(cfg.data.batch_size),
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "step_s": step_s,
        "steps_per_s": 1.0 / step_s,
        "step_peak_memory_gib": _peak_gib(device),
        "probes": {},
    }
    print(f"flowmatch probe-cost: training step {step_s * 1e3:.1f} ms ({result['device']}, {result['precision']})")
    for name, node in (cfg.get("callbacks") or {}).items():
        if not str(node.get("_target_", "")).endswith("GradientVarianceCallback"):
            continue
        cb = instantiate(node)
        _reset_peak(device)
        probe_s, info = time_probe(cb, module, datamodule.coupling, device, args.repeats, bf16)
        result["probes"][name] = {
            "source": cb.source,
            "probe_size": cb.n_per_bin * cb.K,
            "every_n_steps": cb.every,
            "probe_s": probe_s,
            "probe_in_training_steps": probe_s / step_s,
            "amortized_overhead": probe_s / (cb.every * step_s),
            "probe_peak_memory_gib": _peak_gib(device),
            "engine": info,
        }
        p = result["probes"][name]
        print(
            f"flowmatch probe-cost: {name} ({cb.source}, {p['probe_size']} samples) {probe_s:.2f} s = "
            f"{p['probe_in_training_steps']:.1f} training steps; every {cb.every} steps: "
            f"+{100 * p['amortized_overhead']:.2f}% of training time; engine {info.get('engine')}, "
            f"chunk {info.get('chunk_size')} ({info.get('chunk_size_setting')})"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
