"""The pre-registered verdict criteria of items 10 and 11 (flowmatch.analysis.verdicts) on records built by hand,
whose verdicts are known: profiles rising to t = 1, falling from t = 0, flat; sigma orderings; direction ratios."""

from __future__ import annotations

import numpy as np
import pytest

from flowmatch.analysis.verdicts import peak_verdicts, sigma_verdicts, stability_verdicts, tilt

K = 10


def gradvar_records(
    shape, directions=("forward", "backward"), sigmas=(0.0, 0.05), seeds=(0, 1, 2), steps=(0, 100, 200)
):
    """Records whose variance in bin k is shape(direction, sigma, seed, step, k)."""
    return [
        {
            "direction": d,
            "sigma": s,
            "seed": seed,
            "source": src,
            "step": st,
            "bin": k,
            "grad_var": shape(d, s, seed, st, k),
        }
        for d in directions
        for s in sigmas
        for seed in seeds
        for src in ("interpolant", "integrated")
        for st in steps
        for k in range(K)
    ]


def test_peaks_at_the_expected_ends_are_reproduced():
    def shape(d, s, seed, st, k):  # forward rises to t = 1, backward falls from t = 0
        x = k if d == "forward" else K - 1 - k
        return 1.0 + x**2 + 0.1 * seed

    v = peak_verdicts(gradvar_records(shape))
    assert {r["verdict"] for r in v.values()} == {"reproduced"}
    assert v["forward,sigma=0,interpolant"]["argmax_bin_of_mean"] == K - 1
    assert v["backward,sigma=0.05,integrated"]["argmax_bin_of_mean"] == 0
    assert v["forward,sigma=0,interpolant"]["paired_test_far_end_below_expected_end"]["frac_less"] == 1.0


def test_peaks_at_the_wrong_end_are_not_reproduced_and_a_split_is_partly():
    def wrong(d, s, seed, st, k):
        return 1.0 + (K - 1 - k if d == "forward" else k)

    assert {r["verdict"] for r in peak_verdicts(gradvar_records(wrong)).values()} == {"not reproduced"}

    def split(d, s, seed, st, k):  # the mean peaks in the last bin, but seed 1 peaks at t = 0.55
        if d == "forward":
            return 10.0 if k == K - 1 and seed != 1 else (12.0 if k == 5 and seed == 1 else 1.0)
        return 10.0 if k == 0 else 1.0

    v = peak_verdicts(gradvar_records(split))
    assert v["forward,sigma=0,interpolant"]["verdict"] == "partly"
    assert v["backward,sigma=0,interpolant"]["verdict"] == "reproduced"


def test_sigma_criterion_uses_the_second_half_of_training():
    def lower_late(d, s, seed, st, k):  # sigma = 0.05 lower from step 100 on, higher at step 0
        if st == 0:
            return 5.0 if s == 0.05 else 1.0
        return (1.0 + 0.01 * seed) if s == 0.05 else (2.0 + 0.02 * seed)

    v = sigma_verdicts(gradvar_records(lower_late))
    assert v["forward,integrated"]["verdict"] == "reproduced"
    assert v["forward,integrated"]["sigma0.05_per_seed"] == pytest.approx([10 * 1.0, 10 * 1.01, 10 * 1.02])

    def higher(d, s, seed, st, k):
        return 2.0 + seed if s == 0.05 else 1.0 + seed

    assert {r["verdict"] for r in sigma_verdicts(gradvar_records(higher)).values()} == {"not reproduced"}


def test_tilt_is_the_log_ratio_of_the_end_bins():
    p = np.array([1.0, 1.0] + [5.0] * 6 + [100.0, 100.0])
    assert tilt(p) == pytest.approx(2.0)


def stability_records(err_fw, err_bw, amp_fw, amp_bw, seeds=(0, 1, 2)):
    out = []
    for seed in seeds:
        for d, err, amp in (("forward", err_fw, amp_fw), ("backward", err_bw, amp_bw)):
            base = {"data": "gmm", "direction": d, "sigma": 0.0, "seed": seed}
            out.append(
                {
                    **base,
                    "measure": "endpoint_error",
                    "method": "euler",
                    "steps": 8,
                    "t": None,
                    "metric": "err_mean",
                    "value": err * (1 + 0.05 * seed),
                }
            )
            for t in (0.0, 0.5):
                out.append(
                    {
                        **base,
                        "measure": "sensitivity",
                        "method": "dopri5",
                        "steps": None,
                        "t": t,
                        "metric": "mean",
                        "value": amp * (2.0 - t),
                    }
                )
    return out


def test_stability_asymmetry_needs_a_ratio_and_a_consistent_order():
    v = stability_verdicts(stability_records(2.0, 1.0, 1.1, 1.0), [])["gmm,sigma=0"]
    assert v["euler8_endpoint_error"]["verdict"] == "asymmetric: backward lower"
    assert v["euler8_endpoint_error"]["ratio_forward_over_backward"] == pytest.approx(2.0)
    assert v["mean_amplification_over_t"]["verdict"] == "no clear asymmetry"  # ratio 1.1 < 1.5
    assert v["where"]["forward"]["t_of_max_amplification"] == 0.0
