"""The hooks engine's state kept between probes (stacked-pass factor buffers, cached plans) never leaks one probe's
numbers into the next, and a Linear output changed in place is still differentiated where the layer produced it."""

from __future__ import annotations

import copy

import pytest
import torch
from test_gradvar import cast, make_probe, naive_stats
from test_gradvar_reduce import check, probe_times
from torch import nn

from flowmatch.gradvar import bin_sums
from flowmatch.interpolants import CFM

DT = torch.float64
EDGES = [0.0, 0.25, 0.5, 0.75, 1.0]


class MixedMLP(nn.Module):
    """Linear layers of widths 3 -> 16 -> 16 -> 2 (the last one narrower than its input: a swapped pass member)
    with a ReLU applied in place to a Linear output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x, t):
        h = torch.tanh(self.a(torch.cat([x, t[:, None]], 1)))
        return self.c(torch.relu_(self.b(h)))


@pytest.mark.parametrize("times", ["random", "stratified"])
def test_second_probe_with_the_same_layout_gets_its_own_numbers(times):
    """Two probes with the same times (same bins, same padded layout, buffers reused) but different samples and
    weights changed in place in between: each equals the naive per-sample loop on its own data, in float64 and
    float32; the in-place ReLU does not send the model to the vmap fallback."""
    gen = torch.Generator().manual_seed(11)
    t = probe_times(times, 40, 4, gen)
    for dtype, rtol in ((DT, 1e-9), (torch.float32, 2e-4)):
        torch.manual_seed(2)
        model = MixedMLP().to(dtype)
        for round_ in range(2):
            probe = make_probe((2,), 40, gen, t, CFM(0.2), dtype=dtype)
            truth = naive_stats(copy.deepcopy(model).double(), cast(probe, DT), EDGES)
            sums = bin_sums(model, probe, EDGES, keep_sums=False)
            assert sums.method == "hooks", (dtype, round_)
            check(sums, truth, EDGES, False, rtol=rtol)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5).add_(0.1)
