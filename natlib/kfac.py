r"""Kronecker-factored approximate curvature (K-FAC) for networks of ``nn.Linear`` layers.

A linear layer :math:`s = W a + b` (weight :math:`d_\text{out} \times d_\text{in}`) has, for
example :math:`n` and an output cotangent :math:`k`, the weight gradient
:math:`g_{nk} \bar a_n^\top`, where :math:`\bar a = (a, 1)` appends the homogeneous coordinate
for the bias and :math:`g = \partial (b^\top f) / \partial s` back-propagates an output
cotangent :math:`b`. The layer's Fisher block is therefore
:math:`\sum_{nk} \bar a_n \bar a_n^\top \otimes g_{nk} g_{nk}^\top` (column-major vec), and
K-FAC replaces it by :math:`A \otimes G` with

.. math:: A = \tfrac1N \sum_n \bar a_n \bar a_n^\top, \qquad G = \sum_{nk} g_{nk} g_{nk}^\top

(Martens & Grosse, 2015, §3). The cotangents carry the loss's reduction factor, so that
:math:`A \otimes G` equals the exact block for a batch of one example, and for deep linear
networks with ``MSELoss`` at any batch size (there :math:`g_{nk}` does not depend on n).
PyTorch flattens weights row-major, where the same block reads :math:`G \otimes A`;
:meth:`KFACApproximation.to_dense` permutes it into ``parameters_to_vector`` order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from natlib.losses import likelihood

Fisher = Literal["type-2", "mc", "empirical"]
FISHERS = ("type-2", "mc", "empirical")
# K-FAC's names for the Fisher kinds of :meth:`natlib.losses.Likelihood.fisher_cotangents`.
LIKELIHOOD_KIND = {"type-2": "exact", "mc": "mc", "empirical": "empirical"}
DampingMode = Literal["exact", "pi"]
DAMPING_MODES = ("exact", "pi")
# Symmetric QR with eigenvectors costs about 9 n^3 flops (Golub & Van Loan, 2013, §8.3).
EIGH_FLOPS_PER_CUBE = 9


@dataclass(frozen=True)
class LinearLayer:
    """Where one ``nn.Linear`` layer sits in the model and in the flat parameter vector."""

    name: str
    module: nn.Linear = field(repr=False, compare=False)
    d_in: int
    d_out: int
    bias: bool

    @property
    def d_a(self) -> int:
        """Size of the input factor :math:`A`: :math:`d_\\text{in}` plus one with a bias."""
        return self.d_in + int(self.bias)

    @property
    def numel(self) -> int:
        return self.d_out * self.d_a

    def join(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The ``(d_out, d_a)`` matrix :math:`[W \\mid b]` of a weight-shaped and bias pair."""
        return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`join`: ``[weight]`` or ``[weight, bias]``."""
        if not self.bias:
            return [matrix]
        return [matrix[..., : self.d_in], matrix[..., self.d_in]]

    def permutation(self, device: torch.device | None = None) -> Tensor:
        """Indices into row-major :math:`\\mathrm{vec}([W \\mid b])` in parameter order
        (weight row-major, then bias)."""
        index = torch.arange(self.numel, device=device).view(self.d_out, self.d_a)
        if not self.bias:
            return index.flatten()
        return torch.cat([index[:, : self.d_in].flatten(), index[:, self.d_in]])


def linear_layers(model: nn.Module) -> list[LinearLayer]:
    """The model's layers in parameter order, all of them ``nn.Linear``.

    Raises:
        ValueError: if a module with parameters is not an ``nn.Linear``, a parameter is
            frozen, or the model has no parameters.
    """
    layers = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if type(module) is not nn.Linear:
            raise ValueError(
                f"layer {name or '<root>'!r} ({type(module).__name__}) has parameters, but "
                "K-FAC here supports only nn.Linear layers (with or without bias)."
            )
        if not all(p.requires_grad for p in own):
            raise ValueError(f"layer {name or '<root>'!r} has frozen parameters; unfreeze them.")
        has_bias = module.bias is not None
        layers.append(LinearLayer(name, module, module.in_features, module.out_features, has_bias))
    if not layers:
        raise ValueError("the model has no parameters.")
    return layers


class Recorder:
    """Forward hooks that keep each ``nn.Linear`` layer's input and output while active."""

    def __init__(self, layers: Sequence[LinearLayer]) -> None:
        self.layers = list(layers)
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.active = False
        self._handles = [
            layer.module.register_forward_hook(self._hook(layer.name)) for layer in self.layers
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.active:
                return
            if name in self.inputs:
                raise ValueError(
                    f"layer {name!r} ran twice in one forward pass; K-FAC here supports each "
                    "nn.Linear applied once."
                )
            if args[0].ndim != 2:
                raise ValueError(
                    f"layer {name!r} got input of shape {tuple(args[0].shape)}; K-FAC here "
                    "supports (N, d_in) inputs."
                )
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return hook

    def start(self) -> None:
        self.inputs, self.outputs, self.active = {}, {}, True

    def stop(self) -> None:
        self.active = False
        missing = [layer.name for layer in self.layers if layer.name not in self.inputs]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass.")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def input_factors(self) -> dict[str, Tensor]:
        r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` for every layer."""
        return {
            layer.name: input_factor(self.inputs[layer.name], layer.bias) for layer in self.layers
        }

    def gradient_factors(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r""":math:`G = \sum_{nk} g_{nk} g_{nk}^\top` by one backward pass of the cotangents,
        shape ``(K, *output.shape)``, to every layer's output (vectorised over k)."""
        outputs = [self.outputs[layer.name] for layer in self.layers]
        batched = cotangents.shape[0] > 1
        grads = torch.autograd.grad(
            output,
            outputs,
            cotangents if batched else cotangents[0],
            retain_graph=retain_graph,
            is_grads_batched=batched,
            materialize_grads=True,
        )
        return {
            layer.name: gradient_factor(g.reshape(-1, layer.d_out))
            for layer, g in zip(self.layers, grads)
        }


def input_factor(a: Tensor, bias: bool) -> Tensor:
    r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`, :math:`\bar a = (a, 1)` with a bias."""
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return (a.T @ a).div_(a.shape[0])


def gradient_factor(g: Tensor) -> Tensor:
    r""":math:`G = \sum_{m} g_m g_m^\top` over the rows of ``g``."""
    return g.T @ g


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or Inf.")


def eigh(matrix: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at zero) and eigenvectors of a symmetric PSD factor.

    A float32 decomposition that fails or returns non-finite values is retried in float64.
    """
    check_finite(matrix, what)
    try:
        values, vectors = torch.linalg.eigh(matrix)
        ok = bool(torch.isfinite(values).all() and torch.isfinite(vectors).all())
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        ok = False
    if not ok:
        values, vectors = torch.linalg.eigh(matrix.double())
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
    return values.clamp_min(0.0), vectors


def check_damping(damping: float) -> None:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a positive finite number, got {damping!r}.")


@dataclass(frozen=True)
class DampedInverse:
    r"""One layer's damped inverse, ready to apply to gradient matrices :math:`V = [dW \mid db]`.

    ``"exact"``: :math:`(A \otimes G + \lambda I)^{-1}\mathrm{vec}(V) = \mathrm{vec}(Q_G
    [(Q_G^\top V Q_A) \oslash (g a^\top + \lambda)] Q_A^\top)` from the eigendecompositions
    :math:`A = Q_A \mathrm{diag}(a) Q_A^\top`, :math:`G = Q_G \mathrm{diag}(g) Q_G^\top`
    (``left`` :math:`= Q_G`, ``right`` :math:`= Q_A`, ``scale`` the reciprocal).
    ``"pi"``: the factored Tikhonov damping :math:`(A + \pi\sqrt\lambda I) \otimes (G +
    \sqrt\lambda/\pi\, I)` with :math:`\pi^2 = (\mathrm{tr} A / d_A) / (\mathrm{tr} G / d_G)`
    (Martens & Grosse, 2015, §6.3): ``left`` and ``right`` are the two damped inverses.
    """

    left: Tensor
    right: Tensor
    scale: Tensor | None = None

    @classmethod
    def of(
        cls,
        eigen_a: tuple[Tensor, Tensor],
        eigen_g: tuple[Tensor, Tensor],
        damping: float,
        mode: DampingMode,
    ) -> DampedInverse:
        """Build from the eigendecompositions ``(values, vectors)`` of :math:`A` and :math:`G`
        (see :func:`eigh`)."""
        check_damping(damping)
        (a, QA), (g, QG) = eigen_a, eigen_g
        if mode == "exact":
            return cls(QG, QA, 1.0 / (g.unsqueeze(1) * a.unsqueeze(0) + damping))
        if mode != "pi":
            raise ValueError(f"damping mode {mode!r} is not supported; use one of {DAMPING_MODES}.")
        pi = pi_factor(a, g)
        root = math.sqrt(damping)
        return cls((QG / (g + root / pi)) @ QG.T, (QA / (a + pi * root)) @ QA.T)

    def apply(self, V: Tensor) -> Tensor:
        """The damped inverse applied to ``V`` (``(..., d_out, d_A)``), in the same shape."""
        if self.scale is None:
            return self.left @ V @ self.right
        inner = self.left.T @ V @ self.right
        return self.left @ (inner * self.scale) @ self.right.T


def pi_factor(a: Tensor, g: Tensor) -> Tensor:
    r""":math:`\pi = \sqrt{(\mathrm{tr} A / d_A) / (\mathrm{tr} G / d_G)}` from the factors'
    eigenvalues; 1 when either trace vanishes."""
    ratio = (a.mean() / g.mean()).sqrt()
    return torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))


