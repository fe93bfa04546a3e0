"""natlib.adam: Adam's preconditioner against torch.optim.Adam, bit for bit, step for step."""

import copy

import pytest
import torch
from cases import LOSSES, mlp_case
from helpers import assert_close

from natlib import adam, curvature, problems
from natlib.adam import AdamPreconditioner
from natlib.approximations import DiagonalFisher
from natlib.layout import ParamLayout
from natlib.optim import PreconditionedOptimizer

pytestmark = pytest.mark.usefixtures("float64")


def gradients(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta1, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01)])
def test_matches_torch_adam_bit_for_bit(beta1: float, weight_decay: float, dtype) -> None:
    """Adam = first moment / (C + eps I) with C the preconditioner: the second moment, the
    denominators and the parameters after each of five steps equal torch's exactly."""
    case = mlp_case("ce", n=8)
    reference = case.model.to(dtype)
    mine = copy.deepcopy(reference)
    X = case.X.to(dtype)
    lr, beta2, eps = 1e-2, 0.99, 1e-8
    adam = torch.optim.Adam(
        reference.parameters(), lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )
    layout = ParamLayout.of(mine)
    preconditioner, first = None, [torch.zeros_like(p) for p in mine.parameters()]
    for step in range(1, 6):
        batch = slice(step - 1, step + 3)
        adam.zero_grad()
        case.loss_fn(reference(X[batch]), case.y[batch]).backward()
        adam.step()

        mine.zero_grad()
        case.loss_fn(mine(X[batch]), case.y[batch]).backward()
        with torch.no_grad():
            g = gradients(mine)
            if weight_decay:
                g = [gi.add(p, alpha=weight_decay) for gi, p in zip(g, mine.parameters())]
            batch_estimate = AdamPreconditioner.of_gradient(layout, g, beta2)
            if preconditioner is None:
                preconditioner = batch_estimate
            else:
                preconditioner.update(batch_estimate, beta2)
            for m, gi in zip(first, g):
                m.lerp_(gi, 1 - beta1)
            step_size = lr / (1 - beta1**step)
            for p, m, denom in zip(mine.parameters(), first, preconditioner.denominators(eps)):
                p.addcdiv_(m, denom, value=-step_size)
        for p, q in zip(reference.parameters(), preconditioner.second_moment):
            assert torch.equal(adam.state[p]["exp_avg_sq"], q)
        for p, q in zip(reference.parameters(), mine.parameters()):
            assert torch.equal(p, q)


def test_solve_is_adams_step_without_momentum() -> None:
    """With beta1 = 0, Adam's step is lr (C + eps I)^{-1} g, to rounding."""
    case = mlp_case("mse", n=6)
    model = copy.deepcopy(case.model)
    adam = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.0, 0.9), eps=1e-3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    adam.zero_grad()
    case.loss_fn(model(case.X), case.y).backward()
    adam.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    C = AdamPreconditioner.from_batch(case.model, case.loss_fn, case.X, case.y, beta2=0.9)
    g = curvature.flat_gradient(case.model, case.loss_fn, case.X, case.y)
    assert_close(before - after, 0.1 * C.solve(g, 1e-3), rtol=1e-14)
    assert_close(torch.diagonal(C.to_dense()), g.abs(), rtol=1e-14)  # the first step: |g|


