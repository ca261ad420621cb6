"""Evaluate a trained checkpoint: ``python evaluate.py ckpt_path=PATH [task=...] [solver=...]``.

``task=metrics`` writes metrics.json (``eval/...``) into this run's dir;
``task=reflow_pairs`` integrates fresh sources and writes reflow_pairs.pt for ``coupling=reflow``;
``task=gradvar_field`` (no checkpoint) tabulates the per-bin gradient variance of a Lemma-1 field,
Monte Carlo next to the closed form (gradvar_field.csv, gradvar_field.png);
``task=lemma1`` (no checkpoint) checks Lemma 1 by dopri5 through the closed-form fields and fits an MLP and the
affine model to v_OT (lemma1_integration.csv, lemma1_fit.csv);
``task=stability`` measures the sampling stability of the checkpoint's flow in float64: endpoint error against
the number of ODE steps and the amplification of a perturbation injected at time t (stability.csv).
"""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowmatch.checkpoints import CheckpointError, architecture_error, read_checkpoint
from flowmatch.entry import build, fail, preflight, run_evaluation, set_threads, user_errors, write_json
from flowmatch.streams import generator
from flowmatch.sweeps import exit_status, job_guard
from flowmatch.terminal import quiet, say

TASKS = ("metrics", "reflow_pairs", "gradvar_field", "lemma1", "stability")


def _datamodule_key(run_cfg: DictConfig) -> str:
    """The checkpoint key Lightning stores the datamodule's state under: its class's qualified name."""
    return str(run_cfg.data._target_).rsplit(".", 1)[-1]


def load_checkpoint(cfg: DictConfig):
    """Rebuild (run config, datamodule, module, solver) from ``cfg.ckpt_path``."""
    if cfg.ckpt_path is None:
        fail(f"ckpt_path is required for task={cfg.task} (a checkpoint written by train.py)")
    try:
        ckpt = read_checkpoint(cfg.ckpt_path)
    except CheckpointError as exc:
        fail(str(exc))
    run_cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    with user_errors():
        datamodule, module, solver = build(run_cfg, ckpt.get(_datamodule_key(run_cfg), {}))
        if cfg.get("solver") is not None:
            solver = instantiate(cfg.solver)
    problem = architecture_error(ckpt, module.model, OmegaConf.to_container(run_cfg.model), cfg.ckpt_path)
    if problem:  # the stored config and the stored weights disagree: the file was altered
        fail(problem)
    module.load_state_dict(ckpt["state_dict"])
    if cfg.use_ema and hasattr(module, "load_ema_from_checkpoint"):
        module.load_ema_from_checkpoint(ckpt)
    return run_cfg, datamodule, module, solver


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> dict | None:
    """One job: :func:`evaluate`; in a sweep, a failed job is recorded and the others go on."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet(cfg.verbose)
    with job_guard(run_dir):
        return evaluate(cfg, run_dir)
    return None  # a failed sweep job (reported at the end of the sweep)


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg.task`` and return its summary (metrics for ``task=metrics``)."""
    if cfg.task not in TASKS:
        fail(f"task must be one of {list(TASKS)}, got {cfg.task!r}")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.task == "gradvar_field":
        return gradvar_field(cfg, run_dir)
    if cfg.task == "lemma1":
        return lemma1(cfg, run_dir)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    run_cfg, datamodule, module, solver = load_checkpoint(cfg)
    with user_errors():
        eval_options = instantiate(cfg.eval)
    module.to(device).eval()
    if cfg.task == "reflow_pairs":
        return reflow_pairs(cfg, datamodule, module, solver, device, run_dir)
    if cfg.task == "stability":
        return stability(cfg, run_cfg, datamodule, module, device, run_dir)
    metrics = run_evaluation(module, datamodule, solver, eval_options, device, run_dir, cfg.ckpt_path)
    write_json(run_dir / "metrics.json", metrics)
    say(f"flowmatch: wrote {run_dir / 'metrics.json'}")
    return metrics