@dataclass(frozen=True)
class KFACCost:
    """Sizes and floating-point operation counts of a K-FAC approximation (all layers)."""

    factor_numel: int  # entries of all A and G
    factor_bytes: int
    factor_flops: int  # forming A and G from the batch
    decomposition_flops: int  # eigendecompositions of every A and G (estimate)
    solve_flops: dict[str, int]  # one solve, by damping mode


class KFACApproximation:
    r"""The block-diagonal K-FAC approximation :math:`\mathrm{diag}_l(A_l \otimes G_l)`.

    Attributes:
        layers: the model's layers in parameter order.
        factors: ``{layer name: (A, G)}``.
        batch_size, num_cotangents: N and K of the batch the factors come from.
    """

    def __init__(
        self,
        layers: Sequence[LinearLayer],
        factors: dict[str, tuple[Tensor, Tensor]],
        batch_size: int,
        num_cotangents: int,
    ) -> None:
        self.layers = list(layers)
        self.factors = factors
        self.batch_size = batch_size
        self.num_cotangents = num_cotangents
        self._eigen: dict[str, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]] = {}

    def to_dense(self) -> Tensor:
        """The block-diagonal ``(P, P)`` matrix in ``parameters_to_vector`` order."""
        blocks = []
        for layer in self.layers:
            A, G = self.factors[layer.name]
            order = layer.permutation(A.device)
            blocks.append(torch.kron(G, A)[order][:, order])
        return torch.block_diag(*blocks)

    def solve(
        self, v: Tensor | Sequence[Tensor], damping: float, mode: DampingMode = "exact"
    ) -> Tensor | list[Tensor]:
        r""":math:`(K + \lambda I)^{-1} v` layer by layer (see :class:`DampedInverse`).

        Args:
            v: a flat vector in parameter order, or a list of per-parameter tensors.
            damping: :math:`\lambda > 0`.
            mode: ``"exact"`` damping or the factored ``"pi"`` damping.

        Returns:
            The result in the form of ``v``.
        """
        flat = isinstance(v, Tensor)
        parts = self._parameter_tensors(v) if flat else list(v)
        out, i = [], 0
        for layer in self.layers:
            inverse = DampedInverse.of(*self.eigen(layer.name), damping, mode)
            bias = parts[i + 1] if layer.bias else None
            out += layer.split(inverse.apply(layer.join(parts[i], bias)))
            i += 1 + int(layer.bias)
        return torch.cat([p.flatten() for p in out]) if flat else out

    def eigen(self, name: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """The eigendecompositions of layer ``name``'s :math:`A` and :math:`G` (cached)."""
        if name not in self._eigen:
            A, G = self.factors[name]
            self._eigen[name] = (
                eigh(A, f"factor A of layer {name!r}"),
                eigh(G, f"factor G of layer {name!r}"),
            )
        return self._eigen[name]

    def _parameter_tensors(self, v: Tensor) -> list[Tensor]:
        total = sum(layer.numel for layer in self.layers)
        if v.shape != (total,):
            raise ValueError(f"v must have shape ({total},), got {tuple(v.shape)}.")
        sizes, shapes = [], []
        for layer in self.layers:
            sizes.append(layer.d_out * layer.d_in)
            shapes.append((layer.d_out, layer.d_in))
            if layer.bias:
                sizes.append(layer.d_out)
                shapes.append((layer.d_out,))
        return [c.view(s) for c, s in zip(v.split(sizes), shapes)]

    def cost(self) -> KFACCost:
        r"""Memory and flop counts: forming :math:`A` (:math:`2 N d_A^2`) and :math:`G`
        (:math:`2 N K d_G^2`), decomposing both (:math:`9(d_A^3 + d_G^3)`), and one solve:
        four products :math:`2 d_G d_A (d_G + d_A)` (``"exact"``) or two (``"pi"``)."""
        n, k = self.batch_size, self.num_cotangents
        numel = sum(layer.d_a**2 + layer.d_out**2 for layer in self.layers)
        element = next(iter(self.factors.values()))[0].element_size()
        products = sum(layer.numel * (layer.d_a + layer.d_out) for layer in self.layers)
        return KFACCost(
            factor_numel=numel,
            factor_bytes=numel * element,
            factor_flops=sum(2 * n * (layer.d_a**2 + k * layer.d_out**2) for layer in self.layers),
            decomposition_flops=sum(
                EIGH_FLOPS_PER_CUBE * (layer.d_a**3 + layer.d_out**3) for layer in self.layers
            ),
            solve_flops={"exact": 4 * products, "pi": 2 * products},
        )


def layer_blocks(matrix: Tensor, layers: Sequence[LinearLayer]) -> list[Tensor]:
    """The diagonal blocks of a ``(P, P)`` matrix in parameter order, one per layer."""
    blocks, start = [], 0
    for layer in layers:
        blocks.append(matrix[start : start + layer.numel, start : start + layer.numel])
        start += layer.numel
    if start != matrix.shape[0]:
        raise ValueError(
            f"the layers hold {start} parameters, the matrix is {matrix.shape[0]} wide."
        )
    return blocks


def nearest_kronecker(block: Tensor, layer: LinearLayer) -> tuple[Tensor, Tensor]:
    r"""The Kronecker product closest to a layer's block in Frobenius norm.

    Returns :math:`(A, G)` minimising :math:`\lVert A \otimes G - F_l \rVert_F` (in the
    layout of :meth:`KFACApproximation.to_dense`): rearranging the entries
    :math:`F_{(i,j),(k,l)}` into :math:`R_{(i,k),(j,l)}` turns Kronecker products into
    rank-one matrices, so the leading singular pair of :math:`R` gives the optimum
    (Van Loan & Pitsianis, 1993).
    """
    order = layer.permutation(block.device)
    row_major = torch.empty_like(block)
    row_major[order[:, None], order[None, :]] = block
    d_g, d_a = layer.d_out, layer.d_a
    R = row_major.view(d_g, d_a, d_g, d_a).permute(0, 2, 1, 3).reshape(d_g * d_g, d_a * d_a)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    sign = 1.0 if Vh[0].view(d_a, d_a).trace() >= 0 else -1.0
    root = S[0].sqrt()
    return sign * root * Vh[0].view(d_a, d_a), sign * root * U[:, 0].view(d_g, d_g)


@contextmanager
def recording(layers: Sequence[LinearLayer]) -> Iterator[Recorder]:
    """A :class:`Recorder` that is active inside the block and removed after it."""
    recorder = Recorder(layers)
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.remove()


def kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor | None = None,
    fisher: Fisher = "type-2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> KFACApproximation:
    r"""K-FAC factors of every ``nn.Linear`` layer on the batch ``X`` (Martens & Grosse, 2015).

    Args:
        fisher: ``"type-2"`` (exact output-space Fisher through the loss Hessian's square
            root), ``"mc"`` (``mc_samples`` targets drawn from the model per example) or
            ``"empirical"`` (the data labels ``y``).
        generator: the random generator for ``"mc"``.

    Raises:
        ValueError: for unsupported layers, losses or ``fisher``, missing labels, or NaN/Inf.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher {fisher!r} is not supported; use one of {FISHERS}.")
    lik = likelihood(loss_fn)
    layers = linear_layers(model)
    with torch.enable_grad(), recording(layers) as recorder:
        raw = model(X)
        recorder.stop()
        output = lik.output_matrix(raw).detach()
        check_finite(output, "the model output")
        target = None if y is None else lik.target_matrix(raw, y)
        b = lik.fisher_cotangents(output, LIKELIHOOD_KIND[fisher], target, mc_samples, generator)
        cotangents = b.reshape(b.shape[0], *raw.shape)
        G = recorder.gradient_factors(raw, cotangents)
        A = recorder.input_factors()
    factors = {}
    for layer in layers:
        name = layer.name
        check_finite(A[name], f"factor A of layer {name!r}")
        check_finite(G[name], f"factor G of layer {name!r}")
        factors[name] = (A[name], G[name])
    return KFACApproximation(layers, factors, X.shape[0], b.shape[0])
