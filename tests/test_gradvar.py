"""Per-time-bin gradient variance: every engine against a naive loop of B backward passes written here."""

from __future__ import annotations

import copy
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmatch import persample_hooks
from flowmatch.gradvar import (
    COLUMNS,
    BinSums,
    bin_edges,
    bin_index,
    bin_sums,
    gradient_variance,
    param_groups,
    stratified_times,
)
from flowmatch.gradvar_microbatch import microbatch_variance
from flowmatch.interpolants import CFM, Linear, PathSample
from flowmatch.losses import per_sample_loss

torch.set_num_threads(1)
DT = torch.float64


# --------------------------------------------------------------------------------------------- test networks
def time_features(t):
    f = torch.arange(1, 5, dtype=t.dtype, device=t.device) * math.pi
    return torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], 1)  # (b, 8)


class VelocityMLP(nn.Module):
    """(x, t) -> v with separate Linear layers on x and on the time features, which are also concatenated."""

    def __init__(self, d=2, h=16):
        super().__init__()
        self.x_proj, self.t_proj = nn.Linear(d, h), nn.Linear(8, h)
        self.net = nn.Sequential(
            nn.SiLU(),
            nn.Linear(h + 8, h),
            nn.LayerNorm(h),
            nn.SiLU(),
            nn.Dropout(0.5),
            nn.Linear(h, h),
            nn.SiLU(),
            nn.Linear(h, d),
        )

    def forward(self, x, t):
        f = time_features(t)
        return self.net(torch.cat([self.x_proj(x) + self.t_proj(f), f], 1))


class TinyUNet(nn.Module):
    """8x8x1 images, 8 channels: Conv2d (strided, grouped, 'same'), GroupNorm, Conv1d, an Embedding of the time
    bucket (b,), an Embedding of quantised pixels (b, 16) with repeats and padding_idx, hand-written
    self-attention (LayerNorm, Linear qkv over 16 tokens), a token MLP, nearest upsampling with a skip."""

    def __init__(self, c=8):
        super().__init__()
        self.t_emb, self.t_lin = nn.Embedding(10, c), nn.Linear(c, c)
        self.pix = nn.Embedding(6, c, padding_idx=0)
        self.inp = nn.Conv2d(1, c, 3, padding=1)
        self.gn1, self.gn2 = nn.GroupNorm(2, c), nn.GroupNorm(4, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.gconv = nn.Conv2d(c, c, 3, padding="same", groups=2)
        self.mix = nn.Conv1d(c, c, 1)
        self.conv1d = nn.Conv1d(c, c, 3, padding=1, bias=False)
        self.ln, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.tok1, self.tok2 = nn.Linear(c, 5 * c), nn.Linear(5 * c, c)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x, t):
        b, c = x.shape[0], self.inp.out_channels
        h = self.inp(x) + self.t_lin(self.t_emb((t * 9.999).long()))[:, :, None, None]
        skip = F.silu(self.gn1(h))
        h = self.down(skip)  # (b, c, 4, 4)
        q = ((x[:, 0, ::2, ::2].clamp(-1.5, 1.5) + 1.5) / 3 * 5).round().long()  # (b, 4, 4) tokens 0..5
        h = h + self.pix(q.reshape(b, 16)).transpose(1, 2).reshape(b, c, 4, 4)
        h = F.silu(self.gn2(self.gconv(h)))
        s = self.conv1d(self.mix(h.reshape(b, c, 16))).transpose(1, 2)  # (b, 16, c)
        qq, kk, vv = self.qkv(self.ln(s)).chunk(3, -1)
        s = s + self.proj(torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(c), -1) @ vv)
        s = s + self.tok2(F.silu(self.tok1(s)))
        h = F.interpolate(s.transpose(1, 2).reshape(b, c, 4, 4), scale_factor=2, mode="nearest")
        return self.out(F.silu(self.up(torch.cat([h, skip], 1))))


