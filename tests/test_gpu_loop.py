"""benchmarks/gpu_loop.py and scripts/gpu_check.sh without a GPU: one line and status 3; with --allow-cpu the
Lightning-vs-bare comparison runs on a tiny UNet and reports both loops, their ratio and the probe's cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = [
    "threads=1",
    "model=unet",
    "model.base_channels=8",
    "data.image_size=8",
    "data.dim=192",
    "data.n_images=32",
    "data.batch_size=4",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("cmd", [["bash", "scripts/gpu_check.sh"], [sys.executable, "benchmarks/gpu_loop.py"]])
def test_stops_with_one_line_without_cuda(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_bare_and_lightning_loops_on_a_tiny_unet_on_cpu(tmp_path):
    out = tmp_path / "loop.json"
    args = ["--allow-cpu", "--steps", "3", "--warmup", "1", "--rounds", "2", "--compile", "false"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_loop.py", *args, "--probe-size", "20", "--out", str(out), *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(c["precision"], c["compile"]) for c in result["cells"]] == [("bf16-mixed", False), ("32-true", False)]
    for c in result["cells"]:
        assert len(c["lightning_rounds"]) == len(c["bare_rounds"]) == 2 and c["bare"] > 0
        assert c["ratio"] == pytest.approx(c["lightning"] / c["bare"])
    assert result["ema"] == 0.9999 and result["model"] == "UNet"
    probe = result["probe"]
    assert probe["probe_in_steps"] == pytest.approx(probe["probe_s"] * result["cells"][0]["bare"])
    assert "flowmatch gpu-loop: summary" in proc.stdout and "gradient-variance probe (20 samples" in proc.stdout


def test_refuses_an_unknown_precision():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_loop.py", "--allow-cpu", "--precision", "16-mixed"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: --precision '16-mixed'")
