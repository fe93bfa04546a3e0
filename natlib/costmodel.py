r"""One FLOP and memory model for curvature work, in floating-point operations (a
multiply-add pair counts as two) and bytes: K-FAC's own counts
(:attr:`natlib.kfac.KFACApproximation.flops`), the scaling sweeps and chapter 4 all use it.

The per-layer counts of K-FAC (Martens & Grosse, 2015, §8) for a layer whose factors are
:math:`A` (:math:`d_A \times d_A`) and :math:`G` (:math:`d_G \times d_G`), from a batch of
:math:`N` examples with :math:`K` output cotangents each:

- forming the factors: :math:`2N d_A^2 + 2NK d_G^2`;
- eigendecomposing them: :math:`c\,(d_A^3 + d_G^3)`, :math:`c \approx 9`;
- one solve :math:`V \mapsto G^{-1} V A^{-1}` on the :math:`d_G \times d_A` gradient: two
  products, :math:`2 d_G d_A (d_G + d_A)` (factored damping), or four in the eigenbases
  (exact damping).

For a whole step of an MLP of :math:`L` square layers of width :math:`d` and batch :math:`B`
(:func:`step_cost`, Monte-Carlo Fisher with one sample, factored damping):

=====================  =========================================  ==========================
part                   FLOPs                                      runs
=====================  =========================================  ==========================
forward + backward     :math:`6BLd^2`                             every step (SGD's cost)
factors :math:`A, G`   :math:`4BLd^2` (:math:`2Bd^2` each)        every :math:`T_\text{cov}`
sampled backward       :math:`2BLd^2`                             every :math:`T_\text{cov}`
preconditioning        :math:`4Ld^3` (:math:`G^{-1} V A^{-1}`)    every step
refresh                :math:`2(c + 2)Ld^3`                       every :math:`T_\text{inv}`
=====================  =========================================  ==========================

where :math:`2d^3` forms a damped inverse from an eigendecomposition. The overhead over SGD
is therefore

.. math:: \frac{\text{K-FAC}}{\text{SGD}} = 1 + \frac{1}{T_\text{cov}} + \frac{2d}{3B}
          + \frac{(c + 2)\,d}{3B\,T_\text{inv}} .
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

from natlib.checks import check_choice, check_integer, check_positive, check_positive_int
from natlib.linalg import EIGH_FLOPS_PER_CUBE, INVERSE_FLOPS_PER_CUBE, DampingMode
from natlib.losses import FisherKind


def kronecker_factor_flops(d_a: int, d_g: int, batch: int, cotangents: int) -> int:
    """FLOPs of :math:`A = \\frac1N \\sum_n \\bar a_n \\bar a_n^\\top` and
    :math:`G = \\sum_{nk} g_{nk} g_{nk}^\\top`."""
    return 2 * batch * (d_a**2 + cotangents * d_g**2)


def eigh_flops(d: int, eigh_constant: float = EIGH_FLOPS_PER_CUBE) -> float:
    """FLOPs of one symmetric eigendecomposition of a ``d x d`` matrix."""
    return eigh_constant * d**3


def kronecker_refresh_flops(
    d_a: int, d_g: int, mode: DampingMode, eigh_constant: float = EIGH_FLOPS_PER_CUBE
) -> float:
    """Eigendecompositions of both factors, plus forming the two damped inverses for
    ``"pi"`` damping."""
    per_cube = eigh_constant + (INVERSE_FLOPS_PER_CUBE if mode == "pi" else 0)
    return per_cube * (d_a**3 + d_g**3)


def kronecker_solve_flops(d_a: int, d_g: int, mode: DampingMode) -> int:
    """One damped solve on a ``d_g x d_a`` gradient matrix: two matrix products for
    ``"pi"`` damping, four (into the eigenbases and back) for ``"exact"``."""
    products = 4 if mode == "exact" else 2
    return products * d_g * d_a * (d_g + d_a)


def kronecker_layers_flops(
    shapes: Iterable[tuple[int, int]], mode: DampingMode
) -> tuple[float, float]:
    """Refresh and solve FLOPs (:func:`kronecker_refresh_flops`, :func:`kronecker_solve_flops`)
    summed over layers whose factors have sizes ``(d_a, d_g)``."""
    shapes = list(shapes)
    return (
        sum(kronecker_refresh_flops(d_a, d_g, mode) for d_a, d_g in shapes),
        sum(kronecker_solve_flops(d_a, d_g, mode) for d_a, d_g in shapes),
    )


def dense_refresh_flops(p: int) -> float:
    """A Cholesky factorisation of a ``p x p`` matrix: :math:`p^3 / 3`."""
    return p**3 / 3


def dense_solve_flops(p: int) -> int:
    """Two triangular solves with a ``p x p`` Cholesky factor: :math:`2p^2`."""
    return 2 * p**2


# --------------------------------------------------------------------------- one factor


def factor_refresh_flops(d: int, eigh_constant: float = EIGH_FLOPS_PER_CUBE) -> float:
    """One ``d x d`` factor's refresh with factored damping: its eigendecomposition and the
    damped inverse :math:`Q (\\Lambda + c)^{-1} Q^\\top`, :math:`(c_\\text{eigh} + 2) d^3`."""
    return eigh_flops(d, eigh_constant) + INVERSE_FLOPS_PER_CUBE * d**3


def factor_apply_flops(d: int, other: int) -> int:
    """One ``d x d`` (inverse) factor times a ``d x other`` matrix: :math:`2 d^2 m`."""
    return 2 * d * d * other


# --------------------------------------------------------------------------- whole layers


def forward_backward_flops(d_in: int, d_out: int, batch: int) -> int:
    """A linear layer's forward pass (:math:`2Bd_\\text{in}d_\\text{out}`) and backward pass
    (input and weight gradients, twice that): :math:`6Bd_\\text{in}d_\\text{out}`."""
    return 6 * batch * d_in * d_out


def cotangent_backward_flops(d_in: int, d_out: int, batch: int, cotangents: int) -> int:
    """Back-propagating ``cotangents`` extra output cotangents per example through a linear
    layer to its input (no weight gradient): :math:`2BKd_\\text{in}d_\\text{out}`."""
    return 2 * batch * cotangents * d_in * d_out


@dataclass(frozen=True)
class LayerMemory:
    """Bytes of one ``nn.Linear`` layer's weights, its factors :math:`A, G`, and their damped
    inverses."""

    weights: int
    factors: int
    inverses: int


def layer_memory(
    d_in: int,
    d_out: int,
    element_size: int = 4,
    bias: bool = True,
    damping_mode: DampingMode = "pi",
) -> LayerMemory:
    r"""Bytes of one ``nn.Linear`` layer: weights :math:`d_\text{out} d_A`, factors
    :math:`d_A^2 + d_\text{out}^2` with :math:`d_A = d_\text{in} + [b]`, and the damped
    inverses :meth:`natlib.kfac.KFACApproximation.refresh` caches: the same two squares for
    ``"pi"`` damping, plus the :math:`d_\text{out} \times d_A` eigenvalue scale for ``"exact"``."""
    check_choice("damping mode", damping_mode, DampingMode)
    d_a = d_in + int(bias)
    factors = (d_a**2 + d_out**2) * element_size
    scale = d_out * d_a * element_size if damping_mode == "exact" else 0
    return LayerMemory(d_out * d_a * element_size, factors, factors + scale)


# --------------------------------------------------------------------------- one K-FAC step

#: The parts of a K-FAC step that the model and the timings split it into.
PARTS = ("forward_backward", "factors", "precondition", "refresh")
#: The parts grouped by what their cost grows with.
GROUPS = {
    "per-example work": ("forward_backward", "factors"),
    "preconditioning": ("precondition",),
    "refresh": ("refresh",),
}


def dominant(parts: dict[str, float]) -> str:
    r"""The group of :data:`GROUPS` whose :data:`PARTS` cost most: the work that grows with the
    batch (:math:`\propto Bd^2`; forward-backward and factors tie at :math:`T_\text{cov} = 1`),
    the preconditioning, or the refresh."""
    return max(GROUPS, key=lambda group: sum(parts[part] for part in GROUPS[group]))


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one K-FAC step by part, amortised over the update periods (:func:`step_cost`)."""

    forward_backward: float
    factors: float
    sampled_backward: float
    precondition: float
    refresh: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    @property
    def overhead(self) -> float:
        """K-FAC step over SGD step (forward and backward only)."""
        return self.total / self.forward_backward

    def parts(self) -> dict[str, float]:
        """FLOPs by :data:`PARTS` (the sampled backward counts with the factors, as timed)."""
        return {
            "forward_backward": self.forward_backward,
            "factors": self.factors + self.sampled_backward,
            "precondition": self.precondition,
            "refresh": self.refresh,
        }

    def dominant(self) -> str:
        """The most expensive of :data:`GROUPS`."""
        return dominant(self.parts())


