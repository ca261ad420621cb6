"""DDPM-style UNet velocity net: shapes, gradients, attention, time dependence, presets."""

from __future__ import annotations

import copy

import pytest
import torch

from flowmatch.models.unet import AttentionBlock, UNet, _groups, count_parameters

SMALL = dict(
    base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_heads=4
)  # the `unet` preset
CIFAR = dict(
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    dropout=0.1,
    num_heads=4,
)  # the `unet_cifar` preset
# A small two-level UNet with attention (the resolution is given per test).
ATTENTION = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0, num_heads=2, num_groups=8)


def _randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """The output convolutions start at zero (v = 0 at init); give them small random values so every
    parameter influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_small_preset_output_shape_and_zero_init(channels, size):
    torch.manual_seed(0)
    model = UNet(channels, size, **SMALL)
    x = torch.randn(3, channels, size, size)
    y = model(x, torch.rand(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, torch.zeros_like(y))  # zero-initialised output layer
    _randomize_zero_init(model)
    assert model(x, torch.rand(3)).abs().sum() > 0


def test_gradients_reach_every_parameter_and_attention_runs():
    torch.manual_seed(0)
    # Attention at the 16x16 level of a 32x32 input (down and up path) plus the middle block at 16x16.
    model = UNet(3, 32, attention_resolutions=(16,), **ATTENTION)
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(attn) == 1 + 1 + 2  # down (1 res block), middle, up (num_res_blocks + 1)
    calls = []
    for m in attn:
        m.register_forward_hook(lambda mod, inp, out: calls.append((inp[0].shape[-1], (out - inp[0]).abs().max())))
    _randomize_zero_init(model)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    model(x, t).pow(2).mean().backward()
    assert len(calls) == 4 and all(res == 16 and delta > 0 for res, delta in calls)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_time_dependence_and_time_shapes():
    torch.manual_seed(0)
    model = UNet(1, 8, **SMALL).eval()
    _randomize_zero_init(model)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x, torch.full((4,), 0.1)), model(x, torch.full((4,), 0.9))
        assert (a - b).abs().max() > 1e-3
        assert (model(x, torch.full((4,), 0.1005)) - a).abs().max() > 0  # resolves small differences in t
        assert torch.allclose(model(x, 0.1), a) and torch.allclose(model(x, torch.tensor(0.1)), a)
        assert torch.allclose(model(x, torch.tensor([0.1])), a)
        t = torch.tensor([0.1, 0.9, 0.1, 0.9])  # per-sample times
        mixed = model(x, t)
        assert torch.allclose(mixed[0], a[0], atol=1e-6) and torch.allclose(mixed[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.rand(3))


def test_fourier_time_embedding():
    torch.manual_seed(0)
    model = UNet(1, 8, time_embed="fourier", **SMALL).eval()
    _randomize_zero_init(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert (model(x, 0.2) - model(x, 0.7)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time_embed"):
        UNet(1, 8, time_embed="learned", **SMALL)


def test_bad_image_size_and_inputs():
    with pytest.raises(ValueError, match="divisible by"):
        UNet(3, 30, **CIFAR)  # 30 is not divisible by 2**3
    with pytest.raises(ValueError, match="divisible by"):
        UNet(1, 8, base_channels=8, channel_mult=(1, 1, 1, 1, 1))  # 8 < 2**4
    UNet(1, 8, base_channels=8, channel_mult=(1, 1, 1, 1))  # 8 -> 1: allowed
    model = UNet(1, 8, **SMALL)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 9, 9), 0.5)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(1, 8, base_channels=30, channel_mult=(1,), num_heads=4, num_groups=8)


def test_group_count_is_clamped():
    assert _groups(128, 32) == 32 and _groups(48, 32) == 24 and _groups(16, 32) == 16 and _groups(7, 32) == 7
    model = UNet(1, 8, base_channels=24, channel_mult=(1, 2), num_res_blocks=1, num_heads=4)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 and m.num_groups <= 32 for m in norms)
    assert {m.num_groups for m in norms} >= {24}
    assert model(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)


def test_bf16_autocast_cpu():
    torch.manual_seed(0)
    model = UNet(3, 16, attention_resolutions=(8,), **ATTENTION)
    _randomize_zero_init(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, torch.rand(2))
    assert y.dtype == torch.float32 and y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_preset_parameter_counts():
    small = count_parameters(UNet(3, 32, **SMALL))
    cifar_model = UNet(3, 32, **CIFAR)
    big = count_parameters(cifar_model)
    print(f"unet (3x32x32): {small:,} parameters; unet_cifar: {big:,} parameters")
    assert 0.3e6 < small < 1.5e6
    assert 34e6 < big < 37e6  # torchcfm's CIFAR-10 UNet has about 35.7 M
    assert count_parameters(UNet(1, 8, **SMALL)) < small  # only the in/out convolutions depend on channels
    cifar_model.eval()
    with torch.no_grad():
        y = cifar_model(torch.randn(1, 3, 32, 32), torch.tensor([0.3]))
    assert y.shape == (1, 3, 32, 32)


def test_attention_block_matches_reference_and_is_global():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2, num_groups=4)
    _randomize_zero_init(block)
    x = torch.randn(2, 8, 4, 4)
    # Reference: softmax(q k^T / sqrt(d)) v per head over the 16 positions.
    h = block.qkv(block.norm(x).reshape(2, 8, 16)).reshape(2, 3, 2, 4, 16)
    q, k, v = h[:, 0], h[:, 1], h[:, 2]  # (B, heads, d, L)
    w = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / 2.0, dim=-1)
    ref = x + block.proj_out(torch.einsum("bhij,bhdj->bhdi", w, v).reshape(2, 8, 16)).reshape(2, 8, 4, 4)
    assert torch.allclose(block(x), ref, atol=1e-5)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0  # one position changes every output position
    assert ((block(x2) - block(x))[:, :, 3, 3].abs() > 0).all()


@pytest.mark.parametrize("time_embed", ["sinusoidal", "fourier"])
def test_float64_model_matches_float32(time_embed):
    """``UNet(...).double()`` runs forward and backward in float64 (the time embedding follows the parameters'
    dtype) and agrees with the float32 model within float32 rounding."""
    torch.manual_seed(0)
    model = UNet(1, 8, time_embed=time_embed, **SMALL)
    _randomize_zero_init(model)
    model64 = copy.deepcopy(model).double()
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    y, y64 = model(x, t), model64(x.double(), t.double())
    assert y64.dtype == torch.float64 and model64(x.double(), 0.5).dtype == torch.float64
    torch.testing.assert_close(y64, y.double(), rtol=1e-5, atol=1e-5 * float(y.detach().abs().max()))
    y.pow(2).mean().backward()
    y64.pow(2).mean().backward()
    g = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    g64 = torch.cat([p.grad.reshape(-1) for p in model64.parameters()])
    assert all(p.grad.dtype == torch.float64 for p in model64.parameters())
    torch.testing.assert_close(g64, g, rtol=0, atol=1e-5 * float(g64.abs().max()))
