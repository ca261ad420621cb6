"""The verdict criteria of items 10 and 11, fixed before any run (conf/experiment/paper/fig-gradvar.yaml and
fig-stability.yaml), as functions of the per-seed records the figure scripts read.

Item 10 (records: direction, sigma, seed, source, step, bin, grad_var):

- ``peaks``: at the last probe, the argmax bin of the seed-mean variance profile lies among the END_BINS bins nearest
  t = 1 (forward) / t = 0 (backward): "reproduced" when every seed's argmax does too, "partly" when only the
  mean's does or it lies in the right half of [0, 1], else "not reproduced"; with the one-sided paired test of the
  mean variance of the END_BINS bins at the far end below that at the expected end;
- ``sigma``: per direction and source, the per-seed variance summed over bins and averaged over the probes of the
  second half of training (steps >= last step / 2), sigma = 0.05 vs sigma = 0 paired by seed: "reproduced" when
  lower for every seed and the one-sided paired t-test gives p < 0.05, "partly" when lower on average.

Item 11 (records: data, direction, sigma, seed, measure, method, steps, t, metric, value): per data set and sigma,
the Euler endpoint error at CRITERION_K steps and the amplification averaged over the injection times, forward vs
backward paired by seed: "asymmetric" when every seed (at least two) is ordered alike and the ratio of the means is
>= RATIO or <= 1 / RATIO, else "no clear asymmetry"; and, per direction, where the amplification and the variance
are largest.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from flowmatch.analysis.stats import one_sided_paired_test

__all__ = [
    "END_BINS",
    "CRITERION_K",
    "RATIO",
    "profiles",
    "tilt",
    "peak_verdicts",
    "sigma_verdicts",
    "stability_verdicts",
]

END_BINS = 2  # the bins nearest each end that define "near t = 0" / "near t = 1" (t < 0.2 / t >= 0.8 with 10 bins)
EXPECTED_END = {"forward": "t=1", "backward": "t=0"}
SOURCE_ORDER = ("interpolant", "integrated", "pairs")
CRITERION_K = 8  # Euler steps of the discretization criterion (item 11)
RATIO = 1.5  # item 11: a ratio of means at least this large (either way), every seed ordered alike: "asymmetric"


def profiles(records: list[dict], direction: str, sigma: float, source: str, step: int) -> dict[int, np.ndarray]:
    """{seed: grad_var per bin (K,)} at one probe step."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for r in records:
        if (r["direction"], r["sigma"], r["source"], r["step"]) == (direction, sigma, source, step):
            out[r["seed"]][r["bin"]] = r["grad_var"]
    return {s: np.array([b[k] for k in sorted(b)]) for s, b in sorted(out.items())}


def ends(profile: np.ndarray) -> tuple[float, float]:
    """(V_start, V_end): mean variance of the END_BINS bins nearest t = 0 and nearest t = 1."""
    return float(np.mean(profile[:END_BINS])), float(np.mean(profile[-END_BINS:]))


def tilt(profile: np.ndarray) -> float:
    """log10(V_end / V_start): > 0 when the variance is larger near t = 1 than near t = 0."""
    start, end = ends(profile)
    return math.log10(end / start) if start > 0 and end > 0 else math.nan


def settings(records: list[dict]) -> list[tuple[str, float, str]]:
    """The (direction, sigma, source) combinations present, forward first."""
    found = {(r["direction"], r["sigma"], r["source"]) for r in records}
    return sorted(found, key=lambda s: (s[0] != "forward", s[1], SOURCE_ORDER.index(s[2])))


def last_step(records: list[dict], direction: str, sigma: float, source: str) -> int:
    return max(r["step"] for r in records if (r["direction"], r["sigma"], r["source"]) == (direction, sigma, source))


def _test(a: list[float], b: list[float]) -> dict | None:
    return one_sided_paired_test(a, b).as_dict() if len(a) >= 2 and len(a) == len(b) else None


