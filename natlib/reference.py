r"""Slow, obvious references: curvature and gradients from one autograd call per example.

Each function loops over the examples (and, for Jacobians, over the output entries) in
Python, the way one would write it on a blackboard, so that tests and benchmarks can check
:mod:`natlib.curvature`'s vectorised code against it. They are :math:`O(N C)` backward passes:
use them on tiny models, in float64 (they compute in the model's dtype).

With :math:`L = r \sum_n \ell(f_n, y_n)`, :math:`J_n = \partial f_n / \partial \theta` and
:math:`g_n = \nabla_\theta \ell(f_n, y_n)` (example :math:`n`'s loss summed over its output
entries):

- :func:`naive_gradient`: :math:`\nabla_\theta L = r \sum_n g_n`;
- :func:`naive_ggn`: :math:`\sum_n J_n^\top (\partial^2 L / \partial f_n^2) J_n`, with the
  output-space Hessian of the loss itself from autograd (independent of :mod:`natlib.losses`);
- :func:`naive_fisher`: :math:`r \sum_n J_n^\top \Lambda_n J_n`, :math:`\Lambda_n` the
  closed-form output Hessian of :mod:`natlib.losses` (for these losses the Fisher equals the
  GGN);
- :func:`naive_empirical_fisher`: :math:`r \sum_n g_n g_n^\top` (Kunstner et al., 2019);
- :func:`naive_hessian`: :math:`\nabla^2_\theta L`, row by row by double backward;
- :func:`vmap_einsum_fisher`: the Fisher again, vectorised the straightforward way (all
  Jacobians at once), the benchmark's middle baseline.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from natlib.losses import likelihood


def flat(tensors: tuple[Tensor, ...]) -> Tensor:
    """Per-parameter tensors joined into one vector in parameter order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def naive_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """The Jacobian :math:`J_n` of one example's flattened output, ``(C, P)`` in parameter
    order, one ``torch.autograd.grad`` call per output entry."""
    params = list(model.parameters())
    out = model(x.unsqueeze(0))[0].reshape(-1)
    return torch.stack([flat(torch.autograd.grad(o, params, retain_graph=True)) for o in out])


def per_example_gradients(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r""":math:`g_n = \nabla_\theta \ell(f_n, y_n)`, ``(N, P)``: the gradient of example
    :math:`n`'s loss summed over its output entries (``loss_fn`` with ``reduction="sum"`` on
    that example alone)."""
    likelihood(loss_fn)  # a clear error for an unsupported loss
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    params = list(model.parameters())
    return torch.stack(
        [
            flat(torch.autograd.grad(summed(model(X[n : n + 1]), y[n : n + 1]), params))
            for n in range(len(X))
        ]
    )


def _reduction_factor(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> float:
    with torch.no_grad():
        f = model(X)
    return likelihood(loss_fn).scale(f.reshape(f.shape[0], -1))


def naive_gradient(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r""":math:`\nabla_\theta L = r \sum_n g_n`, flat in parameter order."""
    return _reduction_factor(model, loss_fn, X) * per_example_gradients(model, loss_fn, X, y).sum(0)


def naive_empirical_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The empirical Fisher :math:`r \sum_n g_n g_n^\top`, ``(P, P)``."""
    g = per_example_gradients(model, loss_fn, X, y)
    return _reduction_factor(model, loss_fn, X) * g.T @ g


def naive_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The GGN :math:`\sum_n J_n^\top H_n J_n`, ``(P, P)``, where :math:`H_n = \partial^2 L /
    \partial f_n^2` is the Hessian of the whole loss with respect to example :math:`n`'s
    output, by ``torch.autograd.functional.hessian`` (reduction included)."""
    likelihood(loss_fn)  # a clear error for an unsupported loss
    with torch.no_grad():
        f = model(X)
    size = sum(p.numel() for p in model.parameters())
    G = f.new_zeros(size, size)
    for n in range(len(X)):

        def loss_of_row(row: Tensor, n: int = n) -> Tensor:
            return loss_fn(torch.cat([f[:n], row.unsqueeze(0), f[n + 1 :]]), y)

        H = torch.autograd.functional.hessian(loss_of_row, f[n])
        H = H.reshape(f[n].numel(), f[n].numel())
        J = naive_jacobian(model, X[n])
        G += J.T @ H @ J
    return G


def naive_hessian(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    r"""The Hessian :math:`\nabla^2_\theta L`, ``(P, P)``: one double-backward call per
    row."""
    params = list(model.parameters())
    g = flat(torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True))
    return torch.stack([flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g])


def naive_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> Tensor:
    r"""The exact Fisher :math:`r \sum_n J_n^\top \Lambda_n J_n`, ``(P, P)``, with
    :math:`\Lambda_n` from :meth:`natlib.losses.Likelihood.hessian` and one autograd call per
    example and output entry."""
    lik = likelihood(loss_fn)
    with torch.no_grad():
        f = model(X)
    f = f.reshape(f.shape[0], -1)
    size = sum(p.numel() for p in model.parameters())
    F = f.new_zeros(size, size)
    for n in range(len(X)):
        J = naive_jacobian(model, X[n])
        F += J.T @ lik.hessian(f[n : n + 1])[0] @ J
    return lik.scale(f) * F


def vmap_einsum_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> Tensor:
    r"""The straightforward vectorised baseline: all Jacobians by ``vmap(jacrev)``, then
    :math:`r \sum_n J_n^\top \Lambda_n J_n` by one ``einsum`` (memory :math:`O(NCP)`)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    lik = likelihood(loss_fn)

    def output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),))[0]

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, X)
    J = torch.cat([j.flatten(2) for j in jacobians.values()], dim=2)  # (N, C, P)
    f = model(X).detach()
    hessians = lik.scale(f) * lik.hessian(f)
    return torch.einsum("nip,nij,njq->pq", J, hessians, J)