def reflow_pairs(cfg, datamodule, module, solver, device, run_dir: Path) -> dict:
    """Integrate ``reflow.n_pairs`` fresh sources x0 ~ p0 to x1 = Phi(x0); save them for coupling=reflow."""
    g = generator(cfg.seed, "reflow")
    x0 = datamodule.p0.sample(int(cfg.reflow.n_pairs), g)
    x1 = torch.cat(
        [solver.integrate(module.velocity, chunk.to(device)).x1.cpu() for chunk in x0.split(int(cfg.reflow.batch_size))]
    )
    out = run_dir / "reflow_pairs.pt"
    torch.save({"x0": x0, "x1": x1, "solver": solver.tag, "ckpt_path": str(cfg.ckpt_path)}, out)
    say(f"flowmatch: wrote {out} ({len(x0)} pairs); train on them with coupling=reflow coupling.pairs_path={out}")
    return {"n_pairs": len(x0)}


def stability(cfg: DictConfig, run_cfg: DictConfig, datamodule, module, device, run_dir: Path) -> dict:
    """Sampling stability (flowmatch.stability.stability_rows) of the sampling weights, in ``stability.dtype``, on
    ``stability.n_samples`` sources x0 ~ p0 with ``stability.n_directions`` perturbation directions each (both
    from the ``stability`` stream) -> stability.csv, each row tagged with the run's direction, data, sigma, seed."""
    from flowmatch.plots.common import write_csv
    from flowmatch.stability import stability_rows, unit_directions

    s = OmegaConf.to_container(cfg.stability, resolve=True)
    for key in ("n_samples", "n_directions"):
        if not (isinstance(s[key], int) and not isinstance(s[key], bool) and s[key] >= 1):
            fail(f"stability.{key} must be an integer >= 1, got {s[key]!r}")
    if s["dtype"] not in ("float32", "float64"):
        fail(f"stability.dtype must be one of ['float32', 'float64'], got {s['dtype']!r}")
    dtype = getattr(torch, s["dtype"])
    model = copy.deepcopy(module.velocity_model()).to(device=device, dtype=dtype).eval()
    g = generator(cfg.seed, "stability")
    x0 = datamodule.p0.sample(s["n_samples"], g).to(device, dtype)
    dirs = unit_directions(len(x0), s["n_directions"], x0.shape[1:], g, dtype=dtype).to(device)
    keys = ("methods", "steps", "ref_atol", "ref_rtol", "times", "eps", "atol", "rtol")
    with user_errors(), torch.no_grad():
        rows = stability_rows(model, x0, dirs, **{k: s[k] for k in keys})
    data = run_cfg.data.get("kind") or run_cfg.data._target_.rsplit(".", 1)[-1].replace("DataModule", "").lower()
    tags = {
        "direction": run_cfg.direction.name,
        "data": data,
        "sigma": float(run_cfg.interpolant.get("sigma", 0.0)),
        "seed": int(run_cfg.seed),
        "n_samples": len(x0),
        "ckpt_path": str(cfg.ckpt_path),
    }
    path = write_csv(run_dir / "stability.csv", [{**tags, **r} for r in rows])
    for r in rows:
        if r["measure"] == "sensitivity":
            say(f"stability {tags['direction']}: t={r['t']:.2f} mean ||dx1||/||dx_t|| = {r['mean']:.3g}")
    say(f"flowmatch: wrote {path}")
    return {"rows": len(rows)}


