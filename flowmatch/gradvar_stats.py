"""Containers of the gradient-variance instrument: the streaming per-bin sufficient statistics (:class:`BinSums`)
and the statistics derived from them (:class:`GradVarStats`); the formulas are in :mod:`flowmatch.gradvar`.

Everything is float64: grad_var = (sum ||g_i||^2 - n ||gbar||^2) / (n - 1) is a difference of two numbers that
are E||g||^2 / tr Cov times larger than itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BinSums", "GradVarStats", "Layout"]


@dataclass(frozen=True)
class Layout:
    """Trainable parameter names and sizes in accumulation order, and the parameter groups (name, members)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


def _moments(n: Tensor, sq: Tensor, gsum_sq: Tensor) -> dict[str, Tensor]:
    """Statistics from n, sum ||g_i||^2 and ||sum g_i||^2 per bin (variance clamped at 0 against rounding)."""
    mean_sq = gsum_sq / n.pow(2)
    var = ((sq - n * mean_sq) / (n - 1)).clamp_min(0.0)
    return {"grad_var": torch.where(n > 1, var, torch.nan), "grad_sqnorm": sq / n, "mean_grad_sqnorm": mean_sq}


@dataclass
class GradVarStats:
    """Per-bin statistics (each a (K,) float64 tensor; formulas in the module docstring). ``groups`` maps a group
    name to its own {"grad_var", "grad_sqnorm", "mean_grad_sqnorm"}; ``method`` is the engine that ran."""

    t_lo: Tensor
    t_hi: Tensor
    n: Tensor
    loss: Tensor
    grad_var: Tensor
    grad_sqnorm: Tensor
    mean_grad_sqnorm: Tensor
    groups: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    method: str = ""

    def rows(self, step: int) -> list[dict]:
        """One dict per bin with exactly the gradvar.csv columns ``COLUMNS``."""
        return [
            {
                "step": int(step),
                "t_lo": float(self.t_lo[k]),
                "t_hi": float(self.t_hi[k]),
                "n": int(self.n[k]),
                "loss": float(self.loss[k]),
                "grad_var": float(self.grad_var[k]),
                "grad_sqnorm": float(self.grad_sqnorm[k]),
                "mean_grad_sqnorm": float(self.mean_grad_sqnorm[k]),
            }
            for k in range(self.n.numel())
        ]

    def group_rows(self, step: int) -> list[dict]:
        """Rows ``step, group, t_lo, t_hi, n, grad_var, grad_sqnorm, mean_grad_sqnorm`` per (group, bin)."""
        return [
            {
                "step": int(step),
                "group": g,
                "t_lo": float(self.t_lo[k]),
                "t_hi": float(self.t_hi[k]),
                "n": int(self.n[k]),
                **{s: float(v[k]) for s, v in st.items()},
            }
            for g, st in self.groups.items()
            for k in range(self.n.numel())
        ]