def test_without_bias_correction() -> None:
    case = mlp_case("bce", n=6)
    g = curvature.flat_gradient(case.model, case.loss_fn, case.X, case.y)
    C = AdamPreconditioner.from_batch(
        case.model, case.loss_fn, case.X, case.y, beta2=0.9, bias_correction=False
    )
    assert_close(torch.diagonal(C.to_dense()), (0.1 * g * g).sqrt(), rtol=1e-15)
    C.update(
        AdamPreconditioner.from_batch(
            case.model, case.loss_fn, case.X, case.y, beta2=0.9, bias_correction=False
        ),
        0.9,
    )
    assert_close(C.solve(g, 1e-3), g / ((0.19 * g * g).sqrt() + 1e-3), rtol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_example_is_the_root_of_the_empirical_diagonal(loss: str) -> None:
    """On one example, the mini-batch gradient is the per-example one: C^2 = r diag(F_emp)."""
    case = mlp_case(loss, n=1)
    args = (case.model, case.loss_fn, case.X, case.y)
    C = AdamPreconditioner.from_batch(*args)
    D = DiagonalFisher.from_batch(*args, kind="empirical")
    r = curvature.flat_gradient(*args).square().sum() / D.diagonal.sum()  # the reduction factor
    assert_close(torch.diagonal(C.to_dense()).square(), r * D.diagonal, rtol=1e-12)


def test_monte_carlo_labels_are_drawn_from_the_model() -> None:
    case = mlp_case("ce", n=6)
    draw = lambda seed: AdamPreconditioner.from_batch(  # noqa: E731
        case.model, case.loss_fn, case.X, kind="mc", generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(0).to_dense(), draw(0).to_dense())
    assert not torch.equal(draw(0).to_dense(), draw(1).to_dense())


def test_trains_as_a_preconditioned_optimizer() -> None:
    case = mlp_case("ce", n=8)
    model = copy.deepcopy(case.model)
    opt = PreconditionedOptimizer(
        model,
        case.loss_fn,
        AdamPreconditioner,
        lr=0.05,
        damping=1e-8,
        ema_decay=0.9,
        kind="empirical",
        beta2=0.9,
    )
    adam_model = copy.deepcopy(case.model)
    adam = torch.optim.Adam(adam_model.parameters(), lr=0.05, betas=(0.0, 0.9), eps=1e-8)
    for optimizer, net in ((opt, model), (adam, adam_model)):
        for _ in range(3):
            optimizer.zero_grad()
            case.loss_fn(net(case.X), case.y).backward()
            optimizer.step()
    for p, q in zip(model.parameters(), adam_model.parameters()):
        assert_close(p, q, rtol=1e-14)


def test_clear_errors() -> None:
    case = mlp_case()
    args = (case.model, case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match="kind 'exact' is not supported; use 'empirical'"):
        AdamPreconditioner.from_batch(*args, kind="exact")
    with pytest.raises(ValueError, match="beta2 must lie in"):
        AdamPreconditioner.from_batch(*args, beta2=1.0)
    C = AdamPreconditioner.from_batch(*args, beta2=0.9)
    with pytest.raises(ValueError, match="decays with beta2=0.9; update got decay=0.5"):
        C.update(AdamPreconditioner.from_batch(*args, beta2=0.9), 0.5)
    with pytest.raises(ValueError, match="damping must be a positive"):
        C.denominators(0.0)
    with pytest.raises(ValueError, match="kind must be 'empirical'"):
        PreconditionedOptimizer(case.model, case.loss_fn, AdamPreconditioner, 0.1, 1e-8, kind="mc")


def test_minibatch_second_moment_at_the_extremes(float64):
    """Batches of one give the diagonal empirical Fisher; one batch of all, the squared
    gradient."""
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 5, 10], seed=0)
    X, y = data.X_train[:24], data.y_train[:24]
    ones = adam.minibatch_second_moment(model, data.loss_fn, X, y, 1)
    empirical = DiagonalFisher.from_batch(model, data.loss_fn, X, y, kind="empirical")
    torch.testing.assert_close(ones, empirical.diagonal, rtol=1e-10, atol=1e-14)
    g = curvature.flat_gradient(model, data.loss_fn, X, y)
    whole = adam.minibatch_second_moment(model, data.loss_fn, X, y, 24, epochs=2)
    torch.testing.assert_close(whole, g * g, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="exceeds"):
        adam.minibatch_second_moment(model, data.loss_fn, X, y, 25)


def test_sampled_minibatch_squares_average_to_the_fisher_over_b(float64):
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 3, 10], seed=0)
    X, y = data.X_train[:16], data.y_train[:16]
    generator = torch.Generator().manual_seed(0)
    sampled = adam.minibatch_second_moment(
        model, data.loss_fn, X, y, 4, kind="mc", epochs=400, generator=generator
    )
    fisher = DiagonalFisher.from_batch(model, data.loss_fn, X, y).diagonal
    expected = fisher / 4
    assert ((sampled - expected).norm() / expected.norm()).item() < 0.1


def test_adam_differences_change_one_thing_at_a_time(float64):
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 3, 10], seed=0)
    X, y = data.X_train[:16], data.y_train[:16]
    variants = adam.adam_differences(model, data.loss_fn, X, y, 4)
    assert tuple(variants) == adam.DIFFERENCES
    fisher, power = variants["diagonal Fisher"]
    assert power == 1.0 and torch.equal(variants["power -1/2"][0], fisher)
    assert variants["power -1/2"][1] == variants["Adam"][1] == 0.5
    g = curvature.flat_gradient(model, data.loss_fn, X, y)
    d = adam.diagonal_direction(g, fisher, 1.0, 1e-3, fisher.mean().item())
    torch.testing.assert_close(d, g / (fisher + 1e-3))
    scaled = adam.diagonal_direction(g, 7 * fisher, 1.0, 1e-3, fisher.mean().item())
    torch.testing.assert_close(scaled, d)
    with pytest.raises(ValueError, match="damping"):
        adam.diagonal_direction(g, fisher, 1.0, 0.0, 1.0)
