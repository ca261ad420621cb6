"""The shared DataModule: two end distributions, a direction and a coupling -> batches of pairs."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from flowmatch.couplings import Coupling
from flowmatch.direction import apply_direction
from flowmatch.evaluation import EvalSetup
from flowmatch.global_ot import global_ot_pair, world
from flowmatch.streams import generator, stream_seed
from flowmatch.terminal import say


class PairStream(IterableDataset):
    """An endless stream of coupled batches ``(x0, x1)``, each of ``batch_size`` pairs.

    With a coupling whose ``global_ot`` is true, each batch is drawn unpaired (``draw_independent``) and paired by
    one OT assignment over the union of every DDP rank's batch (:func:`flowmatch.global_ot.global_ot_pair`, a
    collective: every rank's stream yields in step; the draws, hence the generator states, are those of per-rank
    OT).

    Batch k is drawn from the generator state ``g_k`` reached after batches 0..k-1 of this rank's ``train``
    stream. The stream remembers the states of its last few batches (:meth:`state_at`), so a checkpoint can store
    where the next batch starts; ``resume = {"batch": k, "state": g_k}`` starts the stream at batch k (exact
    resume), ``resume = {"batch": k}`` without a state replays k batches (exact, costs k draws)."""

    KEEP = 16  # states kept: the loader prefetches, so the consumed batch lags the drawn one by a few

    def __init__(self, coupling: Coupling, batch_size: int, seed: int, resume: dict | None = None) -> None:
        self.coupling, self.batch_size, self.seed = coupling, int(batch_size), int(seed)
        self.resume, self._states = resume, {}

    def state_at(self, batch: int) -> dict:
        """``{"batch": batch, "state": g_batch}`` when that state is still remembered, else ``{"batch": batch}``."""
        out = {"batch": int(batch)}
        if batch in self._states:
            out["state"] = self._states[batch]
        return out

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)  # the seed of this rank's "train" stream
        global_ot = bool(getattr(self.coupling, "global_ot", False))
        draw = self.coupling.draw_independent if global_ot else self.coupling.sample
        k = 0
        if self.resume:
            k = int(self.resume["batch"])
            if "state" in self.resume:
                g.set_state(self.resume["state"])
            else:
                for _ in range(k):  # the same draws without pairing (no collective for global OT)
                    draw(self.batch_size, g)
        rank, size = world()
        if global_ot and rank == 0 and size > 1:
            say(
                f"flowmatch: coupling.global_ot: one OT assignment per step over the union of {size} ranks' "
                f"batches ({size} x {self.batch_size} pairs)"
            )
        while True:
            self._states[k] = g.get_state()
            self._states.pop(k - self.KEEP, None)
            yield global_ot_pair(*draw(self.batch_size, g)) if global_ot else draw(self.batch_size, g)
            k += 1


class FlowDataModule(L.LightningDataModule):
    """Base DataModule. Subclasses implement ``build_ends() -> (noise, data)`` distributions.

    The direction (``forward``: noise at t = 0; ``backward``: data at t = 0) is applied once,
    then the coupling is set up on ``(p0, p1)``. Training batches come from an endless
    :class:`PairStream` (seeded per rank); validation and test use fixed held-out pairs.
    The coupling's finite pair set is saved in checkpoints (``state_dict``).
    """

    def __init__(
        self,
        coupling: Coupling,
        direction: str = "forward",
        batch_size: int = 256,
        val_size: int = 1024,
        test_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be an integer >= 1, got {batch_size}")
        self.coupling, self.direction = coupling, direction
        self.batch_size, self.val_size, self.test_size, self.seed = (
            int(batch_size),
            int(val_size),
            int(test_size),
            int(seed),
        )
        self.p0 = self.p1 = None
        self.train_stream: PairStream | None = None
        self.train_resume: dict | None = None  # set on resume by flowmatch.resume.ExactResume

    def build_ends(self):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.p0 is not None:
            return
        noise, data = self.build_ends()
        self.p0, self.p1 = apply_direction(noise, data, self.direction)
        self.coupling.setup(self.p0, self.p1)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        seed = stream_seed(self.seed, "train", self._rank())
        self.train_stream = PairStream(self.coupling, self.batch_size, seed, self.train_resume)
        return DataLoader(self.train_stream, batch_size=None)

    def held_out_pairs(self, n: int, g: torch.Generator, split: str) -> tuple:
        """``n`` fixed pairs for ``split`` ("val" or "test"); default: drawn from the coupling.
        Image data sets override this to pair their held-out split with fresh noise."""
        return self.coupling.sample(n, g)

    def _held_out(self, n: int, split: str) -> DataLoader:
        x0, x1 = self.held_out_pairs(n, generator(self.seed, split), split)
        return DataLoader(TensorDataset(x0, x1), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._held_out(self.val_size, "val")

    def test_dataloader(self) -> DataLoader:
        return self._held_out(self.test_size, "test")

    def state_dict(self) -> dict:
        return {"coupling": self.coupling.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.coupling.load_state_dict(state_dict.get("coupling", {}))

    # --- evaluation -------------------------------------------------------------------------
    def eval_setup(self) -> EvalSetup:
        """What evaluation needs, from the ends and the coupling (:meth:`EvalSetup.from_ends`)."""
        self.setup()
        return EvalSetup.from_ends(self.p0, self.p1, self.coupling)