def step_cost(
    width: float,
    batch: float,
    depth: int = 1,
    T_cov: int = 1,
    T_inv: int = 1,
    eigh_constant: float = EIGH_FLOPS_PER_CUBE,
    kind: FisherKind = "mc",
    cotangents: int | None = None,
    damping_mode: DampingMode = "pi",
) -> StepCost:
    r"""One K-FAC step of an MLP of ``depth`` square layers of ``width`` :math:`d` (no bias),
    batch :math:`B`, from the per-layer counts above.

    With the defaults (one Monte-Carlo sample, ``"pi"`` damping): :math:`6BLd^2` forward and
    backward, :math:`(4 + 2)BLd^2 / T_\text{cov}` for the factors and the sampled backward,
    :math:`4Ld^3` preconditioning, :math:`2(c + 2)Ld^3 / T_\text{inv}` refresh. ``kind``
    ``"empirical"`` reuses the loss's backward (no sampled backward); ``"exact"``
    back-propagates ``cotangents`` :math:`K` per example (default: one per output, :math:`d`),
    and so does ``"mc"`` (default one sample).

    Raises:
        ValueError: for a non-positive size or period, or an unknown ``kind`` or mode.
    """
    check_choice("Fisher kind", kind, FisherKind)
    check_choice("damping mode", damping_mode, DampingMode)
    for name, value in (("width", width), ("batch", batch)):
        check_positive(name, value)
    for name, value in (("depth", depth), ("T_cov", T_cov), ("T_inv", T_inv)):
        check_positive_int(name, value)
    if cotangents is None:
        cotangents = width if kind == "exact" else 1
    check_positive("cotangents", cotangents)
    if kind == "empirical":
        cotangents = 1
    sampled = (
        0 if kind == "empirical" else cotangent_backward_flops(width, width, batch, cotangents)
    )
    return StepCost(
        forward_backward=depth * forward_backward_flops(width, width, batch),
        factors=depth * kronecker_factor_flops(width, width, batch, cotangents) / T_cov,
        sampled_backward=depth * sampled / T_cov,
        precondition=depth * kronecker_solve_flops(width, width, damping_mode),
        refresh=depth * kronecker_refresh_flops(width, width, damping_mode, eigh_constant) / T_inv,
    )