def make_probe(shape, B, gen, t=None, interp=CFM(0.1), dtype=DT):
    """A PathSample of B standard normal x0, x1 + 1, eps and uniform (or given) times from ``interp``."""
    x0, x1 = torch.randn(B, *shape, generator=gen, dtype=DT), torch.randn(B, *shape, generator=gen, dtype=DT)
    t = torch.rand(B, generator=gen, dtype=DT) if t is None else t
    eps = torch.randn(B, *shape, generator=gen, dtype=DT)
    return interp(x0.to(dtype), (x1 + 1.0).to(dtype), t.to(dtype), eps.to(dtype))


def cast(path, dtype):
    """The PathSample with every field converted to ``dtype``."""
    return PathSample(**{f.name: getattr(path, f.name).to(dtype) for f in fields(path)})


# ------------------------------------------------------------------------------------------ independent truth
def naive_stats(model, probe, edges, groups=None, loss_fn=per_sample_loss):
    """B separate backward passes; per-bin statistics with the centred (two-pass) variance formula (float64)."""
    was = model.training
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    G, L = [], []
    for i in range(len(probe)):
        li = loss_fn(model, probe[i : i + 1])[0]
        gs = torch.autograd.grad(li, [p for _, p in params], allow_unused=True)
        G.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, (_, p) in zip(gs, params)]
            )
        )
        L.append(float(li.detach()))
    model.train(was)
    G, L, t = torch.stack(G), torch.tensor(L, dtype=DT), probe.t.double()
    cols = {None: torch.arange(G.shape[1])}
    off = torch.tensor([0] + [p.numel() for _, p in params]).cumsum(0)
    pos = {n: torch.arange(int(off[j]), int(off[j + 1])) for j, (n, _) in enumerate(params)}
    for g, names in (groups or {}).items():
        cols[g] = torch.cat([pos[n] for n in names])
    out = {}
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        mask = (t >= lo) & ((t < hi) | ((t == hi) & (k == len(edges) - 2)))
        n = int(mask.sum())
        for g, c in cols.items():
            Gk = G[mask][:, c]
            var = ((Gk - Gk.mean(0)) ** 2).sum() / (n - 1) if n > 1 else torch.tensor(float("nan"))
            out[(g, k)] = {
                "n": n,
                "loss": L[mask].mean(),
                "grad_var": var,
                "grad_sum": Gk.sum(0),
                "grad_sqnorm": (Gk**2).sum(1).mean(),
                "mean_grad_sqnorm": (Gk.mean(0) ** 2).sum(),
            }
    return out


def assert_matches(sums, truth, edges, groups=None, rtol=1e-5):
    """Compare BinSums (raw per-bin gradient sums) and its statistics with the naive truth."""
    stats = sums.to_stats()
    for k in range(len(edges) - 1):
        torch.testing.assert_close(sums.grad_sum[k].double(), truth[(None, k)]["grad_sum"], rtol=rtol, atol=rtol * 1e-4)
        assert stats.t_lo[k] == edges[k] and stats.t_hi[k] == edges[k + 1]
        ref = truth[(None, k)]
        assert int(stats.n[k]) == ref["n"]
        for s in ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"):
            torch.testing.assert_close(getattr(stats, s)[k], ref[s].double(), rtol=rtol, atol=1e-12, msg=s)
        for g in groups or {}:
            for s in ("grad_var", "grad_sqnorm", "mean_grad_sqnorm"):
                torch.testing.assert_close(
                    stats.groups[g][s][k], truth[(g, k)][s].double(), rtol=rtol, atol=1e-12, msg=f"{g} {s}"
                )


def force_gram(monkeypatch, policy):
    """hooks: 'auto' size rule, or force the Gram trick / the materialised per-sample weight gradients."""
    if policy != "auto":
        monkeypatch.setattr(persample_hooks, "use_gram", lambda S, r, c: S > 1 and policy == "gram")


EDGES = [0.0, 0.3, 0.5, 0.9, 1.0]


