"""Named random streams: every consumer of randomness draws from its own seeded generator.

A stream is identified by a name and derived from a base seed (and the process rank where ranks must
draw disjoint samples), so that, e.g., the gradient-variance probe never replays the first training batch
and a sample grid never redraws the training sources. The offsets are fixed constants: changing one
changes every seeded result of the framework. Streams that share a base seed and an offset (``pairs``,
``data``, ``eval``, ...) are the same generator: a new consumer whose draws must differ from another's (the
held-out pairs from the training pairs) gets an offset of its own.

=========  ==========================  ===========================================================
name       seed                        used by
=========  ==========================  ===========================================================
train      seed + 1000 rank            training batches (``data.PairStream``), one stream per rank
val        seed + 10007                validation pairs (held out)
test       seed + 20011                test pairs (held out)
samples    seed + 1000003              the fixed noise / pair rows of sample grids
probe      seed + 2000003 + 7919 rank  the fixed part of the gradient-variance probe, per rank
eval       seed                        evaluation (``eval.seed``): fresh sources and targets
pairs      seed                        a finite coupling's pair set (``coupling.seed``)
loss       seed                        times and noise of the held-out (val/test) loss
data       seed                        choices that build a data set: subsets, splits, mixture centres
reflow     seed                        the sources of ``evaluate.py task=reflow_pairs``
holdout    seed + 3000017              a coupling's held-out pairs (``coupling.n_holdout``)
memprobe   seed + 4000037              the memorization probe: training subset, times and noise
stability  seed                        the sources and perturbation directions of ``evaluate.py task=stability``
=========  ==========================  ===========================================================
"""

from __future__ import annotations

import torch

__all__ = ["STREAMS", "stream_seed", "generator"]

# name -> (offset, stride per rank)
STREAMS: dict[str, tuple[int, int]] = {
    "train": (0, 1000),
    "val": (10_007, 0),
    "test": (20_011, 0),
    "samples": (1_000_003, 0),
    "probe": (2_000_003, 7919),
    "eval": (0, 0),
    "pairs": (0, 0),
    "loss": (0, 0),
    "data": (0, 0),
    "reflow": (0, 0),
    "holdout": (3_000_017, 0),
    "memprobe": (4_000_037, 0),
    "stability": (0, 0),
}


def stream_seed(seed: int, name: str, rank: int = 0) -> int:
    """The integer seed of stream ``name``: seed + offset + stride x rank (see the module table)."""
    if name not in STREAMS:
        raise ValueError(f"random stream must be one of {sorted(STREAMS)}, got {name!r}")
    offset, stride = STREAMS[name]
    return int(seed) + offset + stride * int(rank)


def generator(seed: int, name: str, rank: int = 0, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` (on ``device``, default CPU) seeded for stream ``name``."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed(stream_seed(seed, name, rank))