def network_step_cost(
    layers: Iterable[tuple[int, int, int]],
    update: float,
    refresh: float,
    solve: float,
    T_cov: int = 1,
    T_inv: int = 1,
    cotangents: int = 1,
) -> StepCost:
    r"""One K-FAC step of any network of linear layers, each given as ``(d_in, d_out, rows)``
    with ``rows`` the inputs it maps per step (:math:`BR` for a layer shared over :math:`R`
    positions), and K-FAC's own counts per update, refresh and solve
    (:attr:`natlib.kfac.KFACApproximation.flops`): forward and backward
    :math:`\sum 6 M d_\text{in} d_\text{out}`, the backward of ``cotangents`` :math:`K` extra
    output cotangents per row :math:`\sum 2 M K d_\text{in} d_\text{out}` (one Monte-Carlo
    sample by default, none for the empirical Fisher) and the factors every
    :math:`T_\text{cov}`, the refresh every :math:`T_\text{inv}`. Work outside the linear
    layers (attention scores, normalisation, embeddings, sampling, element-wise operations) is
    not counted, for SGD nor for K-FAC."""
    for name, value in (("T_cov", T_cov), ("T_inv", T_inv)):
        check_positive_int(name, value)
    check_integer("cotangents", cotangents, minimum=0)
    layers = list(layers)
    sampled = sum(cotangent_backward_flops(i, o, m, cotangents) for i, o, m in layers)
    return StepCost(
        forward_backward=sum(forward_backward_flops(i, o, m) for i, o, m in layers),
        factors=update / T_cov,
        sampled_backward=sampled / T_cov,
        precondition=solve,
        refresh=refresh / T_inv,
    )


# --------------------------------------------------------------------------- one factor's form

FactorForm = Literal["full", "blocks", "diagonal", "identity"]


@dataclass(frozen=True)
class FactorCost:
    """Storage and FLOPs of one side's factor in a chosen form."""

    form: FactorForm
    bytes: int
    refresh_flops: float  # per refresh
    apply_flops: float  # per step, on a (d, other) gradient matrix


def factor_cost(
    d: int,
    other: int,
    form: FactorForm,
    block: int = 1024,
    element_size: int = 4,
    eigh_constant: float = EIGH_FLOPS_PER_CUBE,
) -> FactorCost:
    r"""What a :math:`d \times d` factor costs when kept ``"full"``, as diagonal ``"blocks"`` of
    size ``block``, as its ``"diagonal"``, or dropped (``"identity"``).

    Full: :math:`d^2` entries, :func:`factor_refresh_flops` :math:`(c + 2)d^3` to refresh,
    :func:`factor_apply_flops` :math:`2d^2 m` to apply to a :math:`d \times m` gradient; blocks
    of size :math:`b`: the same per block, :math:`db`, :math:`(c + 2)db^2`, :math:`2dbm`;
    diagonal: :math:`d`, :math:`d`, :math:`dm` (the block-wise and diagonal forms of large
    layers in distributed Shampoo, Anil et al., 2020).
    """
    check_choice("form", form, FactorForm)
    if form == "identity":
        return FactorCost(form, 0, 0, 0)
    if form == "diagonal":
        return FactorCost(form, d * element_size, d, d * other)
    check_positive_int("block", block)
    sizes = [d] if form == "full" else [block] * (d // block) + ([d % block] if d % block else [])
    return FactorCost(
        form,
        sum(s * s for s in sizes) * element_size,
        sum(factor_refresh_flops(s, eigh_constant) for s in sizes),
        sum(factor_apply_flops(s, other) for s in sizes),
    )
