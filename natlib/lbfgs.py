r"""The curvature that L-BFGS holds implicitly, as a linear operator.

From pairs :math:`s_i = \theta_{i+1} - \theta_i`, :math:`y_i = \nabla L_{i+1} - \nabla L_i`
(:math:`i = 0, \dots, m-1`, oldest first) and the initial scaling
:math:`H_0 = \gamma I`, :math:`\gamma = s_{m-1}^\top y_{m-1} / y_{m-1}^\top y_{m-1}` (as
``torch.optim.LBFGS``), L-BFGS applies the inverse-Hessian approximation :math:`H_m`, the
result of :math:`m` BFGS updates of :math:`H_0`, without forming it (Nocedal & Wright, 2006,
§7.2). :class:`LBFGSOperator` exposes the matrix :math:`B_m = H_m^{-1}`:

- ``solve(v, 0)`` :math:`= H_m v` by the two-loop recursion (Nocedal, 1980; Nocedal & Wright,
  Alg. 7.4), in ``torch.optim.LBFGS``'s order of operations, so that
  :math:`-H_m \nabla L` is its search direction;
- ``matvec(v)`` :math:`= B_m v` by the compact representation (Byrd, Nocedal & Schnabel, 1994,
  Thm. 2.3), with :math:`\sigma = 1/\gamma`, :math:`W = [\sigma S \;\; Y]`,
  :math:`S^\top Y = L + D + U` (strictly lower, diagonal, strictly upper):

  .. math:: B_m = \sigma I - W M^{-1} W^\top, \qquad
            M = \begin{pmatrix} \sigma S^\top S & L \\ L^\top & -D \end{pmatrix};

- ``solve(v, λ)`` for :math:`\lambda > 0`: :math:`(B_m + \lambda I)^{-1} v` from the same form by
  the Woodbury identity, :math:`c = \sigma + \lambda`:
  :math:`(cI - W M^{-1} W^\top)^{-1} = c^{-1} I + c^{-2} W (M - W^\top W / c)^{-1} W^\top`.

Training uses ``torch.optim.LBFGS`` itself; :meth:`LBFGSOperator.from_optimizer` reads its
history.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from natlib.checks import check_finite, check_non_negative, check_positive_int
from natlib.interface import Curvature, Flops
from natlib.layout import ParamLayout
from natlib.losses import FisherKind, likelihood


class LBFGSOperator(Curvature):
    r"""The L-BFGS Hessian approximation :math:`B_m` of a history of pairs (see the module).

    Args:
        layout: the parameter layout the vectors follow.
        steps, differences: :math:`s_i` and :math:`y_i`, flat, oldest first, each pair with
            :math:`s_i^\top y_i > 0`.

    Raises:
        ValueError: for no pairs, mismatched shapes, NaN/Inf, or a pair with
            :math:`s_i^\top y_i \le 0` (BFGS would lose positive definiteness).
    """

    def __init__(self, layout: ParamLayout, steps: list[Tensor], differences: list[Tensor]) -> None:
        if not steps or len(steps) != len(differences):
            raise ValueError(
                f"L-BFGS needs at least one (s, y) pair and as many s as y, got {len(steps)} "
                f"and {len(differences)}."
            )
        for i, (s, y) in enumerate(zip(steps, differences)):
            layout.check_vector(s, f"s[{i}]")
            layout.check_vector(y, f"y[{i}]")
            check_finite(s, f"s[{i}]")
            check_finite(y, f"y[{i}]")
            if y.dot(s) <= 0:
                raise ValueError(
                    f"pair {i} has s'y = {y.dot(s).item():.3g} <= 0; L-BFGS keeps only pairs "
                    "of positive curvature."
                )
        self.layout = layout
        self.steps, self.differences = list(steps), list(differences)
        self.rho = [1.0 / y.dot(s) for s, y in zip(self.steps, self.differences)]
        s, y = self.steps[-1], self.differences[-1]
        self.gamma = y.dot(s) / y.dot(y)  # H_0 = gamma I, torch's H_diag
        S, Y = torch.stack(self.steps, 1), torch.stack(self.differences, 1)
        sigma = 1.0 / self.gamma
        SY = S.T @ Y
        L = torch.tril(SY, -1)
        self._W = torch.cat([sigma * S, Y], dim=1)
        self._M = torch.cat(
            [torch.cat([sigma * S.T @ S, L], 1), torch.cat([L.T, -torch.diag(SY.diagonal())], 1)], 0
        )
        self._sigma = sigma

    @property
    def history(self) -> int:
        """:math:`m`, the number of pairs."""
        return len(self.steps)

    @property
    def dtype(self) -> torch.dtype:
        return self.steps[0].dtype

    @property
    def device(self) -> torch.device:
        return self.steps[0].device

    @classmethod
    def from_optimizer(cls, model: nn.Module, optimizer: torch.optim.LBFGS) -> LBFGSOperator:
        """The history a ``torch.optim.LBFGS`` over ``model.parameters()`` holds now."""
        state = optimizer.state[optimizer._params[0]]
        if not state.get("old_stps"):
            raise ValueError("the L-BFGS optimiser holds no (s, y) pairs yet; step it first.")
        return cls(ParamLayout.of(model), state["old_stps"], state["old_dirs"])

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "exact",
        iterations: int = 20,
        history_size: int = 10,
    ) -> LBFGSOperator:
        """The history of ``torch.optim.LBFGS`` (strong Wolfe line search) after
        ``iterations`` full-batch iterations from a copy of ``model`` (the model is unchanged);
        it describes the Hessian along that path, not at the current weights. L-BFGS
        approximates the Hessian, so ``kind`` must be ``"exact"``.

        Raises:
            ValueError: for another ``kind``, bad counts, or no pair of positive curvature.
        """
        if kind != "exact":
            raise ValueError(
                f"L-BFGS approximates the Hessian, it has no Fisher kind; got {kind!r}."
            )
        check_positive_int("iterations", iterations)
        check_positive_int("history_size", history_size)
        likelihood(loss_fn)  # a clear error for an unsupported loss
        if y is None:
            raise ValueError("L-BFGS minimises the loss, so it needs the labels y.")
        copied = copy.deepcopy(model)
        optimizer = torch.optim.LBFGS(
            copied.parameters(),
            max_iter=iterations,
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(copied(X), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls.from_optimizer(copied, optimizer)

    def inverse_matvec(self, v: Tensor) -> Tensor:
        r""":math:`H_m v`, the two-loop recursion in ``torch.optim.LBFGS``'s order."""
        self.layout.check_vector(v)
        q = v.clone()
        alpha = [None] * self.history
        for i in range(self.history - 1, -1, -1):
            alpha[i] = self.steps[i].dot(q) * self.rho[i]
            q.add_(self.differences[i], alpha=-alpha[i])
        r = torch.mul(q, self.gamma)
        for i in range(self.history):
            beta = self.differences[i].dot(r) * self.rho[i]
            r.add_(self.steps[i], alpha=alpha[i] - beta)
        return r

    def matvec(self, v: Tensor) -> Tensor:
        r""":math:`B_m v = \sigma v - W M^{-1} W^\top v` (compact form)."""
        self.layout.check_vector(v)
        return self._sigma * v - self._W @ torch.linalg.solve(self._M, self._W.T @ v)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r""":math:`H_m v` (two-loop) for ``damping`` 0, else :math:`(B_m + \lambda I)^{-1} v`
        (compact form and Woodbury)."""
        self.layout.check_vector(v)
        check_non_negative("damping", damping)
        if damping == 0:
            return self.inverse_matvec(v)
        c = self._sigma + damping
        W = self._W
        return v / c + W @ torch.linalg.solve(self._M - W.T @ W / c, W.T @ v) / c**2

    @property
    def memory_bytes(self) -> int:
        """The :math:`2m` vectors (the compact form's :math:`W` is a scaled copy of them)."""
        return (
            2 * self.history * self.layout.numel * torch.empty((), dtype=self.dtype).element_size()
        )

    @property
    def flops(self) -> Flops:
        """A new pair costs two dot products; the compact form's :math:`S^\\top S, S^\\top Y`
        (:math:`4m^2P`); a two-loop solve: :math:`4mP + P`."""
        m, p = self.history, self.layout.numel
        return Flops(update=4 * p, refresh=4 * m * m * p, solve=4 * m * p + p)


