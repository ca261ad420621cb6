"""Test set-up: one torch thread per process (2 cores, xdist), wandb offline into a temp dir."""

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
_WANDB_TMP = tempfile.mkdtemp(prefix="flowmatch-wandb-")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ.setdefault(var, _WANDB_TMP)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def root() -> str:
    return ROOT
