"""The paper-scale plan (``make figures-paper``): for each item of REPRODUCTION.md (1-12), the command that runs it and
the expected GPU-hours, with how they were estimated. Nothing is trained; no GPU is needed to print it.

CPU items run as they are (``make <item>``). For the GPU items the paper-scale overlay
``conf/experiment/paper/<overlay>.yaml`` is composed with Hydra, its model is instantiated on the CPU and the FLOPs
of one forward and of one forward + backward of one sample are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications, convolutions and attention; element-wise
work is not counted). Then, per training job:

    training   = F_fb * batch * max_steps                                   (bf16-mixed)
    probes     = n_probes * probe_size * (F_fb * PROBE_OVERHEAD  [+ ode_steps * F_f  for integrated samples])
                 (run in float32 outside autocast: counted at FP32_FRACTION of the bf16 throughput)
    evaluation = (eval.n_fresh + training pairs) * NFE * F_f
    hours      = sum / (sustained bf16 throughput) / 3600,   times the number of jobs of the sweep

THIS IS AN ESTIMATE from FLOP counts and assumed sustained throughputs (below), not a measurement: run
``scripts/paper_scale_check.sh`` on the GPU to measure steps/s, memory and the probe's cost, and scale.
A paper-scale overlay can declare its sweep on a header line ``# sweep: k=v1,v2 ...`` (and ``# extra_jobs: N`` for
stages outside the sweep, e.g. the first flow of 1-ReFlow); otherwise the default sweep written below is used.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONF = ROOT / "conf"

# Assumed sustained bf16 throughput of a UNet training step at batch 128, counting only the FLOPs FlopCounterMode sees
# (dense peak: A100 312, H100 SXM 989 TFLOP/s; convolutional UNets at 32x32-64x64 with GroupNorm and SiLU between
# the convolutions are partly memory-bound: about a quarter of the peak on an A100, a fifth on an H100, assumed).
SUSTAINED_TFLOPS = {"A100": 80.0, "H100": 200.0}
FP32_FRACTION = 0.5  # probes run in float32 (TF32 tensor cores): about half the bf16 rate
PROBE_OVERHEAD = 3.0  # exact per-sample gradients cost about 3 plain forward+backward passes per sample (assumed)
ADAPTIVE_NFE = 100  # dopri5 velocity evaluations assumed for an adaptive evaluation solver

# Measured on one NVIDIA H200 (torch 2.11, bf16-mixed) on 2026-12-04 by scripts/paper_scale_check.sh (200 steps on
# synthetic images of the same shape, STEPS=200 PROBE_REPEATS=1; numbers in REPRODUCTION.md, "Paper scale"):
# train.py's steps/s with the overlay's own callbacks (EMA; probes not firing in the window) and seconds per probe.
# table3_paper has the model, resolution and batch of table2_paper: its steps/s are table2_paper's (not measured).
MEASURED_GPU = "H200"
MEASURED_STEPS_PER_S = {"table2_paper": 5.76, "table3_paper": 5.76, "fig-gradvar_paper": 6.99}
MEASURED_PROBE_S = {"fig-gradvar_paper": {"gradvar": 1.19, "gradvar_integrated": 7.28}, "table2_paper": {}}

CPU_ITEMS = [
    ("lemma1", 1, "Lemma 1: dopri5 through the closed-form fields; MLP fit error vs width"),
    ("prop1", 2, "Prop. 1: zero loss/variance of pair-optimal fields at sigma = 0"),
    ("fig4", 3, "Fig. 4: gradient variance at v_OT vs the rotated field with noise"),
    ("fig5", 4, "Fig. 5: variance at v_OT, independent vs rotated coupling, against dimension"),
    ("fig6", 5, "Fig. 6: 180-degree rotation, pair accuracy vs Euler steps and training length"),
    ("prop2", 6, "Prop. 2: fixed random pairs to a Gaussian mixture memorized at sigma = 0"),
    ("table1", 7, "Table 1: memorization / generalization MMD on the Gaussian mixture"),
    ("fig-stability", 11, "forward vs backward flows: endpoint error vs steps, perturbation amplification"),
    ("lemma2", 12, "Lemma 2: noiseless ReFlow on a non-crossing coupling returns the same coupling"),
]


@dataclass
class GpuItem:
    """A GPU item: its make name, number, paper-scale overlay, default sweep, extra jobs and figure script."""

    name: str
    number: int
    what: str
    overlay: str
    sweep: str
    extra_jobs: int = 0


GPU_ITEMS = [
    GpuItem(
        "table2",
        8,
        "adversarial (shuffled OT) coupling on CelebA 64x64, 5K and 50K images, sigma 0 vs 0.05",
        "table2_paper",
        "interpolant.sigma=0.0,0.05 data.subset=5000,50000",
    ),
    GpuItem(
        "table3",
        9,
        "simulated 1-ReFlow on CelebA 64x64 (5K), sigma 0 vs 0.05",
        "table3_paper",
        "interpolant.sigma=0.0,0.05",
        extra_jobs=1,
    ),
    GpuItem(
        "fig-gradvar",
        10,
        "gradient-variance profile of forward / backward fields on CIFAR-10",
        "fig-gradvar_paper",
        "direction=forward,backward interpolant.sigma=0.0,0.05 seed=0,1,2",
    ),
]


def header_value(path: Path, key: str) -> str | None:
    """The value of a ``# key: value`` line among the first 40 lines of ``path`` (None when absent)."""
    for line in path.read_text().splitlines()[:40]:
        m = re.match(rf"#\s*{key}:\s*(.+)$", line.strip())
        if m:
            return m.group(1).strip()
    return None


