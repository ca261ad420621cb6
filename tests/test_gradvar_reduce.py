"""The K-independent per-bin reductions, chunk plans and chunk_size=auto of the gradient-variance probe, against
the naive float64 loop of tests/test_gradvar.py (one backward per sample, two-pass variance)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_gradvar import TinyUNet, TokenMLP, VelocityMLP, cast, make_probe, naive_stats
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flowmatch import binreduce, binreduce_linear, binreduce_packed, binreduce_passes, persample_hooks
from flowmatch.gradvar import bin_sums, gradient_variance, stratified_times
from flowmatch.gradvar_memory import measure_pilot
from flowmatch.gradvar_plan import pack_chunks, rows_layout
from flowmatch.interpolants import CFM
from flowmatch.models.mlp import MLP
from flowmatch.models.unet import AttentionBlock

DT = torch.float64


class ConvAttnNet(nn.Module):
    """Conv2d, GroupNorm, the UNet's AttentionBlock (GroupNorm, Conv1d 1x1 qkv, SDPA, Conv1d 1x1 projection), a
    wide Linear time embedding added per channel, strided and 1x1 convolutions."""

    def __init__(self, c=8):
        super().__init__()
        self.inp, self.gn = nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(2, c)
        self.temb = nn.Linear(1, c)
        self.attn = AttentionBlock(c, num_heads=2, num_groups=2)
        self.down, self.skip = nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(c, 1, 3, padding=1)
        for p in self.attn.proj_out.parameters():  # leave the zero initialisation
            nn.init.normal_(p, std=0.2)

    def forward(self, x, t):
        h = F.silu(self.gn(self.inp(x))) + self.temb(t[:, None].to(x.dtype))[:, :, None, None]
        h = self.attn(h)
        h = F.interpolate(F.silu(self.down(h)), scale_factor=2.0, mode="nearest") + self.skip(h)
        return self.out(h)


class WideMLP(nn.Module):
    """(x, t) -> v through Linear layers wide enough for the centred float32 route (2^21 multiply-adds)."""

    def __init__(self, d=2, h=96):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d + 1, h), nn.Linear(h, h), nn.Linear(h, d)

    def forward(self, x, t):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(torch.cat([x, t[:, None]], 1))))))


def route_linear(monkeypatch, route):
    """One-row-per-sample Linear layers without kept sums: the stacked pass (default), or layer by layer with
    centred float32 ("centred") or float64 ("float64") products (the route of kept sums)."""
    monkeypatch.setattr(binreduce, "CENTRED_MIN_MACS", 0 if route == "centred" else 2**62)
    if route != "stacked":
        monkeypatch.setattr(persample_hooks, "is_row_linear", lambda *a: False)


def probe_times(kind, B, K, gen):
    """Equal bins (stratified, the callback's probes), uneven random times, or one crowded bin."""
    if kind == "stratified":
        return stratified_times(B // K, K, gen, dtype=DT)
    if kind == "random":
        return torch.rand(B, generator=gen, dtype=DT)
    return torch.cat([torch.full((B - K,), 0.01, dtype=DT), (torch.arange(K, dtype=DT) + 0.5) / K])  # skewed


@pytest.mark.parametrize("keep_sums", [False, True])
@pytest.mark.parametrize("times", ["stratified", "random", "skewed"])
@pytest.mark.parametrize("chunk", [200, 7])
def test_linear_and_conv_nets_match_the_naive_loop(keep_sums, times, chunk):
    """Small Linear layers (fused float64 pass), Linear over positions, Conv2d, GroupNorm, LayerNorm, Embedding
    and attention, with equal, uneven and skewed bins, whole-bin chunks and bins cut into pieces."""
    gen = torch.Generator().manual_seed(21)
    for model, shape, K in ((VelocityMLP().double(), (2,), 8), (TinyUNet().double(), (1, 8, 8), 4)):
        t = probe_times(times, 32 if shape == (2,) else 16, K, gen)
        probe = make_probe(shape, len(t), gen, t, CFM(0.2))
        edges = torch.linspace(0, 1, K + 1, dtype=DT).tolist()
        truth = naive_stats(model, probe, edges)
        sums = bin_sums(model, probe, K, method="hooks", chunk_size=chunk, keep_sums=keep_sums)
        assert sums.method == "hooks" and (sums.grad_flat is None) != keep_sums
        check(sums, truth, edges, keep_sums)


def check(sums, truth, edges, keep_sums, rtol=1e-6):
    """Per-bin statistics (and, when kept, the raw gradient sums) against the naive truth; NaN (n < 2) = NaN."""
    st = sums.to_stats()
    for k in range(len(edges) - 1):
        ref = truth[(None, k)]
        assert int(st.n[k]) == ref["n"]
        if keep_sums:
            scale = float(ref["grad_sum"].abs().max())
            torch.testing.assert_close(sums.grad_sum[k], ref["grad_sum"], rtol=rtol, atol=rtol * scale)
        for s in ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"):
            torch.testing.assert_close(getattr(st, s)[k], ref[s].double(), rtol=rtol, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("keep_sums", [False, True])
@pytest.mark.parametrize("route", ["centred", "stacked", "float64"])
@pytest.mark.parametrize("times", ["random", "stratified"])
def test_attention_unet_parts_in_float32(keep_sums, route, times, monkeypatch):
    """A float32 net with the UNet's attention block and a wide Linear, every Linear route (the stacked pass of
    centred factors, layer by layer centred float32 or float64 products), against a float64 copy."""
    route_linear(monkeypatch, route)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    for model, shape in ((ConvAttnNet(), (1, 8, 8)), (WideMLP(), (2,))):
        probe = make_probe(shape, 24, gen, probe_times(times, 24, 3, gen), CFM(0.2), dtype=torch.float32)
        truth = naive_stats(copy.deepcopy(model).double(), cast(probe, DT), [0.0, 1 / 3, 2 / 3, 1.0])
        sums = bin_sums(model, probe, 3, chunk_size=10, keep_sums=keep_sums)
        assert sums.method == "hooks"
        check(sums, truth, [0.0, 1 / 3, 2 / 3, 1.0], keep_sums, rtol=2e-4)


@pytest.mark.parametrize("keep_sums", [False, True])
@pytest.mark.parametrize("route", ["centred", "stacked"])
def test_centred_route_keeps_float64_accuracy_when_the_mean_gradient_dominates(keep_sums, route, monkeypatch):
    """The regime of test_float32_variance_is_accurate_when_the_mean_gradient_dominates (E||g||^2 / tr Cov ~ 1e6)
    through the centred float32 products, layer by layer or stacked: still within 1e-3 of the float64 truth."""
    route_linear(monkeypatch, route)
    torch.manual_seed(0)
    model = TokenMLP()
    with torch.no_grad():
        model.b.bias.fill_(1.4)
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor([0.5, -1.0], dtype=DT)
    x0, x1, eps = (torch.randn(64, 2, generator=gen, dtype=DT) for _ in range(3))
    probe = CFM(1e-3)(*(v.float() for v in (a + 1e-3 * x0, a + 1e-3 * x1, torch.rand(64, generator=gen), eps)))
    ref = naive_stats(copy.deepcopy(model).double(), cast(probe, DT), [0.0, 0.5, 1.0])
    st = bin_sums(model, probe, 2, keep_sums=keep_sums).to_stats()
    for k in range(2):
        assert ref[(None, k)]["grad_sqnorm"] > 1e5 * ref[(None, k)]["grad_var"]
        torch.testing.assert_close(st.grad_var[k], ref[(None, k)]["grad_var"], rtol=1e-3, atol=0)


class CountOps(TorchDispatchMode):
    """Counts the aten operations run inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model,shape", [(VelocityMLP(), (2,)), (WideMLP(), (2,)), (ConvAttnNet(), (1, 8, 8))])
@pytest.mark.parametrize("stacked", ["plain", "centred"])
def test_work_does_not_grow_with_the_number_of_bins(model, shape, stacked, monkeypatch):
    """Same probe size, K = 2, 20 or 40 equal bins: the same number of tensor operations (one chunk, every per-bin
    reduction batched over the bins), none of them a per-bin or per-sample Python loop; the stacked Linear pass
    held on one of its two routes (which one runs depends on the data, S / V). K = 2 (40 rows a bin) takes the
    per-bin direct form, K = 20 and 40 the packed Gram form: a fixed handful of operations more or less."""
    kappa = float("inf") if stacked == "plain" else 1.0 + 1e-9
    monkeypatch.setattr(binreduce_linear, "KAPPA_MAX", {torch.float32: (kappa, kappa)})
    counts = {}
    for K in (2, 20, 40):
        t = stratified_times(80 // K, K)
        probe = make_probe(shape, 80, torch.Generator().manual_seed(5), t, CFM(0.1), dtype=torch.float32)
        bin_sums(model, probe, K, keep_sums=False)  # warm: engine, plan and estimate cached
        with CountOps() as c:
            bin_sums(model, probe, K, keep_sums=False)
        counts[K] = c.n
    assert counts[40] == counts[20] and counts[40] <= counts[2] + 20, counts


def test_chunk_auto_respects_the_memory_budget():
    """chunk_size=auto: the chunk's measured saved activations plus the estimate's fixed part stay within the
    budget, a large budget takes the whole probe in one chunk, a tiny one one sample per chunk."""
    model = TinyUNet().double()
    gen = torch.Generator().manual_seed(6)
    probe = make_probe((1, 8, 8), 64, gen, stratified_times(16, 4, gen, dtype=DT), CFM(0.1))
    big = bin_sums(model, probe, 4, memory_budget_mib=4096, keep_sums=False)
    assert big.info["chunk_size"] == 64 and big.info["n_chunks"] == 1 and big.info["chunk_size_setting"] == "auto"
    per, fixed = big.info["bytes_per_sample"], big.info["fixed_bytes"]
    budget_mib = (fixed + 20.5 * per) / 2**20
    mid = bin_sums(model, probe, 4, memory_budget_mib=budget_mib, keep_sums=False)
    assert mid.info["chunk_size"] == 20 and mid.info["n_chunks"] == 4  # whole bins of 16 <= 20
    saved = measure_pilot(model, lambda m, p: m(p.x_t, p.t), probe[:20], [])[0]  # independent measurement
    assert saved + fixed <= budget_mib * 2**20
    tiny = bin_sums(model, probe, 4, memory_budget_mib=1e-3, keep_sums=False)
    assert tiny.info["chunk_size"] == 1 and tiny.info["n_chunks"] == 64
    for s in (mid, tiny):
        torch.testing.assert_close(s.to_stats().grad_var, big.to_stats().grad_var, rtol=1e-9, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_chunk_auto_peak_cuda_memory_within_budget():
    model = TinyUNet().cuda()
    gen = torch.Generator().manual_seed(7)
    probe = make_probe((1, 8, 8), 512, gen, dtype=torch.float32).to("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sums = bin_sums(model, probe, 4, memory_budget_mib=8, keep_sums=False)
    assert sums.info["chunk_size"] < 512
    assert torch.cuda.max_memory_allocated() - base <= 8 * 2**20 * 1.5


def test_chunk_plans_hold_whole_bins():
    specs = pack_chunks([0] * 5 + [1] * 5 + [3] * 7 + [4], 5, 6, "cpu")
    assert [(s.start, s.end, s.k0, s.counts, s.split, s.last) for s in specs] == [
        (0, 5, 0, [5], False, True),
        (5, 10, 1, [5], False, True),
        (10, 16, 3, [6], True, False),
        (16, 17, 3, [1], True, True),
        (17, 18, 4, [1], False, True),
    ]
    for counts, n_groups in (([3, 0, 1, 9, 2], 1), ([1, 1, 1, 1, 20], 2), ([4, 4, 4], 1)):
        rows = rows_layout(counts, 1, "cpu")  # one padded block, size classes, or a plain view
        assert len(rows.groups) == n_groups
        x = torch.arange(1.0, sum(counts) + 1)[:, None]
        starts = [sum(counts[:k]) for k in range(len(counts))]
        for g in rows.groups:
            blk = rows.blocks(x, g)[..., 0]
            bins = range(len(counts)) if g.bins is None else g.bins.tolist()
            for j, k in enumerate(bins):
                want = x[starts[k] : starts[k] + counts[k], 0].tolist()
                assert blk[j].tolist() == want + [0.0] * (g.n - counts[k])


def test_sums_not_kept_refuse_merge_and_all_reduce():
    model = VelocityMLP().double()
    probe = make_probe((2,), 12, torch.Generator().manual_seed(8))
    sums = bin_sums(model, probe, 2, keep_sums=False)
    for fn in (lambda: sums + sums, sums.as_tensor, lambda: sums.grad_sum):
        with pytest.raises(ValueError, match="keep_sums=True"):
            fn()
    stats = gradient_variance(model, probe, 2)
    torch.testing.assert_close(stats.grad_var, bin_sums(model, probe, 2).to_stats().grad_var, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": "big"}, "chunk_size"),
        ({"memory_budget_mib": -1}, "memory_budget_mib"),
        ({"method": "fast"}, "method"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        bin_sums(VelocityMLP(), make_probe((2,), 4, torch.Generator().manual_seed(9), dtype=torch.float32), 2, **kw)


def test_cached_plan_follows_new_probe_times():
    """Repeated probes reuse engine and plan; new times (or a new chunk size) get a new plan, still exact."""
    model = VelocityMLP().double()
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        probe = make_probe((2,), 20, gen)
        truth = naive_stats(model, probe, [0.0, 0.5, 1.0])
        check(bin_sums(model, probe, 2, keep_sums=False), truth, [0.0, 0.5, 1.0], False)
        check(bin_sums(model, probe, 2, chunk_size=3), truth, [0.0, 0.5, 1.0], True)


def test_bf16_autocast_statistics_in_float():
    """Under bfloat16 autocast (CPU here; the same code path on CUDA) the hooks engine runs, keeps its sums in
    float64 and agrees with the naive loop under the same autocast to bfloat16 accuracy."""
    torch.manual_seed(11)
    model = ConvAttnNet()
    probe = make_probe((1, 8, 8), 16, torch.Generator().manual_seed(12), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        truth = naive_stats(model, probe, [0.0, 0.5, 1.0])
        sums = bin_sums(model, probe, 2, keep_sums=False)
    assert sums.method == "hooks" and sums.info["autocast"] and sums.sum_sqnorm.dtype == DT
    st = sums.to_stats()
    for k in range(2):
        for s in ("grad_sqnorm", "mean_grad_sqnorm"):
            torch.testing.assert_close(getattr(st, s)[k], truth[(None, k)][s].double(), rtol=0.05, atol=0)


@pytest.mark.parametrize("regime", ["spread", "mean dominates"])
def test_packed_bins_through_the_engine_match_the_naive_loop(regime, monkeypatch):
    """Many small uneven bins take the packed Gram route inside the hooks engine (checked by spying on it), float32
    factors: within 2e-4 of the float64 loop; with the mean gradient dominating (E||g||^2 / tr Cov ~ 1e6) the
    route falls back to per-bin centred factors (checked) and stays within 1e-3."""
    calls = {"packed": 0, "centred": 0}
    packed, centred = binreduce_passes.packed_pass_stats, binreduce_packed._centred_unpacked

    def spy(name, fn):
        def run(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(binreduce_passes, "packed_pass_stats", spy("packed", packed))
    monkeypatch.setattr(binreduce_packed, "_centred_unpacked", spy("centred", centred))
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(3)
    K = 16
    edges = torch.linspace(0, 1, K + 1, dtype=DT).tolist()
    if regime == "spread":
        model, probe = MLP(2, width=32, depth=2), make_probe((2,), 80, gen, None, CFM(0.2), dtype=torch.float32)
        rtol = 2e-4
    else:
        model, rtol = TokenMLP(), 1e-3
        with torch.no_grad():
            model.b.bias.fill_(1.4)
        a = torch.tensor([0.5, -1.0], dtype=DT)
        x0, x1, eps = (torch.randn(80, 2, generator=gen, dtype=DT) for _ in range(3))
        probe = CFM(1e-3)(*(v.float() for v in (a + 1e-3 * x0, a + 1e-3 * x1, torch.rand(80, generator=gen), eps)))
    truth = naive_stats(copy.deepcopy(model).double(), cast(probe, DT), edges)
    st = bin_sums(model, probe, K, keep_sums=False).to_stats()
    assert calls["packed"] >= 1 and (calls["centred"] >= 1) == (regime == "mean dominates"), calls
    for k in range(K):
        ref = truth[(None, k)]
        if regime == "mean dominates" and ref["n"] > 1:
            assert ref["grad_sqnorm"] > 1e5 * ref["grad_var"]
        torch.testing.assert_close(st.grad_var[k], ref["grad_var"].double(), rtol=rtol, atol=0, equal_nan=True)


def stacked_truth(xs, ds, counts):
    """(4, L, K) float64 per layer and bin: sum ||g_r||^2 and ||sum g_r||^2 of the weight (g_r = d_r a_r^T, formed
    explicitly), then of the bias (g_r = d_r)."""
    out = torch.zeros(4, len(xs), len(counts), dtype=DT)
    for j, (x, d) in enumerate(zip(xs, ds)):
        for k, g in enumerate(torch.split(d.double()[:, :, None] * x.double()[:, None, :], counts)):
            bias = torch.split(d.double(), counts)[k]
            out[:, j, k] = torch.stack(
                [g.square().sum(), g.sum(0).square().sum(), bias.square().sum(), bias.sum(0).square().sum()]
            )
    return out


def hold_route(monkeypatch, route):
    """Hold the stacked Linear statistics on the plain (float products) or the centred route."""
    kappa = float("inf") if route == "plain" else 1 + 1e-9
    monkeypatch.setattr(binreduce_linear, "KAPPA_MAX", {DT: (kappa, kappa)})


def three_layers(counts, seed, swapped):
    """Inputs xs (widths 3, 7, 5) and output gradients ds (widths 7, 2, 5) of three layers over sum(counts) rows, and
    the sides A, D of a stacked pass over them (a ``swapped`` layer's input and output gradient exchanged)."""
    gen = torch.Generator().manual_seed(seed)
    R = sum(counts)
    xs = [torch.randn(R, i, generator=gen, dtype=DT) + 2.0 for i in (3, 7, 5)]
    ds = [torch.randn(R, o, generator=gen, dtype=DT) for o in (7, 2, 5)]
    A, D = zip(*[(d, x) if s else (x, d) for x, d, s in zip(xs, ds, swapped)])
    return xs, ds, A, D


@pytest.mark.parametrize("route", ["plain", "centred"])
@pytest.mark.parametrize("counts", [[6, 6, 6], [9, 1, 0, 4, 2], [30, 1, 1]])
def test_stacked_linear_pass_against_explicit_per_sample_gradients(route, counts, monkeypatch):
    """The stacked pass (layers of different widths zero-padded, one swapped, equal, uneven, empty and crowded bins)
    on float64 factors, either route, against per-sample gradients formed explicitly."""
    hold_route(monkeypatch, route)
    swap = torch.tensor([[False], [True], [False]])
    xs, ds, A, D = three_layers(counts, 9, swap[:, 0].tolist())
    rows = rows_layout(counts, 1, "cpu")
    got = torch.zeros(4, 3, len(counts), dtype=DT)
    for blk in binreduce_linear.blocks_for(rows):
        res = binreduce_linear.linear_stats(
            binreduce_linear.stack_factors(list(A), blk, DT),
            binreduce_linear.stack_factors(list(D), blk, DT),
            blk,
            swap,
        )
        got[:, :, blk.bins if blk.bins is not None else slice(None)] = res
    torch.testing.assert_close(got, stacked_truth(xs, ds, counts), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("route", ["plain", "centred"])
@pytest.mark.parametrize("counts,n", [([6, 6, 6], 16), ([9, 1, 0, 4, 2], 16), ([30, 1, 1], 32), ([3, 5, 0, 7], 8)])
def test_packed_gram_pass_against_explicit_per_sample_gradients(route, counts, n, monkeypatch):
    """Bins packed whole into blocks of n rows (several bins a block, an empty bin, a crowded one), layers of
    different widths zero-padded, one swapped: the Gram-form statistics, or (centred) the rows taken back out of
    the blocks and centred per bin, against per-sample gradients formed explicitly."""
    hold_route(monkeypatch, route)
    swapped = [False, True, False]
    xs, ds, A, D = three_layers(counts, 11, swapped)
    pk = binreduce_packed._pack(rows_layout(counts, 1, "cpu"), counts, n)
    assert pk.nblocks == len(binreduce_packed.next_fit(counts, n)) < sum(c > 0 for c in counts) or n == 8
    pick = binreduce_linear.pick_rows(swapped)
    vals = binreduce_packed.packed_pass_stats(
        binreduce_linear.stack_factors(list(A), pk, DT),
        binreduce_linear.stack_factors(list(D), pk, DT),
        pk,
        torch.tensor(pick),
    )
    H = len(pick) // 2  # per layer (weight, bias): S, then ||sum g||^2 in the same order
    got = torch.stack([vals[0:H:2], vals[H::2], vals[1:H:2], vals[H + 1 :: 2]])
    torch.testing.assert_close(got, stacked_truth(xs, ds, counts), rtol=1e-10, atol=1e-10)


def test_packing_picks_few_full_blocks_and_the_per_bin_form_for_large_bins():
    """50 bins of ~5 rows at width 256 pack into blocks of 16 (not one 10-row product per bin); one bin of 256 rows
    at width 64 takes the per-bin direct form."""
    counts = [2, 6, 3, 3, 2, 6, 8, 10, 8, 5] * 5
    layout = binreduce_packed.choose_layout(rows_layout(counts, 1, "cpu"), 256, 256)
    assert isinstance(layout[0], binreduce_packed.Packed) and layout[0].n == 16
    assert layout[0].nblocks == len(binreduce_packed.next_fit(counts, 16)) < 25
    one_bin = binreduce_packed.choose_layout(rows_layout([256], 1, "cpu"), 64, 64)
    assert not isinstance(one_bin[0], binreduce_packed.Packed)


def test_stacked_linear_pass_centres_float32_factors_when_the_mean_dominates():
    """Float32 factors a_r = 30 + 0.03 noise, d_r = 1 + 1e-3 noise (S / V ~ 1e6): the pass switches to centred factors
    and V = S - ||sum g||^2 / n stays within 1e-5 of the float64 value (plain float32 products: off by 3-4%)."""
    gen = torch.Generator().manual_seed(10)
    counts = [40, 24]
    x = 30 + 0.03 * torch.randn(64, 16, generator=gen, dtype=DT)
    d = 1 + 1e-3 * torch.randn(64, 8, generator=gen, dtype=DT)
    truth = stacked_truth([x], [d], counts)
    blk = binreduce_linear.blocks_for(rows_layout(counts, 1, "cpu"))[0]
    n = torch.tensor(counts, dtype=DT)
    A, D = (binreduce_linear.stack_factors([t.float()], blk, torch.float32) for t in (x, d))
    for fn, tol in ((binreduce_linear.linear_stats, 1e-5), (binreduce_linear.plain_stats, None)):
        got = fn(A, D, blk)
        for w in (0, 2):  # weight, bias
            V, V_ref = got[w] - got[w + 1] / n, truth[w] - truth[w + 1] / n
            assert float((truth[w] / V_ref).min()) > 1e5  # the regime this test is about
            err = float(((V - V_ref) / V_ref).abs().max())
            assert err < tol if tol else err > 1e-3, (fn.__name__, w, err)
