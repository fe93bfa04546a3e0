r"""Exact curvature of a loss: dense Hessian, GGN and Fisher matrices, and their products.

All matrices and vectors are indexed like ``parameters_to_vector(model.parameters())`` and
belong to the loss exactly as ``loss_fn`` defines it, ``reduction`` included. With
:math:`L(\theta) = r \sum_n \ell(f(x_n; \theta), y_n)` and :math:`J_n = \partial f_n / \partial
\theta`:

- Hessian :math:`H = \nabla^2_\theta L`,
- generalised Gauss-Newton :math:`G = \sum_n J_n^\top (\nabla_f^2 L) J_n` (Schraudolph 2002;
  Martens 2020, §8), with the output-space Hessian from autograd,
- Fisher :math:`F = r \sum_n J_n^\top \mathbb{E}_{y \sim p(\cdot|f_n)}[g g^\top] J_n`,
  :math:`g = \nabla_f \ell(f_n, y)`, which for these losses equals :math:`G`
  (``kind="exact"``, from the closed form in :mod:`natlib.losses`); the Monte-Carlo Fisher
  (``"mc"``) replaces the expectation by samples, the empirical Fisher (``"empirical"``) by
  the data label (Kunstner et al., 2019).

The GGN and the Fisher are Gram matrices :math:`M^\top M` of rows :math:`b^\top J_n`, computed
per example with ``torch.func.vmap`` over ``vjp``; the matrix-free products use ``vjp`` only
and never form a matrix.

Every function checks its batch before any computation and raises ``TypeError`` when
``model`` is not a module, ``X`` or ``y`` is not a tensor or the model does not return one
tensor, and ``ValueError`` for an unsupported loss, a frozen or shared parameter, a
BatchNorm or Dropout layer in training mode, an empty batch, a dtype or device mismatch
between model and data, targets that do not fit the loss, or NaN or Inf in the model
output, the targets or the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.utils import parameters_to_vector

from natlib.checks import (
    check_batch,
    check_finite,
    check_positive,
    check_positive_int,
    check_tensor,
)
from natlib.layout import ParamLayout
from natlib.linalg import CG_TOLERANCE, conjugate_gradient, gram
from natlib.losses import FisherKind, Likelihood, likelihood

Forward = Callable[[Tensor, Tensor], Tensor]
Product = Callable[[Tensor], Tensor]

_ROW_BUDGET = 2**26  # entries of the row matrix M formed at once (512 MiB in float64)
_HESSIAN_CHUNK = 256  # Hessian columns computed per vectorised batch


def flat_forward(model: nn.Module) -> tuple[Forward, Tensor]:
    """The model as a function of its flat parameter vector.

    Returns:
        ``forward(theta, X)``, which calls ``model`` on ``X`` with parameters ``theta``
        (through ``torch.func.functional_call``), and the current ``theta`` (detached).

    Raises:
        ValueError: if the model has no parameters or one of them does not require grad.
    """
    layout = ParamLayout.of(model)
    names, shapes, sizes = layout.names, layout.shapes, layout.sizes
    buffers = dict(model.named_buffers())

    def forward(theta: Tensor, X: Tensor) -> Tensor:
        chunks = theta.split(sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return functional_call(model, (params, buffers), (X,))

    return forward, parameters_to_vector(model.parameters()).detach()


@dataclass(frozen=True)
class _Batch:
    """A model, loss and batch, checked once and shared by every function below."""

    forward: Forward
    theta: Tensor
    X: Tensor
    y: Tensor | None
    loss_fn: nn.Module
    likelihood: Likelihood
    output: Tensor  # (N, C), detached
    raw_shape: torch.Size  # the model's own output shape
    target: Tensor | None  # shaped to match ``output``

    def outputs(self, theta: Tensor, X: Tensor) -> Tensor:
        return self.likelihood.output_matrix(self.forward(theta, X))

    def loss(self, theta: Tensor) -> Tensor:
        return self.loss_fn(self.forward(theta, self.X), self.y)


def _batch(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor | None) -> _Batch:
    """The checked batch; every public function below raises what it raises.

    Raises:
        TypeError: if ``model`` is not a module, ``X`` or ``y`` not a tensor, or the model
            does not return one tensor.
        ValueError: for an unsupported loss, a model with a frozen or shared parameter or a
            BatchNorm or Dropout layer in training mode, an empty batch, a dtype or device
            mismatch between the model and the data, a target that does not fit the loss,
            or NaN or Inf in the model output or the targets.
    """
    lik = likelihood(loss_fn)
    forward, theta = flat_forward(model)
    check_batch(model, X, y)
    if y is not None and y.shape[:1] != X.shape[:1]:
        raise ValueError(
            f"X and y hold different numbers of examples: {X.shape[0]} and "
            f"{y.shape[0] if y.ndim else 'a scalar'}."
        )
    with torch.no_grad():
        raw = forward(theta, X)
    check_tensor("the model output", raw)
    if raw.ndim == 0 or raw.shape[0] != X.shape[0]:
        raise ValueError(
            f"the model maps {X.shape[0]} examples to an output of shape {tuple(raw.shape)}; "
            "it must keep the batch dimension first."
        )
    output, target = lik.prepare(raw, y)
    return _Batch(forward, theta, X, y, loss_fn, lik, output, raw.shape, target)


def _output_factor(
    batch: _Batch, kind: FisherKind, mc_samples: int, generator: torch.Generator | None
) -> Tensor:
    r"""Cotangents :math:`b_{nk}` (``(N, K, C)``) with :math:`F = \sum_{nk} J_n^\top b_{nk}
    b_{nk}^\top J_n`, the reduction factor included (see
    :meth:`natlib.losses.Likelihood.fisher_cotangents`)."""
    cotangents = batch.likelihood.fisher_cotangents(
        batch.output, kind, batch.target, mc_samples, generator
    )
    return cotangents.transpose(0, 1)


def _ggn_output_factor(batch: _Batch) -> Tensor:
    r"""As :func:`_output_factor` for the GGN: :math:`\nabla_f^2 L` by autograd and factored by
    an eigendecomposition. The loss is a sum over examples, so one Hessian-vector product per
    output coordinate :math:`c` (:math:`e_c` in every example) gives every example's block."""
    if batch.y is None:
        raise ValueError("the GGN needs the labels y to evaluate the loss.")
    f = batch.output

    def loss_of_output(g: Tensor) -> Tensor:
        return batch.loss_fn(g.reshape(batch.raw_shape), batch.y)

    _, pullback = vjp(grad(loss_of_output), f)
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    # blocks[n, i, j] = d2 L / df_ni df_nj
    blocks = vmap(lambda e: pullback(e.expand_as(f))[0])(eye).permute(1, 2, 0)
    eigenvalues, eigenvectors = torch.linalg.eigh(blocks)
    return (eigenvectors * eigenvalues.clamp(min=0.0).sqrt().unsqueeze(1)).transpose(1, 2)