def inverse_dense(operator: LBFGSOperator) -> Tensor:
    r""":math:`H_m` as a dense ``(P, P)`` matrix, column by column from the two-loop recursion
    (small models only)."""
    eye = torch.eye(operator.layout.numel, dtype=operator.dtype, device=operator.device)
    return torch.stack([operator.inverse_matvec(e) for e in eye], dim=1)


def quadratic_iterations(
    A: Tensor,
    b: Tensor,
    x0: Tensor,
    T: Tensor,
    tolerance: float = 1e-8,
    max_iter: int = 1000,
    history_size: int = 10,
) -> int:
    r"""Iterations of ``torch.optim.LBFGS`` (strong Wolfe line search) on
    :math:`f(x) = \tfrac12 x^\top A x - b^\top x` run in the coordinates :math:`z` with
    :math:`x = Tz`, from :math:`z_0 = T^{-1} x_0`, until the optimality gap
    :math:`f(x) - f^*` falls to ``tolerance`` times its start (a criterion that does not
    depend on the coordinates), or ``max_iter``.

    L-BFGS is invariant when the iterates in :math:`z`, mapped through :math:`T`, are those in
    :math:`x`: for orthogonal :math:`T` and for :math:`T = cI` (its initial scaling
    :math:`\gamma = s^\top y / y^\top y` adapts), not for a general diagonal :math:`T`.

    Raises:
        ValueError: for shapes that do not match or a non-positive tolerance.
    """
    n = A.shape[0]
    if A.shape != (n, n) or b.shape != (n,) or x0.shape != (n,) or T.shape != (n, n):
        raise ValueError(
            f"A must be (n, n) and b, x0 (n,), T (n, n); got {tuple(A.shape)}, "
            f"{tuple(b.shape)}, {tuple(x0.shape)}, {tuple(T.shape)}."
        )
    check_positive_int("max_iter", max_iter)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}.")
    x_star = torch.linalg.solve(A, b)

    def f(x: Tensor) -> Tensor:
        return 0.5 * x @ A @ x - b @ x

    f_star = f(x_star)
    gap0 = (f(x0) - f_star).item()
    z = torch.linalg.solve(T, x0).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [z], lr=1, max_iter=max_iter, max_eval=100 * max_iter, history_size=history_size,
        line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0,
    )  # fmt: skip
    reached: list[int] = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = f(T @ z)
        loss.backward()
        if not reached and (loss - f_star).item() <= tolerance * gap0:
            reached.append(optimizer.state[z].get("n_iter", 0))
        return loss

    optimizer.step(closure)  # one call runs every iteration (max_iter=1 calls stall)
    return reached[0] if reached else max_iter