@dataclass
class BinSums:
    """Sufficient statistics per bin, all float64 whatever the model's dtype: n (K,), loss_sum (K,), sqnorm_sum
    (K,) = sum ||g_i||^2, group_sqnorm_sum (K, G), and sum g_i stored parameter-major in ``grad_flat`` (for each
    parameter in ``layout.names`` order a contiguous (K, numel) block; :meth:`blocks` views them,
    :attr:`grad_sum` is the (K, P) matrix). Float64 because grad_var = (sum ||g_i||^2 - n ||gbar||^2) / (n - 1)
    cancels E||g||^2 / tr Cov-fold: float32 sums would lose ~1e-7 times that ratio (9% at a ratio of 1e6).
    Sums over disjoint probes add: ``a + b`` (or :meth:`merge`) equals one pass over the union; :meth:`as_tensor`
    / :meth:`from_tensor` pack them into one float64 tensor for an all-reduce SUM.

    Without the sums (``bin_sums(..., keep_sums=False)``: no K x P memory traffic) ``grad_flat`` is None and
    ``sum_sqnorm`` (K, n_params) holds ||sum_{i in bin k} g_i||^2 per parameter instead; such sums give the same
    statistics but cannot be merged or all-reduced (the cross terms between probes are gone). ``info``: how they
    were computed (engine, chunk size, memory estimate; see :func:`flowmatch.gradvar.bin_sums`)."""

    edges: Tensor
    n: Tensor
    loss_sum: Tensor
    sqnorm_sum: Tensor
    group_sqnorm_sum: Tensor
    grad_flat: Tensor | None
    layout: Layout
    method: str = ""
    sum_sqnorm: Tensor | None = None
    info: dict = field(default_factory=dict)

    _FIELDS = ("n", "loss_sum", "sqnorm_sum", "group_sqnorm_sum", "grad_flat")

    @classmethod
    def zeros(cls, edges: Tensor, layout: Layout, device=None, method: str = "", keep_sums: bool = True) -> BinSums:
        """All-zero sums for the bins ``edges`` and the parameter ``layout`` (``keep_sums=False``: no ``grad_flat``,
        a zero ``sum_sqnorm`` instead)."""
        K, P, G = edges.numel() - 1, sum(layout.sizes), len(layout.groups)

        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        flat, sq = (z(K * P), None) if keep_sums else (None, z(K, len(layout.names)))
        return cls(edges.double().cpu(), z(K), z(K), z(K), z(K, G), flat, layout, method, sq)

    def _need_sums(self, what: str) -> None:
        if self.grad_flat is None:
            raise ValueError(f"{what} needs the per-bin gradient sums: call bin_sums(..., keep_sums=True)")

    def blocks(self) -> dict[str, Tensor]:
        """Per parameter name, the (K, numel) view of sum g_i restricted to that parameter."""
        self._need_sums("BinSums.blocks")
        K = self.n.numel()
        return dict(
            zip(self.layout.names, (b.view(K, -1) for b in self.grad_flat.split([K * s for s in self.layout.sizes])))
        )

    @property
    def grad_sum(self) -> Tensor:
        """(K, P) per-bin sum of the flattened per-sample gradients (a copy)."""
        return torch.cat(list(self.blocks().values()), 1) if self.layout.names else self.grad_flat.view(-1, 0)

    def merge(self, other: BinSums) -> BinSums:
        """The sums over the union of the two probes (same edges and layout)."""
        if not torch.equal(self.edges, other.edges) or self.layout != other.layout:
            raise ValueError("cannot merge BinSums with different bin edges or parameter layout")
        self._need_sums("merge")
        other._need_sums("merge")
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return BinSums(self.edges, *(getattr(self, f) + getattr(other, f) for f in self._FIELDS), self.layout, method)

    __add__ = merge

    def as_tensor(self) -> Tensor:
        """All sums in one flat float64 tensor (all-reduce it with SUM, then :meth:`from_tensor`)."""
        self._need_sums("as_tensor (all-reduce)")
        return torch.cat([getattr(self, f).reshape(-1).double() for f in self._FIELDS])

    def from_tensor(self, flat: Tensor) -> BinSums:
        """A BinSums with this one's edges/layout and the sums read back from ``flat`` (see :meth:`as_tensor`)."""
        self._need_sums("from_tensor")
        parts, out, i = {}, flat.reshape(-1).double(), 0
        expected = sum(getattr(self, f).numel() for f in self._FIELDS)
        if out.numel() != expected:
            raise ValueError(f"flat tensor has {out.numel()} entries, expected {expected}")
        for f in self._FIELDS:
            ref = getattr(self, f)
            parts[f] = out[i : i + ref.numel()].reshape(ref.shape)
            i += ref.numel()
        return BinSums(self.edges, layout=self.layout, method=self.method, info=self.info, **parts)

    def to_stats(self) -> GradVarStats:
        """The per-bin statistics of the module docstring (:class:`GradVarStats`, on the CPU)."""
        n = self.n
        if self.grad_flat is None:
            sq_of = dict(zip(self.layout.names, self.sum_sqnorm.unbind(1)))
        else:
            sq_of = {
                name: torch.linalg.vector_norm(b, dim=1, dtype=torch.float64).square()
                for name, b in self.blocks().items()
            }  # ||sum g||^2 per parameter and bin

        def total(names):
            return sum((sq_of[m] for m in names), torch.zeros_like(n))

        groups = {
            name: {k: v.cpu() for k, v in _moments(n, self.group_sqnorm_sum[:, j], total(members)).items()}
            for j, (name, members) in enumerate(self.layout.groups)
        }
        return GradVarStats(
            self.edges[:-1].clone(),
            self.edges[1:].clone(),
            n.round().long().cpu(),
            (self.loss_sum / n).cpu(),
            **{k: v.cpu() for k, v in _moments(n, self.sqnorm_sum, total(self.layout.names)).items()},
            groups=groups,
            method=self.method,
        )
