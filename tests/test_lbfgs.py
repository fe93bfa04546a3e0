"""natlib.lbfgs: the L-BFGS operator against torch.optim.LBFGS and against a quadratic."""

import copy

import pytest
import torch
from cases import mlp_case, vector
from helpers import assert_close
from torch import nn

from natlib import lbfgs
from natlib.layout import ParamLayout
from natlib.lbfgs import LBFGSOperator

pytestmark = pytest.mark.usefixtures("float64")


def run_lbfgs(case, iterations: int, history_size: int, line_search: str | None):
    model = copy.deepcopy(case.model)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=0.5 if line_search is None else 1.0,
        max_iter=iterations,
        history_size=history_size,
        line_search_fn=line_search,
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure():
        optimizer.zero_grad()
        loss = case.loss_fn(model(case.X), case.y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("history_size", [3, 50])
def test_reproduces_torchs_direction(history_size: int, line_search: str | None) -> None:
    """torch's last direction d was computed from its stored history and prev_flat_grad."""
    model, optimizer = run_lbfgs(mlp_case("ce", n=8), 12, history_size, line_search)
    state = optimizer.state[optimizer._params[0]]
    H = LBFGSOperator.from_optimizer(model, optimizer)
    assert H.history == min(history_size, len(state["old_stps"]))
    assert torch.equal(H.gamma, state["H_diag"])
    assert torch.equal(H.solve(state["prev_flat_grad"], 0.0), -state["d"])


def conjugate_pairs(H: torch.Tensor, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """m H-conjugate steps s_i (Gram-Schmidt in the H inner product) and y_i = H s_i."""
    generator = torch.Generator().manual_seed(3)
    steps: list[torch.Tensor] = []
    for _ in range(m):
        s = torch.randn(len(H), generator=generator)
        for t in steps:
            s = s - (t @ H @ s) / (t @ H @ t) * t
        steps.append(s)
    return steps, [H @ s for s in steps]


def quadratic(p: int) -> tuple[ParamLayout, torch.Tensor]:
    layout = ParamLayout.of(nn.Linear(p - 1, 1))
    generator = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(p, p, generator=generator))[0]
    return layout, Q @ torch.diag(torch.logspace(-1, 2, p)) @ Q.T


def test_recovers_the_inverse_hessian_of_a_quadratic() -> None:
    """With n = P conjugate pairs on a quadratic, H_m = H^{-1} and B_m = H exactly."""
    layout, H = quadratic(6)
    op = LBFGSOperator(layout, *conjugate_pairs(H, 6))
    assert_close(op.to_dense(), H, rtol=1e-9)
    inverse = torch.stack([op.solve(e, 0.0) for e in torch.eye(6)], 1)
    assert_close(inverse, torch.linalg.inv(H), rtol=1e-9)


def test_recovers_the_inverse_hessian_on_the_span() -> None:
    """With m < P pairs: H_m y_i = s_i and B_m s_i = y_i for every pair (hereditary)."""
    layout, H = quadratic(8)
    steps, differences = conjugate_pairs(H, 3)
    op = LBFGSOperator(layout, steps, differences)
    for s, y in zip(steps, differences):
        assert_close(op.solve(y, 0.0), s, rtol=1e-10)
        assert_close(op.matvec(s), y, rtol=1e-10)


def test_compact_form_inverts_the_two_loop_recursion() -> None:
    model, optimizer = run_lbfgs(mlp_case("mse", n=8), 10, 5, "strong_wolfe")
    op = LBFGSOperator.from_optimizer(model, optimizer)
    v = vector(op.layout.numel)
    assert_close(op.matvec(op.solve(v, 0.0)), v, rtol=1e-9)
    assert_close(op.solve(op.matvec(v), 0.0), v, rtol=1e-9)
    dense = op.to_dense()
    assert_close(
        op.solve(v, 0.3), torch.linalg.solve(dense + 0.3 * torch.eye(len(v)), v), rtol=1e-9
    )


def test_from_batch_leaves_the_model_alone() -> None:
    case = mlp_case("ce", n=8)
    before = [p.detach().clone() for p in case.model.parameters()]
    op = LBFGSOperator.from_batch(case.model, case.loss_fn, case.X, case.y, iterations=5)
    assert 1 <= op.history <= 5
    assert all(torch.equal(a, b) for a, b in zip(before, case.model.parameters()))


def test_clear_errors() -> None:
    case = mlp_case()
    layout = ParamLayout.of(case.model)
    v = vector(layout.numel)
    with pytest.raises(ValueError, match="has no Fisher kind"):
        LBFGSOperator.from_batch(case.model, case.loss_fn, case.X, case.y, kind="mc")
    with pytest.raises(ValueError, match="needs the labels"):
        LBFGSOperator.from_batch(case.model, case.loss_fn, case.X)
    with pytest.raises(ValueError, match="history_size must be a positive integer"):
        LBFGSOperator.from_batch(case.model, case.loss_fn, case.X, case.y, history_size=0)
    with pytest.raises(ValueError, match="at least one"):
        LBFGSOperator(layout, [], [])
    with pytest.raises(ValueError, match="s'y = .* <= 0"):
        LBFGSOperator(layout, [v], [-v])
    with pytest.raises(ValueError, match=r"y\[0\] must be a tensor of shape"):
        LBFGSOperator(layout, [v], [v[:3]])
    optimizer = torch.optim.LBFGS(case.model.parameters())
    with pytest.raises(ValueError, match="holds no"):
        LBFGSOperator.from_optimizer(case.model, optimizer)


def test_inverse_dense_is_the_two_loop_recursion(float64):
    generator = torch.Generator().manual_seed(0)
    n = 6
    A = torch.randn(n, n, generator=generator)
    A = A @ A.T + n * torch.eye(n)
    steps = [torch.randn(n, generator=generator) for _ in range(3)]
    layout = ParamLayout.of(torch.nn.Linear(n, 1, bias=False))
    operator = LBFGSOperator(layout, steps, [A @ s for s in steps])
    H = lbfgs.inverse_dense(operator)
    v = torch.randn(n, generator=generator)
    torch.testing.assert_close(H @ v, operator.solve(v, 0.0))


def test_quadratic_iterations_are_invariant_to_rotation_and_scale_not_diagonal(float64):
    generator = torch.Generator().manual_seed(0)
    n = 12
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    A = Q @ torch.diag(torch.logspace(0, 3, n)) @ Q.T
    b, x0 = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    R, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    D = torch.diag(torch.empty(n).uniform_(-3, 3, generator=generator).exp())
    counts = [
        lbfgs.quadratic_iterations(A, b, x0, T, 1e-6, max_iter=400)
        for T in (torch.eye(n), 100 * torch.eye(n), R, D)
    ]
    # equal up to round-off amplified over the iterations and torch's first step
    assert max(abs(c - counts[0]) for c in counts[1:3]) <= 0.15 * counts[0]
    assert counts[3] > 2 * counts[0]
    with pytest.raises(ValueError, match="must be"):
        lbfgs.quadratic_iterations(A, b[:-1], x0, R)
