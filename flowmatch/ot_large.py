"""Optimal assignment of large point sets: the epsilon-scaling auction algorithm, in torch (CUDA or CPU).

Problem: given x0_1..x0_n and x1_1..x1_n, find the permutation pi minimising the squared-L2 transport cost
C(pi) = sum_i ||x0_i - x1_pi(i)||^2 (the exact OT plan between two uniform empirical measures of n atoms is
such a permutation, Birkhoff-von Neumann). scipy's ``linear_sum_assignment`` solves it exactly in O(n^3) time
and O(n^2) float64 memory: fine up to a few thousand points, hours and 20 GB at n = 50,000.

Method (Bertsekas' auction, 1988; Bertsekas & Castanon's Jacobi, i.e. parallel, bidding): with the benefit
a_ij = 2 <x0_i, x1_j> - ||x1_j||^2 = ||x0_i||^2 - C_ij (the row constant ||x0_i||^2 does not change which
object person i prefers, so maximising sum_i a_i,pi(i) minimises C), every unassigned person i bids for its best
object j* = argmax_j (a_ij - p_j), raising the price p_j* by (best value - second best value) + eps; each object
goes to its highest bidder, whose previous owner becomes unassigned. A phase ends when everyone is assigned.
Epsilon is divided by ``scaling`` from phase to phase (prices kept, assignment reset) down to eps_final.

Guarantee (epsilon-complementary slackness): the final assignment costs at most n * eps_final more than the
optimum. eps_final = rel_gap * L0 / n, where L0 = sum_i min_j C_ij <= OPT, so (C(pi) - OPT) / OPT <= rel_gap.
The returned :class:`Assignment` also carries a certificate computed afterwards in float64 from the final
prices p (LP duality): OPT >= LB = sum_i ||x0_i||^2 - [sum_i max_j (a_ij - p_j) + sum_j p_j], so
``gap = cost - lower_bound`` is a proven upper bound on cost - OPT, usually far below n * eps_final.
In float32 (the default on CUDA) eps_final is kept at least 16 float32 ulps of max |a_ij| so that a bid always
raises a price; the certificate then says what was reached.

Memory: the n x n benefit matrix (float32 on CUDA: 10 GB at n = 50,000; float64 on CPU). Time: one matrix
product (n^2 d) and O(phases x rounds) bidding rounds, each a top-2 over the rows of the unassigned persons.

Plain torch and scipy (no Lightning, no Hydra).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from flowmatch.terminal import say

__all__ = [
    "Assignment",
    "SOLVERS",
    "assignment_cost",
    "auction_assignment",
    "exact_assignment",
    "exact_permutation",
    "ot_permutation",
    "OTSolver",
]

SOLVERS = ("exact", "auction", "auto")


@dataclass
class Assignment:
    """``perm`` (perm[i] = j: x0_i is paired with x1_j), its ``cost`` sum_i ||x0_i - x1_perm[i]||^2 (float64),
    a ``lower_bound`` on the optimal cost (the exact solver: the cost itself), and how it was found."""

    perm: Tensor
    cost: float
    lower_bound: float
    method: str
    eps_final: float = 0.0
    phases: int = 0
    rounds: int = 0
    bids: int = 0
    seconds: float = 0.0

    @property
    def gap(self) -> float:
        """Proven bound on cost - OPT (>= 0 up to float64 rounding)."""
        return self.cost - self.lower_bound

    @property
    def rel_gap(self) -> float:
        """gap / lower_bound: a proven bound on (cost - OPT) / OPT."""
        return self.gap / max(self.lower_bound, 1e-300)


def _flat64(x: Tensor, device) -> Tensor:
    return x.reshape(len(x), -1).to(device=device, dtype=torch.float64)


def _sqnorms(x: Tensor, chunk: int = 4096) -> Tensor:
    """||x_i||^2 per row in float64 (CPU), by blocks of rows (no float64 copy of the whole set)."""
    return torch.cat([_flat64(x[s : s + chunk], "cpu").pow(2).sum(1) for s in range(0, len(x), chunk)])


def assignment_cost(x0: Tensor, x1: Tensor, perm: Tensor, chunk: int = 4096) -> float:
    """sum_i ||x0_i - x1_perm[i]||^2 in float64."""
    total = 0.0
    for s in range(0, len(x0), chunk):
        a, b = _flat64(x0[s : s + chunk], "cpu"), _flat64(x1[perm[s : s + chunk].cpu()], "cpu")
        total += float((a - b).pow(2).sum())
    return total


def exact_permutation(x0: Tensor, x1: Tensor) -> Tensor:
    """Permutation ``perm`` minimising sum_i ||x0_i - x1_perm[i]||^2 (exact: scipy's ``linear_sum_assignment``,
    a shortest-augmenting-path Hungarian method, on the float64 cost matrix); on the device of ``x0``."""
    cost = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(x0.device)


def exact_assignment(x0: Tensor, x1: Tensor) -> Assignment:
    """:func:`exact_permutation` with its cost (lower bound = cost: it is the optimum)."""
    start = time.perf_counter()
    perm = exact_permutation(x0, x1)
    c = assignment_cost(x0, x1, perm)
    return Assignment(perm, c, c, "exact", seconds=time.perf_counter() - start)


def _targets64(x1: Tensor, device, shift: float) -> tuple[Tensor, Tensor]:
    """The targets as float64 rows on ``device`` and the column term ||x1_j||^2 + shift of the benefits."""
    b = _flat64(x1, device)
    return b, b.pow(2).sum(1) + shift


def _benefit_rows(x0_rows: Tensor, b: Tensor, col: Tensor) -> Tensor:
    """a_ij - shift = 2 <x0_i, x1_j> - ||x1_j||^2 - shift for a block of rows, in float64."""
    return 2.0 * _flat64(x0_rows, b.device) @ b.T - col


def _top2(a: Tensor, rows: Tensor, prices: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each person in ``rows``: its best object, best value and second-best value of a_ij - p_j."""
    idx, v1, v2 = [], [], []
    for s in range(0, len(rows), chunk):
        top = (a[rows[s : s + chunk]] - prices).topk(2, dim=1)
        idx.append(top.indices[:, 0])
        v1.append(top.values[:, 0])
        v2.append(top.values[:, 1])
    return torch.cat(idx), torch.cat(v1), torch.cat(v2)


