"""Reading run directories for figures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def find_runs(root: str | Path) -> list[Path]:
    """Run dirs under ``root`` (itself included) that have a metrics.json, sorted by path."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / ".hydra" / "config.yaml").exists())


def load_run(run: Path) -> tuple[dict, dict]:
    """(config, metrics) of a run dir."""
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    return cfg, json.loads((run / "metrics.json").read_text())


def euler_series(metrics: dict, name: str) -> tuple[list[int], list[float]]:
    """Sorted (K, value) pairs of the keys ``eval/{name}@euler{K}``."""
    prefix = f"eval/{name}@euler"
    items = sorted((int(k[len(prefix) :]), v) for k, v in metrics.items() if k.startswith(prefix))
    return [k for k, _ in items], [v for _, v in items]