def jobs_of(sweep: str) -> int:
    """Number of jobs of a Hydra sweep string: the product of the value counts of its overrides."""
    n = 1
    for ov in sweep.split():
        value = ov.split("=", 1)[1] if "=" in ov else ""
        depth, count = 0, 1
        for ch in value:
            depth += ch in "[("
            depth -= ch in "])"
            count += ch == "," and depth == 0
        n *= count
    return n


def compose(overlay: str):
    """The composed training config of ``experiment=paper/<overlay>``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=[f"experiment=paper/{overlay}"])


def flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[float, float]:
    """(F_f, F_fb): FLOPs (FlopCounterMode: 2 per multiply-add) of one forward and of one forward + backward of
    ``model(x, t)`` per sample of ``shape``, counted on a batch of 2 and halved."""
    x, t = torch.randn(2, *shape), torch.rand(2)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(x, t)
    with FlopCounterMode(display=False) as both:
        model(x, t).pow(2).mean().backward()
    return fwd.get_total_flops() / 2, both.get_total_flops() / 2


def count_flops(cfg) -> tuple[float, float, int]:
    """(F_f, F_fb, parameters) of the config's model on its images (:func:`flops_per_sample`)."""
    from hydra.utils import instantiate

    model = instantiate(cfg.model)
    f_f, f_fb = flops_per_sample(model, (cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    return f_f, f_fb, sum(p.numel() for p in model.parameters())


def n_probes(steps: int, every: int) -> int:
    """Probes of one job: at step 0, every ``every`` steps, and at the end when it is not a multiple."""
    return steps // every + 1 + (steps % every != 0)


def measured_hours(overlay: str, cfg) -> float | None:
    """GPU-hours of one job from the measured steps/s and probe seconds (None when this overlay was not measured;
    evaluation not included)."""
    if overlay not in MEASURED_STEPS_PER_S:
        return None
    steps = int(cfg.trainer.max_steps)
    secs = steps / MEASURED_STEPS_PER_S[overlay]
    for name, node in (cfg.get("callbacks") or {}).items():
        if name in MEASURED_PROBE_S.get(overlay, {}):
            secs += n_probes(steps, int(node.every_n_steps)) * MEASURED_PROBE_S[overlay][name]
    return secs / 3600


def probe_flops(cfg, f_f: float, f_fb: float) -> tuple[float, str]:
    """FLOPs of every gradient-variance probe of one job (float32), with a one-line breakdown."""
    total, parts = 0.0, []
    steps = int(cfg.trainer.max_steps)
    for name, node in (cfg.get("callbacks") or {}).items():
        if not str(node.get("_target_", "")).endswith("GradientVarianceCallback"):
            continue
        every, size = int(node.every_n_steps), int(node.probe_size)
        count = n_probes(steps, every)
        per = size * f_fb * PROBE_OVERHEAD
        if node.get("source") == "integrated":
            per += size * int(node.ode_steps) * f_f
        total += count * per
        parts.append(
            f"{name}: {count} probes x {size} samples"
            + (f", {node.ode_steps} Euler steps" if node.get("source") == "integrated" else "")
        )
    return total, "; ".join(parts) or "none"


def eval_flops(cfg, f_f: float) -> float:
    """FLOPs of the end-of-training evaluation: fresh samples and training pairs through the solver and Euler."""
    if not cfg.eval.enabled:
        return 0.0
    nfe = int(cfg.solver.steps) * {"euler": 1, "midpoint": 2, "rk4": 4}.get(cfg.solver.method, 0) or ADAPTIVE_NFE
    n_pairs = int(cfg.coupling.get("n_pairs") or 0)
    return (int(cfg.eval.n_fresh) * nfe + n_pairs * (nfe + sum(cfg.eval.euler_steps))) * f_f


def gpu_plan(item: GpuItem) -> list[str]:
    """The lines printed for one GPU item."""
    path = CONF / "experiment" / "paper" / f"{item.overlay}.yaml"
    sweep = item.sweep
    extra = item.extra_jobs
    lines = [f"[{item.number:>2}] {item.name}: GPU — {item.what}"]
    if path.exists():
        sweep = header_value(path, "sweep") or sweep
        extra = int(header_value(path, "extra_jobs") or extra)
    run = f"outputs/paper-scale/{item.name}"
    module = item.name.replace("-", "_")
    lines += [
        f"     python train.py --multirun experiment=paper/{item.overlay} {sweep} \\",
        f"       hydra.sweep.dir={run} 'hydra.sweep.subdir=${{hydra.job.num}}' trainer.enable_progress_bar=false",
        f"     python -m flowmatch.plots.{module} {run} figures-paper/{item.name}",
    ]
    if not path.exists():
        lines.append(f"     (conf/experiment/paper/{item.overlay}.yaml is not in this tree: no estimate)")
        return lines
    cfg = compose(item.overlay)
    f_f, f_fb, n_params = count_flops(cfg)
    batch, steps = int(cfg.data.batch_size), int(cfg.trainer.max_steps)
    train = f_fb * batch * steps
    probes, probe_text = probe_flops(cfg, f_f, f_fb)
    evals = eval_flops(cfg, f_f)
    jobs = jobs_of(sweep) + extra
    lines += [
        f"     model {cfg.model._target_.rsplit('.', 1)[-1]} ({n_params / 1e6:.1f} M parameters) on "
        f"{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}: F_f = {f_f / 1e9:.2f} GFLOP, "
        f"F_fb = {f_fb / 1e9:.2f} GFLOP per sample (FlopCounterMode)",
        f"     per job: {steps:,} steps x batch {batch} = {train / 1e15:.0f} PFLOP training; probes ({probe_text}) "
        f"{probes / 1e15:.1f} PFLOP; evaluation {evals / 1e15:.2f} PFLOP",
        f"     jobs: {jobs} (sweep {sweep!r}" + (f" + {extra} extra" if extra else "") + ")",
    ]
    if "root" in cfg.data:
        lines.append(f"     data files under data.root ({cfg.data.root}; set FLOWMATCH_DATA), see conf/data/")
    for gpu, tflops in SUSTAINED_TFLOPS.items():
        secs = (train + evals) / (tflops * 1e12) + probes / (FP32_FRACTION * tflops * 1e12)
        lines.append(
            f"     estimate on {gpu} (assumed {tflops:.0f} TFLOP/s sustained bf16): {secs / 3600:.1f} GPU-h per job, "
            f"{jobs * secs / 3600:.0f} GPU-h in all"
        )
    hours = measured_hours(item.overlay, cfg)
    if hours is not None:
        lines.append(
            f"     MEASURED on an {MEASURED_GPU} ({MEASURED_STEPS_PER_S[item.overlay]:.2f} steps/s incl. EMA, probes "
            f"at their measured cost; evaluation not included): {hours:.1f} GPU-h per job, "
            f"{jobs * hours:.0f} GPU-h in all"
        )
    return lines


def main() -> None:
    """Print the plan for items 1-12."""
    torch.set_num_threads(min(4, torch.get_num_threads()))
    print("flowmatch paper-scale plan (REPRODUCTION.md items 1-12). GPU-hours are ESTIMATES from FLOP counts, not")
    print("measurements: F_fb x batch x steps + probes + evaluation, divided by an assumed sustained throughput")
    print(
        f"(A100 {SUSTAINED_TFLOPS['A100']:.0f}, H100 {SUSTAINED_TFLOPS['H100']:.0f} TFLOP/s bf16; probes in float32 at "
        f"{FP32_FRACTION:g}x that; per-sample gradients {PROBE_OVERHEAD:g}x a forward+backward). Measure with "
        "scripts/paper_scale_check.sh;\nwhere it was run (an H200, 2026-12-04) the MEASURED line is the better guide.\n"
    )
    rows = [(n, f"[{n:>2}] {name}: CPU only, no GPU needed — {what}\n     make {name}") for name, n, what in CPU_ITEMS]
    for item in GPU_ITEMS:
        try:
            rows.append((item.number, "\n".join(gpu_plan(item))))
        except Exception as exc:  # noqa: BLE001 - one broken overlay must not hide the rest of the plan
            rows.append(
                (item.number, f"[{item.number:>2}] {item.name}: GPU — could not estimate: {type(exc).__name__}: {exc}")
            )
    for _, text in sorted(rows):
        print(text)
    print("\nCPU items: each finishes in under 15 minutes on 2 cores (make figures runs them all).")
    print("GPU jobs run one after another with Hydra's default launcher; on a cluster add a launcher (e.g. submitit).")


if __name__ == "__main__":
    main()