def _phase(a: Tensor, prices: Tensor, eps: float, chunk: int, max_rounds: int) -> tuple[Tensor, int, int]:
    """One auction phase at ``eps`` (Jacobi bidding) from an empty assignment; updates ``prices`` in place.
    Returns person -> object, the number of bidding rounds and of bids (rows of ``a`` scanned)."""
    n = a.shape[0]
    dev = a.device
    owner = torch.full((n,), -1, dtype=torch.long, device=dev)  # object -> person
    assigned = torch.full((n,), -1, dtype=torch.long, device=dev)  # person -> object
    bidders = torch.arange(n, device=dev)
    rounds = bids = 0
    while len(bidders):
        rounds, bids = rounds + 1, bids + len(bidders)
        if rounds > max_rounds:
            raise RuntimeError(f"auction: no convergence after {max_rounds} rounds at eps={eps:.3g}")
        j, v1, v2 = _top2(a, bidders, prices, chunk)
        bid = prices[j] + (v1 - v2) + eps
        best = torch.full((n,), -math.inf, dtype=a.dtype, device=dev).scatter_reduce(0, j, bid, "amax")
        top = bid == best[j]  # ties between equal bids: the lowest person index wins
        winner = torch.full((n,), n, dtype=torch.long, device=dev).scatter_reduce(0, j[top], bidders[top], "amin")
        objs = torch.nonzero(winner < n).squeeze(1)
        new = winner[objs]
        prev = owner[objs]
        assigned[prev[prev >= 0]] = -1
        owner[objs] = new
        assigned[new] = objs
        prices[objs] = best[objs]
        bidders = torch.nonzero(assigned < 0).squeeze(1)
    return assigned, rounds, bids


def _dual_lower_bound(x0: Tensor, b: Tensor, col: Tensor, prices: Tensor, shift: float, chunk: int) -> float:
    """OPT >= sum_i ||x0_i||^2 - sum_i max_j (a_ij - shift - p_j) - sum_j p_j - n shift (float64)."""
    p = prices.to(torch.float64)
    total = 0.0
    for s in range(0, len(x0), chunk):
        total += float((_benefit_rows(x0[s : s + chunk], b, col) - p).max(dim=1).values.sum())
    return float(_sqnorms(x0, chunk).sum()) - total - float(p.sum()) - len(x0) * shift


