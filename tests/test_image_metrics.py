"""FID/KID through torchmetrics with a small random feature network; memorization rate; evaluation wiring."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from flowmatch import image_metrics as IM
from flowmatch.distributions import Empirical, StandardNormal
from flowmatch.evaluation import EvalOptions, EvalSetup, FIDWarning, evaluate_flow
from flowmatch.sampling import Solver


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 32 features


def _images(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def _frechet_scipy(fa: np.ndarray, fb: np.ndarray) -> float:
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def _kid_by_hand(fa: torch.Tensor, fb: torch.Tensor) -> float:
    d = fa.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(fa)
    kxx, kyy, kxy = k(fa, fa), k(fb, fb), k(fa, fb)
    within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def test_fid_kid_custom_extractor_against_direct_formulas():
    net, real = _net(), _images()
    same = IM.fid_kid(real, real.clone(), net)
    assert abs(same["fid"]) < 1e-6
    shifted = (real * 0.5 + 0.4).clamp(-1, 1)
    r = IM.fid_kid(shifted, real, net, kid_subsets=1, kid_subset_size=10_000)  # clamped to 300: all samples
    f_real = IM.extract_features(real, net)
    f_gen = IM.extract_features(shifted, net)
    assert f_real.shape == (300, 32)
    assert r["fid"] > 1e-3
    assert r["fid"] == pytest.approx(_frechet_scipy(f_gen.numpy(), f_real.numpy()), rel=1e-4)
    assert r["kid"] == pytest.approx(_kid_by_hand(f_real, f_gen), rel=1e-6)  # one subset = the whole sample
    assert r["kid"] > 10 * abs(IM.fid_kid(real, _images(seed=1), net, kid_subset_size=100)["kid"])


def test_inception_unavailable_says_why_and_how(monkeypatch):
    import torchmetrics.image.fid as tm_fid

    def offline(*args, **kwargs):
        raise OSError("no network (test)")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", offline)
    with pytest.raises(IM.FeatureExtractorUnavailable) as info:
        IM.fid_kid(_images(4), _images(4), "inception")
    msg = str(info.value)
    assert "Inception-v3 weights are unavailable" in msg and "no network (test)" in msg
    assert "torch-fidelity" in msg and "eval.inception_weights" in msg and "feature_extractor" in msg
    with pytest.raises(ValueError, match="feature_extractor"):
        IM.fid_kid(_images(4), _images(4), "vgg")


def test_memorization_rate_ratio_test():
    train = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    gen = torch.stack([train[0], train[1] + 0.01, (train[0] + train[1]) / 2, torch.full((1, 2, 2), 0.6)])
    # two nearest distances (4 pixels): (0, 2), (0.02, 1.98), (1, 1), (0.8, 1.2); memorized if d1 < d2 / 3
    assert IM.memorization_rate(gen, train) == pytest.approx(2 / 4)
    assert IM.memorization_rate(gen, train, ratio=0.7) == pytest.approx(3 / 4)  # 0.8 < 0.7 * 1.2
    assert IM.memorization_rate(gen, torch.cat([train, train[:1]])) == pytest.approx(2 / 4)  # duplicates removed
    assert IM.memorization_rate(gen, train, chunk=1) == pytest.approx(2 / 4)


def _image_setup(train):
    return EvalSetup(StandardNormal((1, 8, 8)), Empirical(train), train_data=train, test_data=lambda: train[:50])


def test_evaluate_flow_image_metrics_and_protocol():
    train = _images(200)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - generated = the noise itself
    options = EvalOptions(
        n_fresh=64, fid=True, feature_extractor=_net(), fid_split="test", kid_subset_size=32, batch_size=16
    )
    res = evaluate_flow(zero, _image_setup(train), Solver("euler", steps=3), options)
    m, p = res.metrics, res.protocol
    assert m["eval/mem_rate"] == 0.0 and m["eval/fid"] > 0 and "eval/kid" in m and m["eval/nfe"] == 3.0
    assert p["protocol/split"] == "test" and p["protocol/n_real"] == 50.0 and p["protocol/solver"] == "euler3"
    assert p["protocol/solver_steps"] == 3.0 and p["protocol/n_samples"] == 64.0 and p["protocol/nfe"] == 3.0
    assert p["protocol/feature_extractor"] == "Sequential"
    # a field that returns a training image: every sample memorized
    copy = lambda x, t: train[:1].expand_as(x) - x  # noqa: E731 - x1 = x0 + v = train[0]
    res = evaluate_flow(copy, _image_setup(train), Solver("euler", steps=1), EvalOptions(n_fresh=16))
    assert res.metrics["eval/mem_rate"] == 1.0


def test_evaluate_flow_inception_unavailable_warns_and_keeps_other_metrics(monkeypatch):
    import torchmetrics.image.fid as tm_fid

    def offline(*args, **kwargs):
        raise OSError("no network (test)")

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", offline)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.warns(FIDWarning, match="eval/fid and eval/kid skipped: Inception-v3 weights are unavailable"):
        res = evaluate_flow(
            zero, _image_setup(_images(100)), Solver("euler", steps=2), EvalOptions(n_fresh=32, fid=True)
        )
    assert "eval/fid" not in res.metrics and {"eval/mem_rate", "eval/mmd_gen", "eval/w2"} <= set(res.metrics)
    assert res.protocol["protocol/feature_extractor"] == "inception (unavailable)"
