"""Reading and aggregating ``evaluate.py task=gradvar_field`` sweeps (shared by the prop1, fig4, fig5 scripts).

Every job dir of such a sweep holds ``.hydra/config.yaml`` and ``gradvar_field.csv``: per (seed, bin) Monte
Carlo rows and rows with ``seed = "exact"`` (the closed form). :func:`load_jobs` reads them into :class:`Job`
records (the setting read from the config), the other functions turn a job's rows into per-bin and per-seed
arrays. "Total" is always the sum over the time bins (equal-width bins, so the t-average times the bin count).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from flowmatch.plots.common import find_jobs, load_config, read_csv

CSV_NAME = "gradvar_field.csv"
FLOOR = 1e-34  # where an exact zero is drawn on a log axis


@dataclass(frozen=True)
class Job:
    """One gradvar_field job: its dir, its setting (from the config) and its CSV rows."""

    run: Path
    field: str
    field_angle: float
    coupling: str
    coupling_angle: float | None
    interpolant: str
    sigma: float
    dim: int
    rows: list[dict]

    @property
    def seeds(self) -> list:
        """The Monte Carlo seeds, in CSV order."""
        return list(dict.fromkeys(r["seed"] for r in self.rows if r["seed"] != "exact"))

    @property
    def n_bins(self) -> int:
        return len(self.edges()) - 1

    def edges(self) -> np.ndarray:
        """The time-bin edges (from the closed-form rows)."""
        ex = sorted((r for r in self.rows if r["seed"] == "exact"), key=lambda r: r["bin"])
        return np.array([r["t_lo"] for r in ex] + [ex[-1]["t_hi"]], dtype=float)

    def mids(self) -> np.ndarray:
        """The bin centres."""
        e = self.edges()
        return (e[:-1] + e[1:]) / 2

    def mc(self, stat: str) -> np.ndarray:
        """Monte Carlo values of ``stat``: an array (seeds, bins), seeds in :attr:`seeds` order."""
        by = {(r["seed"], r["bin"]): float(r[stat]) for r in self.rows if r["seed"] != "exact"}
        return np.array([[by[(s, k)] for k in range(self.n_bins)] for s in self.seeds])

    def exact(self, stat: str) -> np.ndarray:
        """Closed-form values of ``stat`` per bin."""
        by = {r["bin"]: float(r[stat]) for r in self.rows if r["seed"] == "exact"}
        return np.array([by[k] for k in range(self.n_bins)])

    def mc_by_seed(self, stat: str) -> dict:
        """{seed: per-bin Monte Carlo values of ``stat``} (for pairing two jobs by seed)."""
        return dict(zip(self.seeds, self.mc(stat)))


def _class_name(target: str, suffix: str = "") -> str:
    """``flowmatch.couplings.RotatedCoupling`` -> ``rotated`` (the class name without ``suffix``, lower case)."""
    name = target.rsplit(".", 1)[-1]
    return (name[: -len(suffix)] if suffix and name.endswith(suffix) else name).lower()


def job_of(run: Path) -> Job:
    """The :class:`Job` of one run dir (its config resolved, e.g. ``coupling.angle=${field.angle}``)."""
    cfg = OmegaConf.to_container(OmegaConf.create(load_config(run)), resolve=True)
    coupling = cfg["coupling"]
    angle = coupling.get("angle")
    return Job(
        run=Path(run),
        field=cfg["field"]["name"],
        field_angle=float(cfg["field"]["angle"]),
        coupling=_class_name(coupling["_target_"], "Coupling"),
        coupling_angle=None if angle is None else float(angle),
        interpolant=_class_name(cfg["interpolant"]["_target_"]),
        sigma=float(cfg["interpolant"]["sigma"]),
        dim=int(cfg["gradvar_field"]["dim"]),
        rows=read_csv(Path(run) / CSV_NAME),
    )


def load_jobs(root: str | Path) -> list[Job]:
    """Every job under ``root`` that wrote a gradvar_field.csv (a job dir without one is an error: the sweep
    did not finish)."""
    runs = find_jobs(root)
    missing = [str(r) for r in runs if not (r / CSV_NAME).exists()]
    if missing:
        raise SystemExit(f"error: no {CSV_NAME} in {missing[:3]} (of {len(missing)}): the sweep did not finish")
    return [job_of(r) for r in runs]


def bin_rows(job: Job, stats: Iterable[str] = ("loss", "grad_var")) -> list[dict]:
    """Per bin: t_lo, t_hi and for each stat the closed form and the Monte Carlo mean, std (ddof 1), n."""
    e = job.edges()
    out = [{"bin": k, "t_lo": e[k], "t_hi": e[k + 1]} for k in range(job.n_bins)]
    for stat in stats:
        mc, ex = job.mc(stat), job.exact(stat)
        std = mc.std(0, ddof=1) if len(mc) > 1 else np.zeros(job.n_bins)
        for k, row in enumerate(out):
            row.update(
                {
                    f"{stat}_exact": ex[k],
                    f"{stat}_mc_mean": mc[:, k].mean(),
                    f"{stat}_mc_std": std[k],
                    "n_seeds": len(mc),
                }
            )
    return out


def total_row(job: Job, stats: Iterable[str] = ("loss", "grad_var")) -> dict:
    """The sum over bins: closed form and the Monte Carlo mean, std over seeds of the per-seed sums."""
    row = {"bin": "total", "t_lo": job.edges()[0], "t_hi": job.edges()[-1]}
    for stat in stats:
        tot = job.mc(stat).sum(1)
        row.update(
            {
                f"{stat}_exact": float(job.exact(stat).sum()),
                f"{stat}_mc_mean": float(tot.mean()),
                f"{stat}_mc_std": float(tot.std(ddof=1)) if len(tot) > 1 else 0.0,
                "n_seeds": len(tot),
            }
        )
    return row


def paired(a: Job, b: Job, stat: str = "grad_var") -> tuple[list, np.ndarray, np.ndarray]:
    """(common seeds, a's values, b's values), arrays (seeds, bins) matched by seed (same seed, same probe)."""
    da, db = a.mc_by_seed(stat), b.mc_by_seed(stat)
    seeds = [s for s in da if s in db]
    if not seeds:
        raise SystemExit(f"error: {a.run} and {b.run} share no seed")
    return seeds, np.array([da[s] for s in seeds]), np.array([db[s] for s in seeds])


def floored(values) -> tuple[np.ndarray, np.ndarray]:
    """(values with non-positive entries replaced by FLOOR, mask of those entries) for a log axis."""
    v = np.asarray(values, dtype=float)
    low = ~(v > FLOOR)
    return np.where(low, FLOOR, v), low


def listed(values) -> str:
    """Distinct values, sorted, comma-separated (a title's "d = 2, 10")."""
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(set(values)))


def log_yerr(mean, std) -> np.ndarray:
    """Error bars (2, n) of +- ``std`` around ``mean`` with the lower bar kept above 0 (for a log axis)."""
    mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    return np.array([np.minimum(std, 0.99 * np.abs(mean)), std])


def jsonable(x):
    """``x`` with numpy scalars and arrays turned into plain floats and lists (for summary.json)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        return float(x)
    return x
