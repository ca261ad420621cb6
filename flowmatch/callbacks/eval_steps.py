"""Evaluate the flow at given training steps: ``<run dir>/eval_steps/step=XXXXXXX.json`` (``callbacks=eval_steps``).

When the optimizer step count reaches one of ``steps``, the current sampling weights (EMA when on) are scored
exactly as at the end of training: :func:`flowmatch.evaluation.evaluate_module` (``evaluate_flow`` in eval
mode) with the datamodule's ``eval_setup()``, the configured ``solver`` and ``options`` (the ``eval`` group;
``eval.enabled`` only switches the end-of-training evaluation, not this one). The file holds the same keys as
``metrics.json`` (registered in :mod:`flowmatch.keys`; nothing new): ``train/global_step``, the ``eval/`` keys
and the ``protocol/`` keys, except ``protocol/ckpt_path`` (the weights in memory, no checkpoint). The last
step of training is not special: its file holds the numbers metrics.json gets. One line of progress is printed.

Step S is complete once every callback's ``on_train_batch_end`` of step S has run (e.g. the EMA update) and the
validation of step S, so the evaluation runs at the start of the next training batch, or at the end of
training when S is the last step. Global rank zero only (the other ranks wait at their next collective).
No effect on training: the module returns to its previous (train) mode, gradients are not touched (the
solver integrates under ``no_grad``) and the global torch random state (CPU and the module's CUDA device) is
restored afterwards, so a run with this callback ends with the same weights as one without.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from flowmatch.evaluation import EvalOptions, evaluate_module
from flowmatch.keys import metric
from flowmatch.sampling import Solver
from flowmatch.terminal import say

__all__ = ["EvalAtSteps"]


class EvalAtSteps(L.Callback):
    """Writes ``eval_steps/step=XXXXXXX.json`` at each of ``steps`` optimizer steps (module docstring)."""

    def __init__(
        self,
        steps,
        solver: Solver | None = None,
        options: EvalOptions | None = None,
        dirname: str = "eval_steps",
    ) -> None:
        steps = [int(s) for s in steps]
        if not steps or min(steps) < 0:
            raise ValueError(f"callbacks.eval_steps.steps must be a non-empty list of steps >= 0, got {steps}")
        self.steps = sorted(set(steps))
        self.solver = solver if solver is not None else Solver("dopri5")
        self.options = options if options is not None else EvalOptions()
        self.dirname = dirname
        self.done: set[int] = set()
        self.written: list[Path] = []

    def path(self, trainer: L.Trainer, step: int) -> Path:
        """The file of ``step`` in the run dir (``trainer.default_root_dir``, where train.py writes)."""
        return Path(trainer.default_root_dir) / self.dirname / f"step={step:07d}.json"

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """``train/global_step``, ``eval/...`` and ``protocol/...`` of the current sampling weights."""
        device = pl_module.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = evaluate_module(pl_module, trainer.datamodule.eval_setup(), self.solver, self.options, device)
        return {metric("train/global_step"): float(trainer.global_step), **result.metrics, **result.protocol}

    def _maybe_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.done:
            return
        self.done.add(step)
        if not trainer.is_global_zero:
            return
        values = self.evaluate(trainer, pl_module)
        path = self.path(trainer, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: a partial file never replaces a good one
        self.written.append(path)
        say(f"flowmatch: eval at step {step}: {_summary(values, self.solver.tag)} -> {path}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._maybe_evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe_evaluate(trainer, pl_module)
        missed = [s for s in self.steps if s > trainer.global_step]
        if missed and trainer.is_global_zero:
            say(f"flowmatch: eval_steps {missed} not reached (training ended at step {trainer.global_step})")


def _summary(values: dict, tag: str) -> str:
    """One line: pair accuracy with the solver and each Euler step count, L2 to partner / OT map, else W2."""
    acc = metric("eval/pair_acc")
    if acc not in values:
        keys = [metric("eval/l2_ot"), metric("eval/w2"), metric("eval/mmd_gen")]
        return ", ".join(f"{k.split('/', 1)[1]} {values[k]:.3g}" for k in keys if k in values)
    prefix = acc + "@euler"
    euler = sorted((int(k[len(prefix) :]), v) for k, v in values.items() if k.startswith(prefix))
    parts = [f"pair_acc {tag} {values[acc]:.2f}", "euler " + " ".join(f"{k}:{v:.2f}" for k, v in euler)]
    for name in ("eval/l2_partner", "eval/l2_ot"):
        if metric(name) in values:
            parts.append(f"{name.split('/', 1)[1]} {values[metric(name)]:.3f}")
    return ", ".join(parts)
