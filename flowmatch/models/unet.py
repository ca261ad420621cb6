"""DDPM-style UNet velocity field v(x, t) for images (Ho et al. 2020; the guided-diffusion / torchcfm layout).

Structure (``L = len(channel_mult)`` levels, feature resolution halves at each of the ``L - 1`` downsamplings):

    time t -> embedding (dim 4 * base_channels) -> added inside every residual block
    conv3x3(in -> base)
    down:  per level ``num_res_blocks`` x [ResBlock (+ attention if the resolution is in attention_resolutions)],
           then a stride-2 conv (except at the last level); every output is kept as a skip connection
    middle: ResBlock, attention, ResBlock  (always: attention at the lowest resolution)
    up:    per level (reversed) ``num_res_blocks + 1`` x [concat skip, ResBlock (+ attention)], then nearest x2
           upsampling + conv3x3 (except at the first level)
    GroupNorm, SiLU, conv3x3(base -> in)   (zero-initialised: the field is 0 at initialisation)

ResBlock: GroupNorm, SiLU, conv3x3, + Linear(SiLU(emb)), GroupNorm, SiLU, dropout, conv3x3 (zero-init), with a
1x1 conv on the skip when the width changes. Attention: GroupNorm, 1x1 qkv, multi-head
``torch.nn.functional.scaled_dot_product_attention``, zero-init 1x1 projection, residual.

``attention_resolutions`` are feature-map sizes in pixels (16 = the 16x16 level of a 32x32 input); sizes that
match no level are ignored, so one config can serve several image sizes. GroupNorm uses the largest group count
<= ``num_groups`` that divides the channel count.

Presets (parameter counts for 3-channel 32x32 input; the count does not depend on image_size):
    unet       = UNet(C, S, base_channels=32,  channel_mult=(1, 2),       num_res_blocks=1,
                      attention_resolutions=(), dropout=0.0, num_heads=4)                   ~0.5 M (see tests)
    unet_cifar = UNet(3, 32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                      attention_resolutions=(16,), dropout=0.1, num_heads=4)                ~35.7 M
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNet", "count_parameters", "sinusoidal_embedding"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding [cos(t w_k), sin(t w_k)] of a (B,) tensor, w_k = max_period^(-k / (dim/2)),
    in t's floating dtype (float32 for an integer t)."""
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _groups(channels: int, num_groups: int) -> int:
    return max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)


def _norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, num_groups), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin, num_groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            _norm(cout, num_groups), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {channels} of an attention block")
        self.num_heads = num_heads
        self.norm = _norm(channels, num_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))  # (B, 3C, L)
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj_out(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """Sequence of blocks that all take ``(x, emb)``."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNet(nn.Module):
    """Velocity net ``forward(x, t)``: x (B, C, H, W), t in [0, 1] of shape (B,) (or a scalar / (1,), broadcast).

    ``time_embed="sinusoidal"`` embeds ``1000 t`` (the DDPM timestep scale, so the usual frequencies resolve
    t in [0, 1]); ``time_embed="fourier"`` uses fixed random Gaussian Fourier features of ``t`` (scale 16).
    ``image_size`` must be divisible by ``2 ** (len(channel_mult) - 1)`` (one halving per extra level); inputs
    of another size work when they are divisible too. Output: same shape and dtype as x (also under autocast).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 4,
        num_groups: int = 32,
        time_embed: str = "sinusoidal",
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
        if num_res_blocks < 1 or base_channels < 1 or in_channels < 1:
            raise ValueError("in_channels, base_channels and num_res_blocks must be >= 1")
        self.factor = 2 ** (len(channel_mult) - 1)
        if image_size < self.factor or image_size % self.factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1) = {self.factor} "
                f"(channel_mult={list(channel_mult)} downsamples {len(channel_mult) - 1} times); "
                "use fewer levels for small images"
            )
        if time_embed not in ("sinusoidal", "fourier"):
            raise ValueError(f"time_embed must be 'sinusoidal' or 'fourier', got {time_embed!r}")
        self.in_channels, self.image_size, self.base_channels = in_channels, image_size, base_channels
        self.time_embed_kind = time_embed
        attn_res = {int(r) for r in attention_resolutions}
        emb_dim = 4 * base_channels
        if time_embed == "fourier":
            self.register_buffer("fourier_w", torch.randn(base_channels // 2) * 16.0)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, num_groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_groups)

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, size = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = Stage([res(ch, base_channels * mult)])
                ch = base_channels * mult
                if size in attn_res:
                    stage.append(attn(ch))
                self.down.append(stage)
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skips.append(ch)
                size //= 2
        self.middle = Stage([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                stage = Stage([res(ch + skips.pop(), base_channels * mult)])
                ch = base_channels * mult
                if size in attn_res:
                    stage.append(attn(ch))
                if level and i == num_res_blocks:
                    stage.append(Upsample(ch))
                    size *= 2
                self.up.append(stage)
        assert not skips
        self.out = nn.Sequential(_norm(ch, num_groups), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def embed_time(self, t: Tensor, batch: int, device: torch.device) -> Tensor:
        """(batch, 4 * base_channels) embedding of the times ``t`` (a scalar or (batch,)). The features are
        computed in the parameters' dtype, at least float32 (float64 after ``.double()``), and fed to the time
        MLP in the parameters' dtype (float32 under autocast, whose Linear layers then cast)."""
        wdtype = self.time_mlp[0].weight.dtype
        t = torch.as_tensor(t, device=device, dtype=torch.promote_types(wdtype, torch.float32)).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.shape[0] != batch:
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if self.time_embed_kind == "sinusoidal":
            e = sinusoidal_embedding(1000.0 * t, self.base_channels)
        else:
            args = 2 * math.pi * t[:, None] * self.fourier_w[None]
            e = F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, self.base_channels % 2))
        return self.time_mlp(e.to(wdtype))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"H and W must be divisible by {self.factor}, got {tuple(x.shape[-2:])}")
        emb = self.embed_time(t, x.shape[0], x.device)
        h = self.input_conv(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop().to(h.dtype)], dim=1), emb)
        return self.out(h).to(x.dtype)