def _rows(batch: _Batch, X: Tensor, cotangents: Tensor) -> Tensor:
    r"""The matrix :math:`M` with rows :math:`b_{nk}^\top J_n`, shape ``(N K, P)``."""

    def per_example(x: Tensor, b: Tensor) -> Tensor:
        _, pullback = vjp(lambda theta: batch.outputs(theta, x.unsqueeze(0))[0], batch.theta)
        return vmap(pullback)(b)[0]

    return vmap(per_example)(X, cotangents).flatten(0, 1)


def _reduce_rows(batch: _Batch, cotangents: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    r""":math:`\sum_\text{chunks} \mathrm{reduce}(M_\text{chunk})` over chunks of examples of the
    row matrix :math:`M` (at most ``_ROW_BUDGET`` entries at once)."""
    n, k, _ = cotangents.shape
    p = batch.theta.numel()
    chunk = max(1, _ROW_BUDGET // (k * p))
    out = None
    for lo in range(0, n, chunk):
        g = reduce(_rows(batch, batch.X[lo : lo + chunk], cotangents[lo : lo + chunk]))
        out = g if out is None else out.add_(g)
    check_finite(out, "the curvature matrix")
    return out


def _gram_of_rows(batch: _Batch, cotangents: Tensor) -> Tensor:
    r""":math:`\sum_{nk} J_n^\top b_{nk} b_{nk}^\top J_n`, in chunks of examples."""
    return _reduce_rows(batch, cotangents, gram)


def fisher_cotangents(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor | None = None,
    kind: FisherKind = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The output cotangents :math:`b_{nk}`, ``(N, K, C)``, of the Fisher of :func:`fisher`
    (same arguments): :math:`F = \sum_{nk} J_n^\top b_{nk} b_{nk}^\top J_n`."""
    return _output_factor(_batch(model, loss_fn, X, y), kind, mc_samples, generator)


def gram_of_cotangents(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, cotangents: Tensor
) -> Tensor:
    r""":math:`\sum_{nk} J_n^\top b_{nk} b_{nk}^\top J_n`, ``(P, P)``, for output cotangents
    ``(N, K, C)`` (from :func:`fisher_cotangents`, or a training loop's output gradient)."""
    return _gram_of_rows(_batch(model, loss_fn, X, None), cotangents)


def reduce_cotangent_rows(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    cotangents: Tensor,
    reduce: Callable[[Tensor], Tensor],
) -> Tensor:
    r""":math:`\sum_\text{chunks} \mathrm{reduce}(M_\text{chunk})` for the per-cotangent
    gradients :math:`M` (rows :math:`b_{nk}^\top J_n`, ``(N K, P)``) of output cotangents
    ``(N, K, C)``, formed a chunk of examples at a time; ``reduce`` must add over rows, e.g.
    the column sums of squares give :math:`\mathrm{diag}\,F` without the ``(P, P)`` matrix."""
    return _reduce_rows(_batch(model, loss_fn, X, None), cotangents, reduce)


def cotangent_product(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, cotangents: Tensor
) -> Product:
    r"""The map :math:`v \mapsto \sum_{nk} J_n^\top b_{nk} (b_{nk}^\top J_n v)` for output
    cotangents ``(N, K, C)``, matrix-free."""
    batch = _batch(model, loss_fn, X, None)
    b = cotangents

    def output_product(u: Tensor) -> Tensor:
        return torch.einsum("nkc,nk->nc", b, torch.einsum("nkc,nc->nk", b, u))

    return _checked(_outer_product(batch, output_product), batch.theta.numel(), "Fisher")


def flat_gradient(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The gradient :math:`\nabla_\theta L`, flat in parameter order."""
    batch = _batch(model, loss_fn, X, y)
    g = grad(batch.loss)(batch.theta)
    check_finite(g, "the gradient")
    return g


def hessian(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The Hessian :math:`H = \nabla^2_\theta L`, ``(P, P)``, by Hessian-vector products with
    the columns of the identity, vectorised in chunks."""
    batch = _batch(model, loss_fn, X, y)
    product = _hessian_product(batch)
    eye = torch.eye(batch.theta.numel(), dtype=batch.theta.dtype, device=batch.theta.device)
    out = vmap(product, chunk_size=_HESSIAN_CHUNK)(eye)
    check_finite(out, "the Hessian")
    return out


def ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The generalised Gauss-Newton matrix :math:`G = \sum_n J_n^\top (\nabla_f^2 L) J_n`.

    The output-space Hessian comes from autograd, independently of :mod:`natlib.losses`; for
    the supported losses :math:`G` equals the exact Fisher (Martens, 2020, §9.2).
    """
    batch = _batch(model, loss_fn, X, y)
    return _gram_of_rows(batch, _ggn_output_factor(batch))


def fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor | None = None,
    kind: FisherKind = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The Fisher information of the model's predictive distribution, ``(P, P)``.

    :math:`F = r \sum_n J_n^\top \Lambda_n J_n` with :math:`\Lambda_n` the expected outer
    product of the output score (Amari, 1998), :math:`r` the loss's reduction factor.

    Args:
        kind: ``"exact"``: the closed-form :math:`\Lambda_n = B_n B_n^\top`;
            ``"mc"``: :math:`\Lambda_n \approx \frac1S \sum_s g_{ns} g_{ns}^\top` with
            :math:`g_{ns} = \nabla_f \ell(f_n, \tilde y_{ns})`, :math:`\tilde y_{ns}` drawn from
            the model; ``"empirical"``: :math:`g_n g_n^\top` at the data label :math:`y_n`
            (Kunstner, Balles & Hennig, 2019).
        mc_samples: :math:`S`, for ``kind="mc"``.
        generator: the random generator for ``kind="mc"``.
    """
    batch = _batch(model, loss_fn, X, y)
    return _gram_of_rows(batch, _output_factor(batch, kind, mc_samples, generator))


def _hessian_product(batch: _Batch) -> Product:
    r"""Reverse-over-reverse: :math:`Hv` is the ``vjp`` of the gradient map with :math:`v`
    (:math:`H` is symmetric). Forward-over-reverse would be cheaper, but ``MSELoss``'s
    forward-mode derivative of its backward fails in torch 2.13 ("ZeroTensors are immutable")."""
    _, pullback = vjp(grad(batch.loss), batch.theta)
    return lambda v: pullback(v)[0]


def _outer_product(batch: _Batch, output_product: Product) -> Product:
    r""":math:`v \mapsto J^\top A J v` for an output-space map :math:`A`.

    :math:`u \mapsto J^\top u` is the ``vjp`` of the model; :math:`Jv` is the ``vjp`` of that
    linear map (the double-vjp trick). Both pullbacks are built once, so a product costs two
    backward passes and no forward pass; forward-mode ``jvp`` would recompute the forward pass
    and, in torch 2.13, warns on first use.
    """
    X = batch.X
    f, pullback = vjp(lambda theta: batch.outputs(theta, X), batch.theta)
    _, push_forward = vjp(lambda u: pullback(u)[0], torch.zeros_like(f))

    def product(v: Tensor) -> Tensor:
        return pullback(output_product(push_forward(v)[0]))[0]

    return product


def hessian_product(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Product:
    r"""The map :math:`v \mapsto Hv` (one ``vjp`` of the gradient map)."""
    batch = _batch(model, loss_fn, X, y)
    return _checked(_hessian_product(batch), batch.theta.numel(), "Hessian")


def ggn_product(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Product:
    r"""The map :math:`v \mapsto Gv = J^\top (\nabla_f^2 L)(Jv)`: a Jacobian-vector product,
    an output-space Hessian-vector product and a ``vjp`` (Schraudolph, 2002)."""
    batch = _batch(model, loss_fn, X, y)
    if y is None:
        raise ValueError("the GGN needs the labels y to evaluate the loss.")
    gradient = grad(lambda g: batch.loss_fn(g.reshape(batch.raw_shape), batch.y))
    _, pullback = vjp(gradient, batch.output)

    def output_product(u: Tensor) -> Tensor:
        return pullback(u)[0]

    return _checked(_outer_product(batch, output_product), batch.theta.numel(), "GGN")


def fisher_product(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor | None = None,
    kind: FisherKind = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Product:
    r"""The map :math:`v \mapsto Fv = \sum_{nk} J_n^\top b_{nk} (b_{nk}^\top J_n v)` for the
    Fisher of :func:`fisher` (same arguments). Monte-Carlo targets are drawn once, so the map
    is one fixed linear operator."""
    b = fisher_cotangents(model, loss_fn, X, y, kind, mc_samples, generator)
    return cotangent_product(model, loss_fn, X, b)


def _checked(product: Product, size: int, what: str) -> Product:
    def checked(v: Tensor) -> Tensor:
        if v.shape != (size,):
            raise ValueError(f"v must have shape ({size},), got {tuple(v.shape)}.")
        out = product(v)
        check_finite(out, f"the {what}-vector product")
        return out

    return checked


def natural_gradient(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    damping: float,
    kind: FisherKind = "exact",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> Tensor:
    r"""The damped natural-gradient direction :math:`(F + \lambda I)^{-1} \nabla_\theta L`,
    matrix-free by conjugate gradients on :func:`fisher_product` (Martens, 2010).

    The update is :math:`\theta \leftarrow \theta - \eta d` for the returned :math:`d`.
    ``tol`` is the relative residual (default by dtype: 1e-10 in float64, 1e-5 in float32);
    ``max_iter`` defaults to the parameter count.

    Raises:
        ValueError: if ``damping`` or ``tol`` is not a positive finite number, ``max_iter``
            not a positive integer, or the batch is bad (see :func:`fisher`).
        RuntimeError: if conjugate gradients do not reach ``tol`` within ``max_iter``.
    """
    check_positive("damping", damping)
    if tol is not None:
        check_positive("tol", tol)
    if max_iter is not None:
        check_positive_int("max_iter", max_iter)
    product = fisher_product(model, loss_fn, X, y, kind, mc_samples, generator)
    g = flat_gradient(model, loss_fn, X, y)
    tol = CG_TOLERANCE.get(g.dtype, 1e-10) if tol is None else tol
    result = conjugate_gradient(lambda v: product(v) + damping * v, g, tol, max_iter)
    if not result.converged:
        raise RuntimeError(
            f"conjugate gradients reached relative residual {result.residual:.2e} > tol={tol} "
            f"after {result.iterations} iterations; raise max_iter or damping."
        )
    return result.x
