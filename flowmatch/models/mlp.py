"""A multilayer perceptron velocity field v(x, t) for vector data."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class FourierTime(nn.Module):
    """Time features [t, sin(2 pi k t), cos(2 pi k t)] for k = 1..n_freqs (no parameters)."""

    def __init__(self, n_freqs: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freqs + 1, dtype=torch.float32), persistent=False)
        self.out_dim = 1 + 2 * n_freqs

    def forward(self, t: Tensor) -> Tensor:
        t = t.reshape(-1, 1).to(self.freqs.dtype)
        arg = t * self.freqs
        return torch.cat([t, arg.sin(), arg.cos()], dim=1)


class MLP(nn.Module):
    """v(x, t) = MLP([x, phi(t)]) with ``depth`` hidden layers of ``width`` units.

    Inputs with more than one event dimension are flattened and the output reshaped back.
    """

    def __init__(
        self, dim: int, width: int = 256, depth: int = 3, time_freqs: int = 4, activation: str = "silu"
    ) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"model.dim must be an integer >= 1, got {dim}")
        if int(depth) < 1 or int(width) < 1:
            raise ValueError(f"model.depth and model.width must be >= 1, got depth={depth}, width={width}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.time = FourierTime(int(time_freqs))
        layers: list[nn.Module] = []
        d_in = int(dim) + self.time.out_dim
        for _ in range(int(depth)):
            layers += [nn.Linear(d_in, int(width)), ACTIVATIONS[activation]()]
            d_in = int(width)
        layers.append(nn.Linear(d_in, int(dim)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = self.net(torch.cat([flat, self.time(t).to(flat.dtype)], dim=1))
        return out.reshape(x.shape)