@pytest.mark.parametrize(
    "method,policy",
    [("hooks", "auto"), ("hooks", "gram"), ("hooks", "materialise"), ("vmap", "auto"), ("loop", "auto")],
)
def test_mlp_matches_naive_loop(method, policy, monkeypatch):
    force_gram(monkeypatch, policy)
    gen = torch.Generator().manual_seed(0)
    model = VelocityMLP().double().train()
    t = torch.cat([torch.rand(25, generator=gen, dtype=DT), torch.tensor([0.0, 0.3, 1.0, 0.9], dtype=DT)])
    probe = make_probe((2,), 29, gen, t)
    groups = {"time": ["t_proj.weight", "t_proj.bias"], "head": ["net.7.weight"], "norm": ["net.2.weight"]}
    truth = naive_stats(model, probe, EDGES, groups)
    sums = bin_sums(model, probe, EDGES, method=method, chunk_size=7, groups=groups)
    assert sums.method == method and model.training and model.net[4].training
    assert_matches(sums, truth, EDGES, groups)


@pytest.mark.parametrize(
    "method,policy", [("auto", "auto"), ("auto", "gram"), ("auto", "materialise"), ("vmap", "auto")]
)
def test_conv_unet_matches_naive_loop(method, policy, monkeypatch):
    force_gram(monkeypatch, policy)
    gen = torch.Generator().manual_seed(1)
    model = TinyUNet().double()
    probe = make_probe((1, 8, 8), 18, gen, interp=CFM(0.2))
    groups = param_groups(model, "layer")
    truth = naive_stats(model, probe, [0.0, 0.5, 1.0], groups)
    sums = bin_sums(model, probe, 2, method=method, chunk_size=5, groups="layer")
    assert sums.method == ("hooks" if method == "auto" else "vmap")
    assert set(sums.to_stats().groups) == set(groups) and len(groups) == 17
    assert_matches(sums, truth, [0.0, 0.5, 1.0], groups)


def test_repo_unet_and_mlp_use_hooks_and_match_naive_loop():
    """The project's own velocity nets (float32; UNet with dropout, Conv1d qkv, SDPA attention)."""
    unet_mod = pytest.importorskip("flowmatch.models.unet")
    mlp_mod = pytest.importorskip("flowmatch.models.mlp")
    torch.manual_seed(12)
    cases = [
        (
            unet_mod.UNet(
                1,
                8,
                base_channels=8,
                channel_mult=(1, 2),
                num_res_blocks=1,
                attention_resolutions=(4,),
                dropout=0.1,
                num_heads=2,
                num_groups=4,
            ),
            (1, 8, 8),
        ),
        (mlp_mod.MLP(3, width=32, depth=2), (3,)),
    ]
    for model, shape in cases:
        for p in model.parameters():  # leave the zero-initialised layers of the UNet
            p.data.add_(0.05 * torch.randn_like(p))
        gen = torch.Generator().manual_seed(13)
        probe = make_probe(shape, 10, gen, dtype=torch.float32)
        truth = naive_stats(model, probe, [0.0, 0.5, 1.0])
        sums = bin_sums(model, probe, 2, chunk_size=4)
        assert sums.method == "hooks" and model.training
        assert_matches(sums, truth, [0.0, 0.5, 1.0], rtol=2e-3)


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_custom_loss_fn_in_every_engine(method):
    """``loss_fn=`` replaces the flow-matching loss (here a time-weighted one) in every engine."""

    def weighted(model, path):
        return (1 + path.t) * per_sample_loss(model, path)

    model = VelocityMLP().double()
    probe = make_probe((2,), 12, torch.Generator().manual_seed(15))
    truth = naive_stats(model, probe, [0.0, 0.5, 1.0], loss_fn=weighted)
    sums = bin_sums(model, probe, 2, loss_fn=weighted, method=method, chunk_size=5)
    assert sums.method == method
    assert_matches(sums, truth, [0.0, 0.5, 1.0])


