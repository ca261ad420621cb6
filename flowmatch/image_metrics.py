"""Image metrics: FID / KID (torchmetrics) on a feature network, and the memorization rate.

Images are float tensors (N, C, H, W) with values in [-1, 1], as the image loaders return them.

**FID** (Heusel et al. 2017): with features f = phi(x) of the real (r) and generated (g) images, means mu and
covariances S,  FID = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})  (computed by torchmetrics'
``FrechetInceptionDistance``). **KID** (Binkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel
k(a, b) = (a.b / F + 1)^3, averaged over ``subsets`` random subsets of ``subset_size`` (torchmetrics'
``KernelInceptionDistance``; its ``subset_size`` may not exceed either sample count, so it is clamped).

phi is Inception-v3's 2048-d pool features (``feature_extractor="inception"``; needs the ``torch-fidelity``
package and its weights file, which cannot be downloaded offline: :class:`FeatureExtractorUnavailable` says
why and how to get them) or any ``nn.Module`` mapping (N, C, H, W) images in [-1, 1] to (N, F) features.
Features are extracted once and fed to both metrics through an identity feature module (no 299x299 dummy
pass, one network pass for both metrics).

**Memorization rate** (the ratio test of Yoon et al. 2023 / Carlini et al.): a generated image x is memorized
when d_1(x) < ratio * d_2(x), where d_1 <= d_2 are its two smallest L2 distances to the training images
(exact duplicates in the training set are removed first); ``ratio = 1/3``.

Plain torch + torchmetrics (no Lightning, no Hydra).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "FeatureExtractorUnavailable",
    "InceptionFeatures",
    "extract_features",
    "fid_kid_from_features",
    "fid_kid",
    "memorization_rate",
    "INCEPTION_HOW_TO",
]

INCEPTION_HOW_TO = (
    "to get them: `pip install torch-fidelity` (or torchmetrics[image]) on a machine with network access and "
    "run the evaluation once there (the weights are cached under ~/.cache/torch/hub/checkpoints/, copy that "
    "file over), or download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth and pass eval.inception_weights=PATH; or use "
    "eval.feature_extractor={_target_: ...} with a network of your own"
)


class FeatureExtractorUnavailable(RuntimeError):
    """The requested feature network (Inception-v3 weights) cannot be built here."""


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 (FID variant, 2048-d pool features) on [-1, 1] images.

    Maps x to uint8 p = round((x + 1) * 127.5) and repeats one channel to three (grayscale data).
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
            )
        except Exception as exc:  # ModuleNotFoundError (torch-fidelity), URLError / OSError (no weights)
            raise FeatureExtractorUnavailable(
                f"Inception-v3 weights are unavailable ({type(exc).__name__}: {str(exc).strip()}); " + INCEPTION_HOW_TO
            ) from exc

    def forward(self, x: Tensor) -> Tensor:
        p = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if p.shape[1] == 1:
            p = p.repeat(1, 3, 1, 1)
        return self.net(p)


class _Identity(nn.Module):
    """The torchmetrics ``feature`` module for precomputed (N, F) features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, f: Tensor) -> Tensor:
        return f


@torch.no_grad()
def extract_features(
    images: Tensor, extractor: nn.Module | Callable, batch_size: int = 256, device: torch.device | str = "cpu"
) -> Tensor:
    """phi(images) in batches on ``device`` -> (N, F) float64 on the CPU."""
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(device).eval()
    out = []
    for chunk in images.split(int(batch_size)):
        f = extractor(chunk.to(device).float())
        if f.dim() != 2 or f.shape[0] != len(chunk):
            raise ValueError(f"a feature extractor must return (N, F) features, got shape {tuple(f.shape)}")
        out.append(f.double().cpu())
    return torch.cat(out)


def fid_kid_from_features(
    gen: Tensor, real: Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """{"fid", "kid", "kid_std"} from (N, F) features with torchmetrics' FID and KID."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(gen) < 2 or len(real) < 2:
        raise ValueError(f"FID/KID need >= 2 samples on each side, got {len(gen)} generated and {len(real)} real")
    ident = _Identity(gen.shape[1])
    fid = FrechetInceptionDistance(feature=ident, normalize=True)
    subset_size = int(min(kid_subset_size, len(gen), len(real)))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are (N, F) already
        warnings.filterwarnings("ignore", ".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=ident, subsets=int(kid_subsets), subset_size=subset_size, normalize=True)
    for m in (fid, kid):
        m.update(real.double(), real=True)
        m.update(gen.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(
    gen_images: Tensor,
    real_images: Tensor,
    feature_extractor: str | nn.Module = "inception",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    inception_weights: str | None = None,
    **kid_kwargs,
) -> dict[str, float]:
    """FID and KID between generated and real images in [-1, 1] (see the module docstring).

    Raises :class:`FeatureExtractorUnavailable` when ``feature_extractor="inception"`` cannot be built.
    """
    if isinstance(feature_extractor, str):
        if feature_extractor != "inception":
            raise ValueError(f"feature_extractor must be 'inception' or an nn.Module, got {feature_extractor!r}")
        feature_extractor = InceptionFeatures(inception_weights)
    f_gen = extract_features(gen_images, feature_extractor, batch_size, device)
    f_real = extract_features(real_images, feature_extractor, batch_size, device)
    return fid_kid_from_features(f_gen, f_real, **kid_kwargs)


def _dedup(x: Tensor) -> Tensor:
    return torch.unique(x, dim=0) if len(x) > 1 else x


@torch.no_grad()
def memorization_rate(generated: Tensor, train: Tensor, ratio: float = 1.0 / 3.0, chunk: int = 256) -> float:
    """Fraction of generated x with d_1(x) < ratio * d_2(x) (two nearest training images, L2, flattened)."""
    ref = _dedup(train.reshape(len(train), -1).float())
    if len(ref) < 2:
        raise ValueError("memorization_rate needs >= 2 distinct training images")
    gen = generated.reshape(len(generated), -1).float().to(ref.device)
    hits = 0
    for part in gen.split(int(chunk)):
        d = torch.cdist(part, ref).topk(2, dim=1, largest=False).values
        hits += int((d[:, 0] < ratio * d[:, 1]).sum())
    return hits / len(gen)