def auction_assignment(
    x0: Tensor,
    x1: Tensor,
    rel_gap: float = 1e-6,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    scaling: float = 6.0,
    chunk: int = 4096,
    max_rounds: int = 1_000_000,
    progress: Callable[[str], None] | None = None,
) -> Assignment:
    """Near-optimal permutation by the epsilon-scaling auction (module docstring): cost - OPT <= n eps_final
    with eps_final = max(rel_gap * L0 / n, 16 ulp(max |a|)); the result carries the float64 dual certificate.

    ``device``: where the n x n benefits live (None: CUDA when available, else CPU); ``dtype``: their precision
    (None: float32 on CUDA, float64 on CPU); ``scaling``: eps divisor between phases; ``chunk``: rows per block;
    ``progress``: called with one line per phase."""
    if x0.shape != x1.shape or x0.dim() < 2:
        raise ValueError(f"auction_assignment: x0 and x1 must be (n, ...) of one shape, got {x0.shape} and {x1.shape}")
    if not rel_gap > 0 or not scaling > 1:
        raise ValueError(f"auction_assignment: rel_gap must be > 0 and scaling > 1, got {rel_gap}, {scaling}")
    start = time.perf_counter()
    n = len(x0)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float32 if device.type == "cuda" else torch.float64)
    if n == 1:
        perm = torch.zeros(1, dtype=torch.long)
        c = assignment_cost(x0, x1, perm)
        return Assignment(perm.to(x0.device), c, c, "auction", seconds=time.perf_counter() - start)
    shift = float(_sqnorms(x1, chunk).mean())  # centre the benefits (float32 resolution)
    b, col = _targets64(x1, device, shift)
    a = torch.empty(n, n, device=device, dtype=dtype)
    for s in range(0, n, chunk):
        a[s : s + chunk] = _benefit_rows(x0[s : s + chunk], b, col).to(dtype)
    row_best = torch.cat([a[s : s + chunk].max(dim=1).values for s in range(0, n, chunk)]).double()
    l0 = float(_sqnorms(x0, chunk).sum()) - float(row_best.sum()) - n * shift  # sum_i min_j C_ij
    span = float(a.max() - a.min())
    ulp = torch.finfo(dtype).eps * float(a.abs().max())
    eps_final = max(rel_gap * max(l0, 0.0) / n, 16 * ulp, 1e-12)
    eps = max(span / 4.0, eps_final)
    prices = torch.zeros(n, dtype=dtype, device=device)
    phases = rounds = bids = 0
    while True:
        assigned, r, nb = _phase(a, prices, eps, chunk, max_rounds)
        phases, rounds, bids = phases + 1, rounds + r, bids + nb
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress(f"auction n={n}: phase {phases} eps={eps:.3g}: {r} rounds, {nb} bids ({elapsed:.1f}s)")
        if eps <= eps_final:
            break
        eps = max(eps / scaling, eps_final)
    del a
    perm = assigned.cpu()
    cost = assignment_cost(x0, x1, perm)
    lb = _dual_lower_bound(x0, b, col, prices, shift, chunk)
    seconds = time.perf_counter() - start
    return Assignment(perm.to(x0.device), cost, lb, "auction", eps_final, phases, rounds, bids, seconds)


def ot_permutation(
    x0: Tensor,
    x1: Tensor,
    solver: str = "exact",
    exact_max_n: int = 5000,
    rel_gap: float = 1e-6,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> Assignment:
    """The squared-L2 optimal assignment of x0 to x1 by ``solver``: ``exact`` (scipy), ``auction`` (this
    module), or ``auto`` (exact up to ``exact_max_n`` points, auction above)."""
    if solver not in SOLVERS:
        raise ValueError(f"coupling.solver must be one of {list(SOLVERS)}, got {solver!r}")
    if solver == "exact" or (solver == "auto" and len(x0) <= int(exact_max_n)):
        return exact_assignment(x0, x1)
    return auction_assignment(x0, x1, rel_gap=rel_gap, device=device, progress=progress)


@dataclass
class OTSolver:
    """The OT solver options of a coupling (``coupling.solver``, ``coupling.exact_max_n``, ``coupling.rel_gap``):
    calling it runs :func:`ot_permutation` and prints one line (cost, certified gap) when the auction ran."""

    solver: str = "exact"
    exact_max_n: int = 5000
    rel_gap: float = 1e-6

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"coupling.solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if int(self.exact_max_n) < 1:
            raise ValueError(f"coupling.exact_max_n must be an integer >= 1, got {self.exact_max_n}")
        if not float(self.rel_gap) > 0:
            raise ValueError(f"coupling.rel_gap must be > 0, got {self.rel_gap}")

    def __call__(self, x0: Tensor, x1: Tensor) -> Assignment:
        res = ot_permutation(x0, x1, self.solver, int(self.exact_max_n), float(self.rel_gap), progress=say)
        if res.method != "exact":
            say(
                f"OT assignment of {len(x0)} points by {res.method}: cost {res.cost:.6g}, certified relative gap "
                f"<= {res.rel_gap:.2e} ({res.phases} phases, {res.rounds} rounds, {res.seconds:.1f}s)",
            )
        return res