class TokenMLP(nn.Module):
    """Linear(2, 16), tanh, Linear(16, 2) on each token of x (b, S, 2) (or on x (b, 2)); t is not used."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 16), nn.Linear(16, 2)

    def forward(self, x, t):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize(
    "shape,method,policy",
    [
        ((3, 2), "hooks", "gram"),
        ((3, 2), "hooks", "materialise"),
        ((2,), "hooks", "auto"),
        ((3, 2), "vmap", "auto"),
        ((3, 2), "loop", "auto"),
    ],
)
def test_float32_variance_is_accurate_when_the_mean_gradient_dominates(shape, method, policy, monkeypatch):
    """Float32 model and probe whose per-sample gradients share a common part ~1000x their spread (inputs
    a + 1e-3 noise, residuals 1.4 + O(1e-3)), so grad_var cancels E||g||^2 / tr Cov ~ 1e6 and needs float64
    sums and squared norms (float32 accumulation was off by 7.4-7.8% here, 0.7% for S = 1; now < 1e-5).
    Reference: a float64 copy of the model, one backward per sample, two-pass variance."""
    force_gram(monkeypatch, policy)
    torch.manual_seed(0)
    model = TokenMLP()
    with torch.no_grad():
        model.b.bias.fill_(1.4)
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor([0.5, -1.0], dtype=DT)
    x0, x1, eps = (torch.randn(64, *shape, generator=gen, dtype=DT) for _ in range(3))
    probe = CFM(1e-3)(*(v.float() for v in (a + 1e-3 * x0, a + 1e-3 * x1, torch.rand(64, generator=gen), eps)))
    ref = naive_stats(copy.deepcopy(model).double(), cast(probe, DT), [0.0, 1.0])[(None, 0)]
    sums = bin_sums(model, probe, 1, method=method, chunk_size=16)
    stats = sums.to_stats()
    assert sums.method == method and ref["grad_sqnorm"] > 1e5 * ref["grad_var"]  # the regime this test is about
    torch.testing.assert_close(stats.grad_var[0], ref["grad_var"], rtol=1e-3, atol=0)
    torch.testing.assert_close(stats.mean_grad_sqnorm[0], ref["mean_grad_sqnorm"], rtol=1e-5, atol=0)
    assert sums.grad_flat.dtype == DT


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x, t):
        h = torch.tanh(self.a(x * t[:, None]))
        return self.b(h) + self.b(torch.sin(h))  # self.b runs twice per forward


class FunctionalReuse(CalledTwice):
    def forward(self, x, t):  # self.a's weight also used outside self.a
        return self.b(torch.tanh(self.a(x))) + F.linear(x * t[:, None], self.a.weight.T[:2, :2])


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.att, self.out = nn.Linear(1, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 1)

    def forward(self, x, t):  # x (b, 3) seen as 3 tokens
        h = self.inp((x + t[:, None]).unsqueeze(-1))
        return self.out(self.att(h, h, h, need_weights=False)[0]).squeeze(-1)


class WithBatchNorm(CalledTwice):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x, t):  # no hook rule -> vmap; eval mode -> running stats
        return self.b(torch.tanh(self.bn(self.a(x * t[:, None]))))


class MixedDtype(CalledTwice):
    def __init__(self):
        super().__init__()
        self.b.float()  # float64 first layer, float32 head

    def forward(self, x, t):
        return self.b(torch.tanh(self.a(x * t[:, None])).float()).double()


class DataDependent(CalledTwice):
    def forward(self, x, t):  # .item() defeats vmap -> loop fallback
        h = self.a(x * t[:, None])
        return self.b(h if float(h.detach().abs().max()) < 1e6 else h * 0)


class InPlace(CalledTwice):
    def forward(self, x, t):  # outputs modified in place after the layer: still exact
        h = self.a(x * t[:, None])
        h.mul_(1.5)
        return F.silu(self.b(torch.tanh(h)), inplace=True)


class MixesBatch(CalledTwice):
    def forward(self, x, t):  # only the single-sample check can see this
        h = torch.tanh(self.a(x * t[:, None]))
        return self.b(h + 0.5 * h.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "cls,requested,used",
    [
        (CalledTwice, "hooks", "vmap"),
        (FunctionalReuse, "auto", "vmap"),
        (WithMHA, "auto", "vmap"),
        (DataDependent, "vmap", "loop"),
        (InPlace, "auto", "hooks"),
        (MixesBatch, "auto", "vmap"),
        (WithBatchNorm, "auto", "vmap"),
        (MixedDtype, "auto", "hooks"),
        (InPlace, "vmap", "vmap"),
    ],
)
def test_fallbacks_stay_exact(cls, requested, used):
    """Structural problems are caught without the single-sample check (verify=False); MixesBatch needs it."""
    gen = torch.Generator().manual_seed(2)
    model = cls().double()
    if cls is MixedDtype:
        model.b.float()
    if cls is WithBatchNorm:
        model.bn.running_mean.uniform_(-1, 1)
        model.train()
    stats_before = [b.clone() for b in model.buffers()]
    d = 3 if cls is WithMHA else 2
    probe = make_probe((d,), 12, gen)
    truth = naive_stats(model, probe, [0.0, 0.5, 1.0])
    sums = bin_sums(model, probe, 2, method=requested, chunk_size=5, verify=cls is MixesBatch)
    assert sums.method == used
    tol = 1e-4 if cls is MixedDtype else 1e-5
    assert_matches(sums, truth, [0.0, 0.5, 1.0], rtol=tol)
    assert all(torch.equal(a, b) for a, b in zip(stats_before, model.buffers()))  # running stats untouched


def test_random_forward_falls_back_to_loop():
    class Noisy(CalledTwice):
        def forward(self, x, t):  # randomness even in eval mode: vmap refuses it
            return self.b(torch.tanh(self.a(x * t[:, None]))) + 0.01 * torch.randn_like(x)

    sums = bin_sums(Noisy().double(), make_probe((2,), 6, torch.Generator().manual_seed(14)), 2, method="vmap")
    assert sums.method == "loop" and int(sums.n.sum()) == 6


def test_grads_untouched_and_modes_restored():
    gen = torch.Generator().manual_seed(3)
    model = VelocityMLP().double().train()
    model.net[4].eval()  # a mixed-mode model keeps its mixed modes
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    with torch.no_grad():  # e.g. called from a validation hook
        bin_sums(model, make_probe((2,), 8, gen), 2)
    assert model.training and not model.net[4].training and model.net[0].training
    assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinel))


# -------------------------------------------------------------------------------------- sums, merge, all-reduce
def test_as_tensor_roundtrip_and_merge_equals_union():
    gen = torch.Generator().manual_seed(4)
    model = VelocityMLP().double()
    probe = make_probe((2,), 30, gen)
    kw = dict(edges=[0.0, 0.2, 0.7, 1.0], groups="module", chunk_size=8)
    whole = bin_sums(model, probe, **kw)
    a = bin_sums(model, probe[:11], **kw)
    b = bin_sums(model, probe[11:], **kw)
    flat = a.as_tensor()
    assert flat.dim() == 1 and flat.dtype == torch.float64
    back = a.from_tensor(flat)
    for f in BinSums._FIELDS:
        assert torch.equal(getattr(back, f), getattr(a, f))
    reduced = a.from_tensor(a.as_tensor() + b.as_tensor())  # what an all-reduce SUM over two ranks gives
    for merged in (a + b, a.merge(b), reduced):
        for f in BinSums._FIELDS:
            torch.testing.assert_close(getattr(merged, f), getattr(whole, f), rtol=1e-10, atol=1e-14)
        s, w = merged.to_stats(), whole.to_stats()
        torch.testing.assert_close(s.grad_var, w.grad_var, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(s.groups["net"]["grad_var"], w.groups["net"]["grad_var"], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="expected"):
        a.from_tensor(flat[:-1])
    other = bin_sums(model, probe, edges=3)
    with pytest.raises(ValueError, match="edges"):
        a + other


# ------------------------------------------------------------------------------------ zero variance, bins, edges
def test_zero_variance_when_every_sample_is_fit_exactly():
    gen = torch.Generator().manual_seed(5)
    model = VelocityMLP().double()
    c = torch.tensor([0.5, -2.0], dtype=DT)
    with torch.no_grad():
        model.net[7].weight.zero_()
        model.net[7].bias.copy_(c)  # v = c = u for x1 = x0 + c, sigma = 0
    x0 = torch.randint(-4, 5, (20, 2), generator=gen).to(DT)  # integers: u = x1 - x0 = c exactly
    probe = Linear()(x0, x0 + c, torch.rand(20, generator=gen, dtype=DT), torch.zeros(20, 2, dtype=DT))
    st = gradient_variance(model, probe, 4)
    assert st.method == "hooks" and st.n.sum() == 20
    for s in ("loss", "grad_var", "grad_sqnorm", "mean_grad_sqnorm"):
        assert torch.all(getattr(st, s)[st.n >= 2] == 0), s


def test_zero_variance_with_identical_nonzero_gradients():
    class BiasOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def forward(self, x, t):
            return self.lin(torch.zeros_like(x[:, :1]))  # v = bias for every sample

    model = BiasOnly().double()
    x0 = torch.randn(16, 2, dtype=DT)
    probe = Linear()(x0, x0 + 3.0, torch.linspace(0, 1, 16, dtype=DT), torch.zeros(16, 2, dtype=DT))
    st = gradient_variance(model, probe, 2)
    assert torch.all(st.grad_sqnorm > 1) and torch.all(st.grad_var.abs() <= 1e-12 * st.grad_sqnorm)
    torch.testing.assert_close(st.grad_sqnorm, st.mean_grad_sqnorm, rtol=1e-12, atol=0)


def test_bin_edges_counts_and_rows():
    torch.testing.assert_close(bin_edges(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=DT))
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.5, 0.99, 1.0, 1.0], dtype=torch.float32)
    assert bin_index(t, bin_edges(4)).tolist() == [0, 0, 1, 1, 2, 3, 3, 3]
    assert bin_index(t, bin_edges([0.1, 0.5, 0.99])).tolist() == [2, 0, 0, 0, 1, 1, 2, 2]  # 2 = dropped
    t64 = torch.tensor(t.tolist(), dtype=DT).where(t != 0.99, torch.tensor(0.99, dtype=DT))
    assert t.double()[5] > 0.99 and t64[5] == 0.99
    assert bin_index(t64, bin_edges([0.1, 0.5, 0.99])).tolist() == [2, 0, 0, 0, 1, 1, 2, 2]
    model = VelocityMLP().double()
    probe = make_probe((2,), 8, torch.Generator().manual_seed(6), t64)
    st = gradient_variance(model, probe, [0.1, 0.5, 0.99])
    assert st.n.tolist() == [3, 2] and st.t_lo.tolist() == [0.1, 0.5] and st.t_hi.tolist() == [0.5, 0.99]
    assert not math.isnan(float(st.grad_var[1]))
    st1 = gradient_variance(model, probe, [0.0, 0.05, 0.2])
    assert st1.n.tolist() == [1, 1] and bool(st1.grad_var.isnan().all())  # n < 2 -> NaN
    rows = st.rows(step=12)
    assert len(rows) == 2 and all(tuple(r) == COLUMNS for r in rows)
    assert rows[1]["step"] == 12 and rows[1]["n"] == 2 and rows[0]["t_hi"] == 0.5
    assert rows[0]["grad_var"] == float(st.grad_var[0]) and rows[0]["loss"] == float(st.loss[0])
    st4 = gradient_variance(model, probe, 4, groups="module")
    assert st4.n.tolist() == [2, 2, 1, 3]
    assert {r["group"] for r in st4.group_rows(0)} == {"x_proj", "t_proj", "net"}


def test_bin_edges_accepts_numpy_and_tensors():
    np = pytest.importorskip("numpy")
    assert bin_edges(np.int64(5)).tolist() == bin_edges(5).tolist()
    assert bin_edges(torch.tensor([0.0, 0.4, 1.0])).tolist() == [0.0, pytest.approx(0.4), 1.0]
    assert bin_edges(np.array([0.0, 0.5])).tolist() == [0.0, 0.5]


@pytest.mark.parametrize(
    "bad",
    [
        0,
        -3,
        True,
        2.5,
        "10",
        [0.5, 0.2],
        [0.0, 0.5, 0.5],
        [0.0, 1.5],
        [-0.1, 0.5],
        [0.3],
        [],
        ["a", "b"],
        [0.0, float("nan")],
    ],
)
def test_bad_edges_raise(bad):
    with pytest.raises(ValueError, match=r"callbacks\.gradvar\.bins"):
        bin_edges(bad)


def test_stratified_times_fill_every_bin_equally():
    for edges in (10, [0.0, 0.1, 0.7, 0.70001, 1.0]):
        e = bin_edges(edges)
        t = stratified_times(50, edges, torch.Generator().manual_seed(7))
        assert t.dtype == torch.float32 and t.shape == (50 * (len(e) - 1),)
        assert torch.bincount(bin_index(t, e), minlength=len(e)).tolist() == [50] * (len(e) - 1) + [0]


# ----------------------------------------------------------------------------------------- micro-batch estimator
class LinearField(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], 1))


def test_microbatch_formula_exact():
    torch.manual_seed(8)
    model = LinearField().double()
    batches = [make_probe((2,), 3, torch.Generator().manual_seed(100 + j), interp=CFM(0.3)) for j in range(5)]
    it = iter(batches)
    st = microbatch_variance(model, lambda m: next(it), n_micro=5, micro_size=3)
    G = []
    for bt in batches:  # each micro-batch's mean gradient, then m * unbiased var
        gs = torch.autograd.grad(per_sample_loss(model, bt).mean(), list(model.parameters()))
        G.append(torch.cat([g.reshape(-1) for g in gs]))
    G = torch.stack(G)
    var = 3 * ((G - G.mean(0)) ** 2).sum() / 4
    torch.testing.assert_close(st.grad_var, var.reshape(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(st.mean_grad_sqnorm, (G.mean(0) ** 2).sum().reshape(1), rtol=1e-10, atol=0)
    assert st.n.tolist() == [15] and st.method == "microbatch" and len(st.rows(0)) == 1
    # micro_size 1 is exactly the per-sample estimator on the same samples
    probe = make_probe((2,), 9, torch.Generator().manual_seed(9), interp=CFM(0.3))
    it1 = iter(range(9))
    st1 = microbatch_variance(model, lambda m: (lambda i: probe[i : i + 1])(next(it1)), n_micro=9, micro_size=1)
    ref = gradient_variance(model, probe, [0.0, 1.0])
    for s in ("grad_var", "grad_sqnorm", "mean_grad_sqnorm", "loss"):
        torch.testing.assert_close(getattr(st1, s), getattr(ref, s), rtol=1e-10, atol=0, msg=s)


def test_microbatch_matches_per_sample_in_expectation_and_sees_dependence():
    torch.manual_seed(10)
    model = LinearField().double()
    gen = torch.Generator().manual_seed(11)

    def iid(m, lo=0.0, hi=1.0):
        return make_probe((2,), m, gen, lo + (hi - lo) * torch.rand(m, generator=gen, dtype=DT), CFM(0.3))

    def copies(m):  # perfectly dependent batch: m copies of one sample
        return iid(1)[torch.zeros(m, dtype=torch.long)]

    ref = gradient_variance(model, iid(4000), [0.0, 0.5, 1.0])
    micro = microbatch_variance(model, iid, n_micro=400, micro_size=8, edges=[0.0, 0.5, 1.0])
    torch.testing.assert_close(micro.grad_var, ref.grad_var, rtol=0.2, atol=0)
    torch.testing.assert_close(micro.grad_sqnorm, ref.grad_sqnorm, rtol=0.2, atol=0)
    torch.testing.assert_close(micro.loss, ref.loss, rtol=0.1, atol=0)
    dep = microbatch_variance(model, copies, n_micro=400, micro_size=8)
    ratio = float(dep.grad_var[0] / gradient_variance(model, iid(4000), 1).grad_var[0])
    assert 8 * 0.75 < ratio < 8 * 1.25  # dependence inflates it m-fold, as SGD would see
    with pytest.raises(ValueError, match="outside the bin"):
        microbatch_variance(model, lambda m, lo, hi: iid(m), n_micro=2, micro_size=4, edges=4)
