"""GradientVarianceCallback: per-time-bin gradient variance on a fixed probe, during training.

Enabled by ``callbacks=gradvar``; settings under ``callbacks.gradvar``. Every ``every_n_steps``
optimizer steps (and at the start and the end of training) it evaluates :func:`flowmatch.gradvar.bin_sums`
on a probe of ``probe_size`` samples with equal counts per time bin, all-reduces the sums across
DDP ranks (so the result equals one process on the union of the ranks' probes), logs
``gradvar/bin_{k:02d}/{var,sqnorm,loss}`` to every logger (unless ``log`` is false: a second probe in the same
run writes only its CSV, so the logged keys stay those of one probe), appends rows to ``gradvar.csv`` in the
run dir (with ``groups``: per-parameter-group rows in ``gradvar_groups.csv``) and, at the end, draws
``gradvar_heatmap.png`` and ``gradvar_profile.png`` and sends the heatmap to the loggers that take images
(``gradvar/heatmap``, unless ``log`` is false). The engine and chunk size of the probe (``chunk_size: auto``:
the largest chunk whose estimated memory fits ``memory_budget_mib``) are recorded in ``<csv stem>_engine.json``
beside the CSV (``gradvar_engine.json``), rewritten when they change. In one process the probe forms only the
squared norms of the per-bin gradient sums (``keep_sums=False``); under DDP the sums themselves, to all-reduce.

Probe sources (``source``):
- ``interpolant``: seeded pairs from the coupling, eps and stratified t, fixed for the whole run;
  x_t, u_t from the interpolant exactly as in the training loss;
- ``pairs``: the coupling's finite training pairs (fixed, rotated with n_pairs, shuffled_ot,
  reflow), cycled over the bins; x_t, u_t from the interpolant;
- ``integrated``: fixed sources integrated by the *current* model (Euler, ``ode_steps``); x_t is
  the trajectory at each probe time and u = x_hat1 - x0 the velocity of the pair the trajectory
  defines (the paper's "variance in integrated samples"); recomputed at every probe.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from flowmatch import gradvar as gv
from flowmatch.callbacks.media import log_image, sigma_caption
from flowmatch.gradvar_memory import keep_host_heap
from flowmatch.interpolants import PathSample
from flowmatch.keys import gradvar_key, media_key
from flowmatch.sampling import Solver
from flowmatch.streams import generator

SOURCES = ("interpolant", "pairs", "integrated")
ENGINE_KEYS = ("engine", "chunk_size", "chunk_size_setting", "n_chunks", "memory_budget_mib", "bytes_per_sample")
ENGINE_KEYS += ("fixed_bytes", "sums_bytes", "keep_sums", "device", "dtype", "autocast")


class GradientVarianceCallback(L.Callback):
    """Measures the per-time-bin gradient-variance statistics on a fixed probe during training (module docstring)."""

    def __init__(
        self,
        bins=10,
        every_n_steps: int = 500,
        probe_size: int = 400,
        source: str = "interpolant",
        method: str = "auto",
        chunk_size: int | str = "auto",
        memory_budget_mib: float | None = 2048,
        ode_steps: int = 100,
        seed: int = 0,
        groups: str | None = None,
        filename: str = "gradvar.csv",
        plot: bool = True,
        log: bool = True,
    ) -> None:
        self.edges = gv.bin_edges(bins)
        self.K = self.edges.numel() - 1
        if source not in SOURCES:
            raise ValueError(f"callbacks.gradvar.source must be one of {list(SOURCES)}, got {source!r}")
        if int(every_n_steps) < 1:
            raise ValueError(f"callbacks.gradvar.every_n_steps must be >= 1, got {every_n_steps}")
        if int(probe_size) < 2 * self.K:
            raise ValueError(
                f"callbacks.gradvar.probe_size must be >= 2 x the number of bins ({2 * self.K}), got {probe_size}"
            )
        if int(probe_size) % self.K:
            raise ValueError(
                f"callbacks.gradvar.probe_size={probe_size} must be a multiple of the {self.K} bins (an equal count "
                f"per bin)"
            )
        if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"callbacks.gradvar.chunk_size must be 'auto' or an integer >= 1, got {chunk_size!r}")
        budget = memory_budget_mib
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(
                f"callbacks.gradvar.memory_budget_mib must be a number > 0 (MiB) or null, got {memory_budget_mib!r}"
            )
        if method not in ("auto", *gv.ENGINES):
            raise ValueError(f"callbacks.gradvar.method must be one of {['auto', *gv.ENGINES]}, got {method!r}")
        self.every, self.n_per_bin, self.source = int(every_n_steps), int(probe_size) // self.K, source
        self.method, self.chunk_size, self.seed, self.groups = method, chunk_size, int(seed), groups
        self.memory_budget_mib = budget
        self.solver = Solver("euler", steps=int(ode_steps))
        self.filename, self.plot, self.to_loggers = filename, bool(plot), bool(log)
        self.fixed: PathSample | None = None
        self.last_step = -1
        self.last_stats: gv.GradVarStats | None = None
        self.last_engine: dict | None = None

    # --- probe ----------------------------------------------------------------------------
    def _pairs(self, coupling, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.source != "pairs":
            return coupling.sample(n, g)
        if coupling.pairs is None:
            raise ValueError(
                f"callbacks.gradvar.source=pairs needs a finite coupling (fixed, rotated with n_pairs, "
                f"shuffled_ot, reflow), got {coupling.name}"
            )
        idx = torch.arange(n) % len(coupling.pairs[0])
        return coupling.pairs[0][idx], coupling.pairs[1][idx]

    def validate(self, datamodule, module) -> None:
        """Fail before training when the probe source cannot work with this coupling."""
        if self.source == "pairs" and datamodule.coupling.pairs is None:
            self._pairs(datamodule.coupling, 1, None)

    def draw_fixed(self, coupling, interpolant, rank: int = 0) -> PathSample:
        """The fixed part of the probe (x0, x1, t, eps and, for the interpolant and pairs sources, x_t, u_t),
        from the ``probe`` random stream of this rank, so ranks probe disjoint samples. Kept on the CPU (image data
        may live on the GPU, Gaussian sources on the CPU); :meth:`probe` moves it to the module's device."""
        g = generator(self.seed, "probe", rank)
        x0, x1 = (x.cpu() for x in self._pairs(coupling, self.n_per_bin * self.K, g))
        t = gv.stratified_times(self.n_per_bin, self.edges, g).float()
        eps = interpolant.sample_eps(x0, g)
        return interpolant(x0, x1, t, eps)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if pl_module.device.type == "cpu":  # the probe's temporaries from the heap, not fresh mappings (once)
            keep_host_heap()
        trainer.datamodule.setup(stage)
        self.fixed = self.draw_fixed(trainer.datamodule.coupling, pl_module.interpolant, trainer.global_rank)

    def probe(self, pl_module) -> PathSample:
        """The probe on the module's device. ``integrated``: x_t on the current model's Euler trajectory from
        x0 (linearly interpolated on the uniform grid at each probe time), x1 its endpoint, u_t = x1 - x0."""
        f = self.fixed.to(pl_module.device)
        if self.source != "integrated":
            return f
        t, x0 = f.t, f.x0
        res = self.solver.integrate(pl_module.model, x0, return_traj=True)
        pos = t.double() * self.solver.steps
        lo = pos.floor().long().clamp(max=self.solver.steps - 1)
        w = (pos - lo).to(res.traj.dtype).reshape(-1, *[1] * (x0.dim() - 1))
        idx = torch.arange(len(t), device=t.device)
        xt = (1 - w) * res.traj[lo, idx] + w * res.traj[lo + 1, idx]
        return PathSample(x0, res.x1, t, torch.zeros_like(x0), xt, res.x1 - x0)

    # --- measurement ----------------------------------------------------------------------
    def measure(self, trainer, pl_module) -> gv.GradVarStats:
        """Bin sums on this rank's probe, summed over ranks, turned into statistics."""
        with torch.inference_mode(False), torch.enable_grad():
            sums = gv.bin_sums(
                pl_module.model,
                self.probe(pl_module),
                self.edges,
                method=self.method,
                chunk_size=self.chunk_size,
                memory_budget_mib=self.memory_budget_mib,
                groups=self.groups,
                keep_sums=trainer.world_size > 1,
            )
        self._record_engine(trainer, sums.info)
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(sums.as_tensor().to(pl_module.device), reduce_op="sum")
            sums = sums.from_tensor(flat.cpu())
        return sums.to_stats()

    def _record(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return
        stats = self.measure(trainer, pl_module)
        self.last_step, self.last_stats = step, stats
        if not trainer.is_global_zero:
            return
        if self.to_loggers:
            logged = {}
            for k in range(self.K):
                logged[gradvar_key(k, "var")] = float(stats.grad_var[k])
                logged[gradvar_key(k, "sqnorm")] = float(stats.grad_sqnorm[k])
                logged[gradvar_key(k, "loss")] = float(stats.loss[k])
            for lg in trainer.loggers:
                lg.log_metrics(logged, step=step)
        self._append_csv(self._csv_path(trainer), stats.rows(step))
        if stats.groups:
            self._append_csv(self._csv_path(trainer).with_name("gradvar_groups.csv"), stats.group_rows(step))

    def _record_engine(self, trainer, info: dict) -> None:
        """Write ``<csv stem>_engine.json`` (rank 0) when the engine or chunk size differs from the last probe's."""
        rec = {k: info.get(k) for k in ENGINE_KEYS}
        if not trainer.is_global_zero or rec == self.last_engine:
            return
        self.last_engine = rec
        path = self._csv_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {**rec, "probe_size": self.n_per_bin * self.K, "bins": self.K, "step": trainer.global_step}
        path.with_name(path.stem + "_engine.json").write_text(json.dumps(out, indent=2) + "\n")

    def _csv_path(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    @staticmethod
    def _append_csv(path: Path, rows: list[dict]) -> None:
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    # --- checkpoints: a resumed run does not probe again the step its checkpoint was probed at ---------------
    @property
    def state_key(self) -> str:
        """One key per probe (its CSV file): several probes in one run keep separate states."""
        return self._generate_state_key(filename=self.filename)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = int(state_dict.get("last_step", -1))

    # --- hooks ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:  # nothing else happens on the other steps
            self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)
        if self.plot and trainer.is_global_zero and self._csv_path(trainer).exists():
            from flowmatch.plots.gradvar import plot_gradvar

            figures = plot_gradvar(self._csv_path(trainer), Path(trainer.default_root_dir), sigma_caption(pl_module))
            if figures and self.to_loggers:
                log_image(trainer, media_key("gradvar/heatmap"), figures[0])
