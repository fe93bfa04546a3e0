r"""The likelihood behind each supported ``torch.nn`` loss.

A loss :math:`L(f) = r \sum_n \ell(f_n, y_n)` over model outputs :math:`f_n \in \mathbb{R}^C`
is the negative log-likelihood of a distribution :math:`p(y \mid f) \propto e^{-\ell(f, y)}`
(up to the reduction factor :math:`r`). This module owns that view, so that curvature and
K-FAC share one definition of

- the reduction factor :math:`r` (``1/N``, ``1/(NC)`` or ``1``),
- the gradient :math:`\nabla_f \ell(f_n, y)` of one example's loss, summed over its entries,
- the output-space Hessian :math:`\Lambda_n = \nabla_f^2 \ell(f_n, y)` (independent of
  :math:`y` for these losses, and equal to :math:`\mathbb{E}_{y \sim p(\cdot\mid f_n)}
  [\nabla_f \ell \, \nabla_f \ell^\top]`, which is why the Fisher equals the GGN
  (Martens, 2020, §9.2)), a square-root factor :math:`B_n` with :math:`\Lambda_n = B_n B_n^\top`,
- sampling targets from :math:`p(y \mid f_n)` for the Monte-Carlo Fisher,
- the predictive mean :math:`\mathbb{E}[y \mid f]` and the KL divergence between the
  distributions of two outputs.

Outputs are ``(N, C)`` matrices; ``curvature`` reshapes other output shapes to that.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from natlib.checks import check_choice, check_finite, check_positive_int, check_tensor

Reduction = Literal["mean", "sum"]
FisherKind = Literal["exact", "mc", "empirical"]
_NO_IGNORED_CLASS = nn.CrossEntropyLoss().ignore_index  # -100, never a valid class index
SUPPORTED = "CrossEntropyLoss, MSELoss, BCEWithLogitsLoss (reduction 'mean' or 'sum')"


@dataclass(frozen=True)
class Likelihood(ABC):
    r"""The distribution :math:`p(y \mid f) \propto e^{-\ell(f, y)}` behind a loss."""

    reduction: Reduction
    per_example_mean: ClassVar[bool] = False  # ``mean`` divides by N (True) or by N*C (False)

    def scale(self, output: Tensor) -> float:
        r"""The reduction factor :math:`r` in :math:`L = r \sum_n \ell(f_n, y_n)`."""
        n, c = output.shape
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (n if self.per_example_mean else n * c)

    def output_matrix(self, output: Tensor) -> Tensor:
        """The model's output ``(N, ...)`` as the ``(N, C)`` matrix the methods below take.

        Raises:
            TypeError: if the model returned something other than one tensor.
            ValueError: for a scalar output or an empty batch.
        """
        check_tensor("the model output", output)
        if output.ndim == 0:
            raise ValueError("the model output needs a batch dimension, got a scalar.")
        if output.shape[0] == 0:
            raise ValueError(
                f"the model output of shape {tuple(output.shape)} holds no examples; pass a "
                "batch of at least one."
            )
        return output.reshape(output.shape[0], -1)

    def prepare(self, raw: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The detached ``(N, C)`` output matrix of the model's ``raw`` output, checked to be
        finite, and ``target`` checked and reshaped to match (``None`` stays ``None``).

        Raises:
            ValueError: if the output holds NaN or Inf or the target does not fit the loss.
        """
        output = self.output_matrix(raw).detach()
        check_finite(output, "the model output")
        return output, None if target is None else self.target_matrix(raw, target)

    @abstractmethod
    def target_matrix(self, output: Tensor, target: Tensor) -> Tensor:
        """Check ``target`` against the model's raw ``output``; reshape it to match
        ``output_matrix``. Raises ``ValueError`` on a mismatch."""

    @abstractmethod
    def gradient(self, output: Tensor, target: Tensor) -> Tensor:
        r""":math:`\nabla_f \ell(f_n, y_n)` for ``(N, C)`` outputs and targets of shape
        ``(..., N)`` (classes) or ``(..., N, C)``, broadcasting over the leading dimensions."""

    @abstractmethod
    def hessian(self, output: Tensor) -> Tensor:
        r""":math:`\Lambda_n = \nabla_f^2 \ell(f_n, y)`, shape ``(N, C, C)``."""

    @abstractmethod
    def hessian_factor(self, output: Tensor) -> Tensor:
        r""":math:`B_n` with :math:`\Lambda_n = B_n B_n^\top`, shape ``(N, C, R)``."""

    @abstractmethod
    def sample(self, output: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        r"""``num_samples`` targets per example from :math:`p(y \mid f_n)`, stacked first."""

    @abstractmethod
    def predictive_mean(self, output: Tensor) -> Tensor:
        r"""The prediction :math:`\mathbb{E}[y \mid f]` for outputs ``(..., C)``: class
        probabilities :math:`\mathrm{softmax}(f)`, success probabilities :math:`\sigma(f)` or
        the regression output :math:`f` itself."""

    @abstractmethod
    def kl_divergence(self, output: Tensor, other: Tensor) -> Tensor:
        r""":math:`\mathrm{KL}(p(\cdot \mid f) \,\|\, p(\cdot \mid f'))` per example for
        outputs ``(..., C)`` :math:`f` (``output``) and :math:`f'` (``other``), shape ``(...)``;
        its Hessian in :math:`f'` at :math:`f' = f` is :math:`\Lambda` (Martens, 2020, §9.2)."""

    def fisher_cotangents(
        self,
        output: Tensor,
        kind: FisherKind,
        target: Tensor | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Output cotangents :math:`b_{kn}`, shape ``(K, N, C)``, with
        :math:`F = \sum_{kn} J_n^\top b_{kn} b_{kn}^\top J_n` (reduction factor included).

        ``"exact"``: the columns of :math:`\sqrt r B_n`, :math:`B_n B_n^\top = \Lambda_n`
        (K-FAC's type-2 Fisher, Martens & Grosse, 2015, §5); ``"mc"``:
        :math:`\sqrt{r/K}\,\nabla_f \ell(f_n, \tilde y_{kn})` with
        :math:`\tilde y_{kn} \sim p(y \mid f_n)`; ``"empirical"``:
        :math:`\sqrt r\, \nabla_f \ell(f_n, y_n)` at the data labels (Kunstner et al., 2019).
        """
        check_choice("Fisher kind", kind, FisherKind)
        r = self.scale(output)
        if kind == "exact":
            return math.sqrt(r) * self.hessian_factor(output).permute(2, 0, 1)
        if kind == "mc":
            check_positive_int("mc_samples", mc_samples)
            samples = self.sample(output, mc_samples, generator)
            return math.sqrt(r / mc_samples) * self.gradient(output, samples)
        if target is None:
            raise ValueError("the empirical Fisher uses the data labels: pass y.")
        return math.sqrt(r) * self.gradient(output, target).unsqueeze(0)


@dataclass(frozen=True)
class Categorical(Likelihood):
    r"""``CrossEntropyLoss``: :math:`\ell = -f_y + \log \sum_c e^{f_c}`, a softmax likelihood.

    With :math:`p = \mathrm{softmax}(f)`, :math:`\Lambda = \mathrm{diag}(p) - pp^\top` has
    rank :math:`C-1` (logits are shift invariant). With :math:`q = \sqrt{p}` and
    :math:`D = \mathrm{diag}(q)` it equals :math:`D P D`, where :math:`P = I - qq^\top`
    projects onto :math:`q^\perp`. The Householder reflection
    :math:`H = I - ww^\top/(1 + q_C)`, :math:`w = q + e_C`, maps :math:`q` to :math:`-e_C`,
    so its first :math:`C-1` columns :math:`U` span :math:`q^\perp` and :math:`B = DU`
    (``C x (C-1)``) is an exact closed-form factor.
    """

    per_example_mean: ClassVar[bool] = True

    def output_matrix(self, output: Tensor) -> Tensor:
        if isinstance(output, Tensor) and output.ndim != 2:
            raise ValueError(
                f"CrossEntropyLoss needs (N, C) logits, got shape {tuple(output.shape)}."
            )
        output = super().output_matrix(output)
        if output.shape[1] < 2:
            raise ValueError(
                f"CrossEntropyLoss needs at least 2 classes, got logits of shape "
                f"{tuple(output.shape)}; use BCEWithLogitsLoss for one logit."
            )
        return output

    def target_matrix(self, output: Tensor, target: Tensor) -> Tensor:
        self.output_matrix(output)
        check_tensor("the target y", target)
        if target.shape != output.shape[:1] or target.dtype != torch.int64:
            raise ValueError(
                "CrossEntropyLoss needs integer class indices of dtype int64 (torch.long) and "
                f"shape (N,) = {tuple(output.shape[:1])}, got {target.dtype} of shape "
                f"{tuple(target.shape)}."
            )
        if target.numel() and (target.min() < 0 or target.max() >= output.shape[1]):
            raise ValueError(f"class indices must lie in [0, {output.shape[1]}).")
        return target

    def gradient(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.softmax(-1)
        return p - nn.functional.one_hot(target.long(), output.shape[-1]).to(p.dtype)

    def hessian(self, output: Tensor) -> Tensor:
        p = output.softmax(-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def hessian_factor(self, output: Tensor) -> Tensor:
        q = output.softmax(-1).sqrt()
        w = q.clone()
        w[:, -1] += 1.0
        eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
        u = eye - w.unsqueeze(-1) * w.unsqueeze(-2) / w[:, -1, None, None]
        return q.unsqueeze(-1) * u[:, :, :-1]

    def sample(self, output: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = output.softmax(-1)
        return torch.multinomial(p, num_samples, replacement=True, generator=generator).T

    def predictive_mean(self, output: Tensor) -> Tensor:
        return output.softmax(-1)

    def kl_divergence(self, output: Tensor, other: Tensor) -> Tensor:
        log_p = output.log_softmax(-1)
        return (log_p.exp() * (log_p - other.log_softmax(-1))).sum(-1)


@dataclass(frozen=True)
class Gaussian(Likelihood):
    r"""``MSELoss``: :math:`\ell = \lVert f - y \rVert^2`, likelihood :math:`\mathcal{N}(f, I/2)`.

    :math:`\Lambda = 2I`, :math:`B = \sqrt{2} I`.
    """

    def target_matrix(self, output: Tensor, target: Tensor) -> Tensor:
        return _same_shape("MSELoss", output, target)

    def gradient(self, output: Tensor, target: Tensor) -> Tensor:
        return 2.0 * (output - target)

    def hessian(self, output: Tensor) -> Tensor:
        n, c = output.shape
        return 2.0 * torch.eye(c, dtype=output.dtype, device=output.device).expand(n, c, c)

    def hessian_factor(self, output: Tensor) -> Tensor:
        n, c = output.shape
        return math.sqrt(2.0) * torch.eye(c, dtype=output.dtype, device=output.device).expand(
            n, c, c
        )

    def sample(self, output: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(
            (num_samples, *output.shape),
            generator=generator,
            dtype=output.dtype,
            device=output.device,
        )
        return output + math.sqrt(0.5) * noise

    def predictive_mean(self, output: Tensor) -> Tensor:
        return output

    def kl_divergence(self, output: Tensor, other: Tensor) -> Tensor:
        return (output - other).square().sum(-1)


@dataclass(frozen=True)
class Bernoulli(Likelihood):
    r"""``BCEWithLogitsLoss``: :math:`\ell = -y \log \sigma(f) - (1-y) \log(1 - \sigma(f))`.

    :math:`\Lambda = \mathrm{diag}(\sigma(f)(1 - \sigma(f)))`, :math:`B = \Lambda^{1/2}`.
    """

    def target_matrix(self, output: Tensor, target: Tensor) -> Tensor:
        target = _same_shape("BCEWithLogitsLoss", output, target)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError(
                "BCEWithLogitsLoss needs targets in [0, 1] (probabilities), got values in "
                f"[{target.min().item():g}, {target.max().item():g}]."
            )
        return target

    def gradient(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.sigmoid(output) - target

    def hessian(self, output: Tensor) -> Tensor:
        return torch.diag_embed(self._variance(output))

    def hessian_factor(self, output: Tensor) -> Tensor:
        return torch.diag_embed(self._variance(output).sqrt())

    def sample(self, output: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.sigmoid(output).expand(num_samples, *output.shape)
        return torch.bernoulli(p, generator=generator)

    def predictive_mean(self, output: Tensor) -> Tensor:
        return torch.sigmoid(output)

    def kl_divergence(self, output: Tensor, other: Tensor) -> Tensor:
        p = torch.sigmoid(output)
        log_ratio_1 = nn.functional.softplus(-other) - nn.functional.softplus(-output)
        log_ratio_0 = nn.functional.softplus(other) - nn.functional.softplus(output)
        return (p * log_ratio_1 + (1 - p) * log_ratio_0).sum(-1)

    @staticmethod
    def _variance(output: Tensor) -> Tensor:
        p = torch.sigmoid(output)
        return p * (1.0 - p)


def _same_shape(name: str, output: Tensor, target: Tensor) -> Tensor:
    check_tensor("the target y", target)
    if target.shape != output.shape or not target.is_floating_point():
        raise ValueError(
            f"{name} needs floating-point targets shaped like the output {tuple(output.shape)}, "
            f"got {target.dtype} of shape {tuple(target.shape)}."
        )
    check_finite(target, "the target y")
    return target.reshape(target.shape[0], -1)


def likelihood(loss_fn: nn.Module) -> Likelihood:
    """The likelihood behind ``loss_fn``.

    Raises:
        ValueError: for a loss, reduction or option (class weights, label smoothing,
            ``ignore_index``, ``pos_weight``) that is not supported.
    """
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss {loss_fn!r} is not supported; supported: {SUPPORTED}.")
    if type(loss_fn) is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError(
                f"CrossEntropyLoss with class weights or label smoothing is not supported; "
                f"supported: {SUPPORTED}."
            )
        if loss_fn.ignore_index != _NO_IGNORED_CLASS:
            raise ValueError(
                f"CrossEntropyLoss(ignore_index={loss_fn.ignore_index}) is not supported: the "
                "Fisher would keep the rows the loss drops. Remove those examples from the "
                "batch and use the default ignore_index."
            )
        return Categorical(reduction)
    if type(loss_fn) is nn.MSELoss:
        return Gaussian(reduction)
    if type(loss_fn) is nn.BCEWithLogitsLoss:
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError(
                f"BCEWithLogitsLoss with weight or pos_weight is not supported; "
                f"supported: {SUPPORTED}."
            )
        return Bernoulli(reduction)
    raise ValueError(f"loss {type(loss_fn).__name__} is not supported; supported: {SUPPORTED}.")