def gradvar_field(cfg: DictConfig, run_dir: Path) -> dict:
    """Per-bin gradient variance of the ``gaussian_affine`` model at a Lemma-1 field (Prop. 1, Fig. 4-5)."""
    from flowmatch.analysis.field_table import field_gradvar_rows
    from flowmatch.plots.gradvar import plot_field_table

    g = OmegaConf.to_container(cfg.gradvar_field, resolve=True)
    with user_errors():
        interpolant, coupling = instantiate(cfg.interpolant), instantiate(cfg.coupling)
        rows = field_gradvar_rows(
            field=cfg.field.name, angle=float(cfg.field.angle), coupling=coupling, interpolant=interpolant, **g
        )
    path = run_dir / "gradvar_field.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    angle = f" {coupling.angle:g} deg" if hasattr(coupling, "angle") else ""
    title = (
        f"field={cfg.field.name} (angle {cfg.field.angle:g}), coupling={coupling.name}{angle}, "
        f"{interpolant.name} sigma={interpolant.sigma:g}, d={g['dim']}"
    )
    png = plot_field_table(rows, run_dir / "gradvar_field.png", title)
    say(f"flowmatch: wrote {path} and {png}")
    return {"rows": len(rows)}


def _lemma1_settings(cfg: DictConfig) -> dict:
    """The ``lemma1:`` block as plain values; a bad value stops with one line naming key, value and what is allowed."""
    s = OmegaConf.to_container(cfg.lemma1, resolve=True)

    def need(key, ok, allowed):
        if not ok(s.get(key)):
            fail(f"lemma1.{key} must be {allowed}, got {s.get(key)!r}")

    def is_int(lo):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    for key in ("dim", "n_samples", "depth", "fit_steps", "batch_size", "n_test"):
        need(key, is_int(1), "an integer >= 1")
    need("seed", is_int(0), "an integer >= 0")
    for key in ("lr", "affine_lr", "atol", "rtol", "fit_atol", "fit_rtol", "mean_scale"):
        need(key, positive, "a number > 0")
    need("angle", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number (degrees)")
    need("widths", lambda v: isinstance(v, list) and v and all(map(is_int(1), v)), "a non-empty list of integers >= 1")
    need(
        "eig_range",
        lambda v: isinstance(v, list) and len(v) == 2 and all(map(positive, v)) and v[0] <= v[1],
        "[lo, hi] with 0 < lo <= hi",
    )
    return s


def lemma1(cfg: DictConfig, run_dir: Path) -> dict:
    """Lemma 1 on a seeded random target N(mu, M): dopri5 through v_OT and the rotated field vs the partners
    (lemma1_integration.csv), and the fit error of MLPs of each width and of gaussian_affine (lemma1_fit.csv)."""
    import time

    from flowmatch.analysis.lemma1 import fit_rows, integration_rows, random_target
    from flowmatch.plots.common import write_csv

    s = _lemma1_settings(cfg)  # seeds: target s.seed, sources s.seed + 1, fits s.seed + 2 (held out + 3)
    mean, cov = random_target(s["dim"], s["seed"], s["eig_range"], s["mean_scale"])
    rows = integration_rows(mean, cov, s["angle"], s["n_samples"], s["seed"] + 1, s["atol"], s["rtol"])
    for r in rows:
        say(f"lemma1 d={r['dim']} field={r['field']}: max ||x_hat1 - x1|| = {r['err_max']:.3g} ({r['status']})")
    integ = write_csv(run_dir / "lemma1_integration.csv", rows)
    start = time.perf_counter()

    def progress(row):
        name = f"mlp width {row['width']}" if row["model"] == "mlp" else row["model"]
        say(
            f"lemma1 d={row['dim']} fit {name}: rel err {row['rel_err']:.3g}, endpoint err "
            f"{row['endpoint_err_mean']:.3g} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    fit_keys = ("widths", "depth", "batch_size", "lr", "affine_lr", "n_test")
    fit = fit_rows(
        mean,
        cov,
        **{k: s[k] for k in fit_keys},
        steps=s["fit_steps"],
        seed=s["seed"] + 2,
        atol=s["fit_atol"],
        rtol=s["fit_rtol"],
        progress=progress,
    )
    fit_path = write_csv(run_dir / "lemma1_fit.csv", fit)
    say(f"flowmatch: wrote {integ} and {fit_path}")
    return {"integration": rows, "fit": fit}


if __name__ == "__main__":
    preflight("evaluate")
    main()
    sys.exit(exit_status())
