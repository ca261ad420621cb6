"""Reading run directories and writing figure folders (shared by every figure script)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml


def find_runs(root: str | Path) -> list[Path]:
    """Run dirs under ``root`` (itself included) that have a metrics.json, sorted by path."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("metrics.json") if (p.parent / ".hydra" / "config.yaml").exists())


def find_jobs(root: str | Path) -> list[Path]:
    """Job dirs of a Hydra run or multirun under ``root``: every dir holding ``.hydra/config.yaml``, sorted by
    job number when the dir name is one, else by path. Exits with one ``error:`` line when there is none."""
    root = Path(root)
    jobs = [p.parent.parent for p in root.rglob(".hydra/config.yaml")]
    if not jobs:
        sys.exit(f"error: no run directories (with .hydra/config.yaml) under {str(root)!r}: run the sweep first")
    return sorted(jobs, key=lambda p: (int(p.name) if p.name.isdigit() else 1 << 30, str(p)))


def load_config(run: Path) -> dict:
    """The resolved job config of a run dir (``.hydra/config.yaml``) as plain dicts."""
    return yaml.safe_load((Path(run) / ".hydra" / "config.yaml").read_text())


def load_run(run: Path) -> tuple[dict, dict]:
    """(config, metrics) of a run dir."""
    return load_config(run), json.loads((Path(run) / "metrics.json").read_text())


def sigma_caption(run: str | Path) -> str:
    """'σ=0.05' from a run dir's config (``interpolant.sigma``); 'σ unknown' when the run has no config."""
    path = Path(run) / ".hydra" / "config.yaml"
    sigma = load_config(Path(run)).get("interpolant", {}).get("sigma") if path.exists() else None
    return "σ unknown" if sigma is None else f"σ={float(sigma):g}"


def sigma_steps_caption(sigmas: Iterable[float], steps: Iterable[int]) -> str:
    """'σ ∈ {0, 0.05}, after 2000 steps' (one σ: 'σ=0.05'; several step counts: 'after 1000/4000 steps')."""
    sigmas, steps = sorted({float(s) for s in sigmas}), sorted({int(s) for s in steps})
    sig = f"σ={sigmas[0]:g}" if len(sigmas) == 1 else "σ ∈ {" + ", ".join(f"{s:g}" for s in sigmas) + "}"
    return f"{sig}, after {'/'.join(str(s) for s in steps)} steps"


def runs_caption(cfgs_metrics: Iterable[tuple[dict, dict]]) -> str:
    """:func:`sigma_steps_caption` of (config, metrics) pairs of trained runs (``interpolant.sigma``,
    ``train/global_step``)."""
    pairs = list(cfgs_metrics)
    return sigma_steps_caption(
        (c["interpolant"]["sigma"] for c, _ in pairs), (m.get("train/global_step", -1) for _, m in pairs)
    )


def euler_series(metrics: dict, name: str) -> tuple[list[int], list[float]]:
    """Sorted (K, value) pairs of the keys ``eval/{name}@euler{K}``."""
    prefix = f"eval/{name}@euler"
    items = sorted((int(k[len(prefix) :]), v) for k, v in metrics.items() if k.startswith(prefix))
    return [k for k, _ in items], [v for _, v in items]


def _number(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a CSV file as dicts, numbers parsed (int, then float, else the string)."""
    with Path(path).open(newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_csv(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` (dicts; columns: the union of their keys in first-seen order) to ``path``; mkdir parents."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str | Path, data: dict) -> Path:
    """``data`` as indented, key-sorted JSON at ``path``; mkdir parents."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def figure_cli(doc: str, argv: list[str] | None = None) -> tuple[Path, Path]:
    """``(RUNS_DIR, FIG_DIR)`` from the command line every figure script takes
    (``python -m flowmatch.plots.<item> RUNS_DIR FIG_DIR``); FIG_DIR is created."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("runs_dir", help="the sweep directory the make target wrote (outputs/paper/<item>)")
    ap.add_argument("fig_dir", help="where the PNG, the CSV files and summary.json go (figures/<item>)")
    args = ap.parse_args(argv)
    out = Path(args.fig_dir)
    out.mkdir(parents=True, exist_ok=True)
    return Path(args.runs_dir), out


def save_figure(fig, path: str | Path, dpi: int = 110, rect: tuple | None = None) -> Path:
    """Lay out ``fig`` (``rect`` leaves room for a suptitle; a figure made with a layout engine, such as
    ``layout="constrained"``, keeps its own), write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout(**({"rect": rect} if rect else {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
