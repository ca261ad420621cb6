"""Every paper target of REPRODUCTION.md runs end to end at smoke size (``make <item> FAST=1``, the sweep of
``make figures-fast``) and writes its figure folder: a PNG, a CSV of the numbers and summary.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _paper_items() -> list[str]:
    """The items of ``PAPER1 := ...`` and ``PAPER2 := ...`` in the Makefile (a target added there is tested without
    editing this)."""
    text = (ROOT / "Makefile").read_text()
    items = []
    for name in ("PAPER1", "PAPER2"):
        match = re.search(rf"^{name}\s*:=\s*(.+)$", text, re.M)
        assert match, f"Makefile has no {name} list"
        items += match.group(1).split()
    return items


@pytest.mark.parametrize("item", _paper_items())
def test_paper_target_smoke(item, tmp_path):
    runs, figs = tmp_path / "runs", tmp_path / "figs"
    proc = subprocess.run(
        ["make", "--no-print-directory", item, "FAST=1", f"RUNS={runs}", f"FIGS={figs}"],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = figs / item
    assert (out / f"{item}.png").stat().st_size > 10_000  # a real figure, not an empty canvas
    csvs = sorted(out.glob("*.csv"))
    assert csvs and all(len(p.read_text().splitlines()) >= 2 for p in csvs)  # a header and numbers
    assert json.loads((out / "summary.json").read_text())
    assert "Traceback" not in proc.stderr


def test_figures_fast_runs_every_item():
    """``make figures-fast`` names every item of PAPER1 and PAPER2 (the smoke test above runs them one by one)."""
    dry = subprocess.run(["make", "-n", "figures-fast"], cwd=ROOT, capture_output=True, text=True, check=True)
    for item in _paper_items():
        assert re.search(rf"\b{item}\b", dry.stdout), item
