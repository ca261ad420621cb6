"""benchmarks/gradvar_cost.py and benchmarks/gradvar_breakdown.py at smoke size, in a second process: every row is
printed with its ratio, and the breakdown's parts add up (statistics = probe - no statistics)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    """stdout of a benchmark script run with ``args`` (one thread); fails the test on a non-zero exit."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_gradvar_cost_prints_every_mlp_row_with_its_ratio():
    out = run("benchmarks/gradvar_cost.py", "--reps", "1", "--only", "mlp", "--clock", "cpu")
    rows = re.findall(r"^MLP 3x(\d+)\s+(\d+)\s+(\d+)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+hooks/\d+$", out, re.M)
    assert [(w, B, K) for w, B, K, *_ in rows] == [
        *[(w, "256", K) for w in ("64", "256", "1024") for K in ("1", "10", "50")],
        ("256", "64", "10"),
        ("256", "1024", "10"),
    ], out
    for *_, step, probe, ratio in rows:
        assert abs(float(probe) / float(step) - float(ratio)) < 0.02 + 0.01 * float(ratio)


def test_gradvar_breakdown_parts_add_up():
    out = run("benchmarks/gradvar_breakdown.py", "--width", "16", "--bins", "5", "--batch", "40", "--reps", "3")
    ms = {
        k: float(v)
        for k, v in re.findall(r"^  (step|no statistics|backward only|probe|statistics)\s+([-\d.]+) ms", out, re.M)
    }
    assert set(ms) == {"step", "no statistics", "backward only", "probe", "statistics"}, out
    assert abs(ms["statistics"] - (ms["probe"] - ms["no statistics"])) < 2e-3, out
    assert re.search(r"statistics of the Linear layers: \d+ tensor operations", out), out