def peak_verdicts(records: list[dict]) -> dict:
    """Criterion "peaks" (module docstring and the overlay comment), per direction, sigma and source."""
    out = {}
    for direction, sigma, source in settings(records):
        step = last_step(records, direction, sigma, source)
        per_seed = profiles(records, direction, sigma, source, step)
        mean = np.mean(list(per_seed.values()), axis=0)
        k_bins = len(mean)
        want = set(range(k_bins - END_BINS, k_bins)) if direction == "forward" else set(range(END_BINS))
        half = set(range(k_bins // 2, k_bins)) if direction == "forward" else set(range(k_bins // 2))
        argmax_mean = int(np.argmax(mean))
        argmax_seeds = {s: int(np.argmax(p)) for s, p in per_seed.items()}
        if argmax_mean in want and all(k in want for k in argmax_seeds.values()):
            verdict = "reproduced"
        elif argmax_mean in want or argmax_mean in half:
            verdict = "partly"
        else:
            verdict = "not reproduced"
        starts, ends_ = zip(*(ends(p) for p in per_seed.values()))
        a, b = (list(starts), list(ends_)) if direction == "forward" else (list(ends_), list(starts))
        out[f"{direction},sigma={sigma:g},{source}"] = {
            "direction": direction,
            "sigma": sigma,
            "source": source,
            "step": step,
            "expected_peak": EXPECTED_END[direction],
            "argmax_bin_of_mean": argmax_mean,
            "argmax_bin_per_seed": argmax_seeds,
            "profile_mean": mean.tolist(),
            "tilt_log10_end_over_start": tilt(mean),
            "paired_test_far_end_below_expected_end": _test(a, b),
            "verdict": verdict,
        }
    return out


def sigma_verdicts(records: list[dict]) -> dict:
    """Criterion "sigma": per direction and source, sigma = 0.05 below sigma = 0 on the per-seed variance summed
    over bins and averaged over the probes of the second half of training (steps >= last step / 2)."""
    out = {}
    for direction in sorted({r["direction"] for r in records}, key=lambda d: d != "forward"):
        for source in sorted({r["source"] for r in records}, key=SOURCE_ORDER.index):
            per = {}
            for sigma in (0.0, 0.05):
                rs = [r for r in records if (r["direction"], r["sigma"], r["source"]) == (direction, sigma, source)]
                if not rs:
                    break
                half = max(r["step"] for r in rs) / 2
                totals: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
                for r in rs:
                    if r["step"] >= half:
                        totals[r["seed"]][r["step"]] += r["grad_var"]
                per[sigma] = {s: float(np.mean(list(v.values()))) for s, v in totals.items()}
            if len(per) < 2:
                continue
            seeds = sorted(set(per[0.0]) & set(per[0.05]))
            a, b = [per[0.05][s] for s in seeds], [per[0.0][s] for s in seeds]
            test = _test(a, b)
            lower_all = all(x < y for x, y in zip(a, b))
            if test and lower_all and test["p_t"] < 0.05:
                verdict = "reproduced"
            elif np.mean(a) < np.mean(b):
                verdict = "partly"
            else:
                verdict = "not reproduced"
            out[f"{direction},{source}"] = {
                "direction": direction,
                "source": source,
                "claim": "sigma=0.05 below sigma=0" + (" (the paper's claim)" if source == "integrated" else ""),
                "seeds": seeds,
                "sigma0.05_per_seed": a,
                "sigma0_per_seed": b,
                "paired_test_sigma0.05_below_sigma0": test,
                "verdict": verdict,
            }
    return out


def _per_seed(records, **where) -> dict[int, float]:
    return {r["seed"]: r["value"] for r in records if all(r[k] == v for k, v in where.items())}


def direction_comparison(fw: dict[int, float], bw: dict[int, float]) -> dict | None:
    """Forward vs backward paired by seed: values, ratio of means fw/bw, whether every seed is ordered alike."""
    seeds = sorted(set(fw) & set(bw))
    if not seeds:
        return None
    a, b = [fw[s] for s in seeds], [bw[s] for s in seeds]
    ratio = float(np.mean(a) / np.mean(b)) if np.mean(b) > 0 else float("nan")
    alike = all(x < y for x, y in zip(a, b)) or all(x > y for x, y in zip(a, b))
    asym = alike and (ratio >= RATIO or ratio <= 1 / RATIO)
    lower = "forward" if ratio < 1 else "backward"
    if len(seeds) < 2:
        verdict = f"one seed, no verdict ({lower} lower)"
    else:
        verdict = f"asymmetric: {lower} lower" if asym else "no clear asymmetry"
    return {
        "seeds": seeds,
        "forward": a,
        "backward": b,
        "ratio_forward_over_backward": ratio,
        "every_seed_ordered_alike": alike,
        "verdict": verdict,
    }


def _amplification(records: list[dict], data: str, sigma: float, direction: str) -> list[dict]:
    """The sensitivity records (metric "mean": the amplification averaged over directions and sources) of one flow."""
    want = (data, sigma, direction, "sensitivity", "mean")
    return [r for r in records if (r["data"], r["sigma"], r["direction"], r["measure"], r["metric"]) == want]


def stability_verdicts(records: list[dict], profiles: list[dict]) -> dict:
    """The item-11 criteria of the module docstring per data set and sigma. ``profiles``: the seed-mean variance
    per (data, direction, sigma, source, t_lo, t_hi) of the same models (for where the variance is largest)."""
    out = {}
    for data, sigma in sorted({(r["data"], r["sigma"]) for r in records}):
        err, sens, where = {}, {}, {}
        for d in ("forward", "backward"):
            err[d] = _per_seed(
                records,
                data=data,
                sigma=sigma,
                direction=d,
                measure="endpoint_error",
                method="euler",
                steps=CRITERION_K,
                metric="err_mean",
            )
            by_seed: dict[int, list[float]] = defaultdict(list)
            by_t: dict[float, list[float]] = defaultdict(list)
            for r in _amplification(records, data, sigma, d):
                by_seed[r["seed"]].append(r["value"])
                by_t[r["t"]].append(r["value"])
            sens[d] = {seed: float(np.mean(v)) for seed, v in by_seed.items()}
            prof = [
                p
                for p in profiles
                if (p["data"], p["sigma"], p["direction"], p["source"]) == (data, sigma, d, "interpolant")
            ]
            peak = max(prof, key=lambda p: p["mean"]) if prof else None
            where[d] = {
                "t_of_max_amplification": max(by_t, key=lambda t: np.mean(by_t[t])) if by_t else None,
                "amplification_by_t": {f"{t:g}": float(np.mean(v)) for t, v in sorted(by_t.items())},
                "t_bin_of_max_gradvar_interpolant": [peak["t_lo"], peak["t_hi"]] if peak else None,
            }
        out[f"{data},sigma={sigma:g}"] = {
            f"euler{CRITERION_K}_endpoint_error": direction_comparison(err["forward"], err["backward"]),
            "mean_amplification_over_t": direction_comparison(sens["forward"], sens["backward"]),
            "where": where,
        }
    return out
