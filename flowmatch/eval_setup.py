"""What an evaluation is given and returns (``flowmatch/evaluation.py`` runs it): :class:`EvalOptions` (the ``eval``
config group), :class:`EvalSetup` (what the data side knows, after the direction is applied) and
:class:`EvalResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from flowmatch.distributions import Distribution, gaussian_ot_map_fn

FID_SPLITS = ("train", "test")


@dataclass
class EvalOptions:
    """The ``eval`` config group (``conf/eval/default.yaml``), shared by ``train.py`` and ``evaluate.py``.

    ``enabled``: evaluate at the end of training; ``euler_steps``: Euler step counts of the ``@euler{K}`` keys;
    ``n_fresh``: fresh sources; ``seed``: the evaluation's random stream; ``keep_trajectories``: Euler step
    counts whose trajectories from the training sources are saved (``eval_trajectories.pt``);
    ``batch_size``: integrate fresh sources (and, without kept trajectories, the training sources) in chunks
    (None: one batch); ``w2_max_dim``: no ``eval/w2`` above this dimension (cost ~ dim^3); ``mmd_max_n``:
    ``eval/mmd_mem`` on the first this many training pairs only (None: all; its kernel matrices take n^2 memory).
    Images: ``fid`` turns FID/KID on, with ``feature_extractor`` None / "inception" or an ``nn.Module``
    (N, C, H, W) in [-1, 1] -> (N, F); ``inception_weights`` a local weights file; ``fid_split`` the real images
    (train | test); ``kid_subsets``, ``kid_subset_size`` for KID.
    """

    enabled: bool = True
    euler_steps: Sequence[int] = (1, 3, 7, 11, 21, 51, 101)
    n_fresh: int = 1000
    seed: int = 12345
    keep_trajectories: Sequence[int] = ()
    batch_size: int | None = None
    w2_max_dim: int = 4096
    mmd_max_n: int | None = None
    fid: bool = False
    feature_extractor: str | nn.Module | None = None
    inception_weights: str | None = None
    fid_split: str = "train"
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        fe = self.feature_extractor
        if not (fe is None or fe == "inception" or isinstance(fe, nn.Module)):
            raise ValueError(
                f"eval.feature_extractor must be null, inception or a {{_target_: ...}} config of an "
                f"nn.Module, got {fe!r}"
            )
        if self.fid_split not in FID_SPLITS:
            raise ValueError(f"eval.fid_split must be one of {list(FID_SPLITS)}, got {self.fid_split!r}")
        if int(self.n_fresh) < 2:
            raise ValueError(f"eval.n_fresh must be an integer >= 2, got {self.n_fresh}")
        self.euler_steps = [int(k) for k in self.euler_steps]
        self.keep_trajectories = [int(k) for k in self.keep_trajectories]


@dataclass
class EvalSetup:
    """What evaluation needs from the data side, all after the direction is applied.

    ``pairs``: the coupling's finite training pairs (X0, X1) or None; ``ot_map``: x0 -> T_OT(x0) in closed form
    or None; ``target_moments``: (mean, cov) of p1 if known; ``train_data`` / ``test_data``: the image data
    set's training / held-out split (CPU; ``test_data`` may be a function returning it, called when needed)
    when the data is the target p1, else None; ``ot_targets``: the OT partners of the training sources when the
    coupling knows them (``shuffled_ot``), else None; ``assign``: (X0, X1) -> the optimal permutation over the
    whole pair set (the coupling's OT solver; None: exact). Build it with :meth:`from_ends`.
    """

    p0: Distribution
    p1: Distribution
    pairs: tuple[Tensor, Tensor] | None = None
    ot_map: Callable[[Tensor], Tensor] | None = None
    target_moments: tuple[Tensor, Tensor] | None = None
    train_data: Tensor | None = None
    test_data: Tensor | Callable[[], Tensor] | None = None
    ot_targets: Tensor | None = None
    assign: Callable[[Tensor, Tensor], Tensor] | None = None

    @classmethod
    def from_ends(cls, p0: Distribution, p1: Distribution, coupling, train_data=None, test_data=None) -> EvalSetup:
        """The setup the ends and the coupling define: pairs, OT partners and OT solver from the coupling, the OT
        map and the target moments from the distributions (:func:`~flowmatch.distributions.gaussian_ot_map_fn`,
        ``p1.moments()``)."""
        ot_targets = getattr(coupling, "ot_targets", None)
        return cls(
            p0, p1, coupling.pairs, gaussian_ot_map_fn(p0, p1), p1.moments(), train_data, test_data, ot_targets,
            coupling.assign,
        )  # fmt: skip


@dataclass
class EvalResult:
    """``metrics`` (eval/ keys), ``protocol`` (protocol/ keys) and kept ``trajectories`` (name -> (T, B, ...))."""

    metrics: dict[str, float]
    trajectories: dict[str, Tensor] = field(default_factory=dict)
    protocol: dict[str, float | str] = field(default_factory=dict)


class FIDWarning(UserWarning):
    """FID/KID were asked for but could not be computed (the other metrics still are)."""
