"""Run the entry points as subprocesses (Hydra and DDP want their own process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_entry(script: str, *overrides: str, check: bool = True, timeout: int = 300, env: dict | None = None):
    """Run ``python SCRIPT overrides...`` in the repo root with one torch thread; return the CompletedProcess."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "HYDRA_FULL_ERROR": "1",
        **(env or {}),
    }
    flags = [o for o in overrides if o.startswith("-")]
    extra = ["threads=1"] + (["trainer.enable_progress_bar=false"] if script == "train.py" else [])
    args = [sys.executable, script, *flags, *extra, *[o for o in overrides if not o.startswith("-")]]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def write_pngs(folder, n: int = 6, size: int = 8, channels: int = 3, seed: int = 0) -> list:
    """Write ``n`` random ``size`` x ``size`` PNG images (RGB or greyscale) under ``folder``; return their pixel
    arrays (uint8, H x W x C) in file-name order (``img0.png``, ``img1.png``, ...)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(folder / f"img{i}.png")
        out.append(pixels)
    return out
