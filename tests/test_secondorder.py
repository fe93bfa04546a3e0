"""Chapter 6's measurements: the three matrices, the saddle, undamped steps, L-BFGS against
H and F, the invariance classes, and equal-budget tuning."""

import math

import pytest
import torch
from torch import nn

from natlib import curvature, optim, problems, secondorder
from natlib.reparam import DiagonalScaling, Sinh, compare_runs

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def digits():
    data = problems.digits(dtype=torch.float64)
    return (
        problems.mlp([64, 3, 10], seed=0).double(),
        data.loss_fn,
        data.X_train[:40],
        data.y_train[:40],
    )


def test_spectra_split_the_hessian_into_ggn_and_residual(digits):
    model, loss_fn, X, y = digits
    s = secondorder.spectra(model, loss_fn, X, y)
    H = curvature.hessian(model, loss_fn, X, y)
    torch.testing.assert_close(s.hessian, torch.linalg.eigvalsh(H))
    assert s.fisher_ggn < 1e-12  # cross-entropy: F = GGN
    assert (s.ggn > -1e-12).all() and 0 < s.residual < 1
    assert s.negative == int((s.hessian < -1e-10).sum()) and 0 <= s.negative_mass < 0.5


def test_the_saddle_model_has_the_closed_form_loss_and_hessian():
    model, loss_fn, X, y = secondorder.saddle_model(0.5, -0.3)
    assert loss_fn(model(X), y).item() == pytest.approx((0.5 * -0.3 - 1) ** 2)
    secondorder.saddle_model(0.0, 0.0)
    model0, *_ = secondorder.saddle_model(0.0, 0.0)
    H = curvature.hessian(model0, loss_fn, X, y)
    torch.testing.assert_close(H, torch.tensor([[0.0, -2.0], [-2.0, 0.0]]))


def test_newton_heads_for_the_saddle_where_saddle_free_newton_descends():
    model, loss_fn, X, y = secondorder.saddle_model(0.2, -0.1)
    newton = secondorder.path(
        model, loss_fn, X, y, lambda m, f: optim.Newton(m, f, damping=1e-8), 5
    )
    free = secondorder.path(
        model, loss_fn, X, y, lambda m, f: optim.SaddleFreeNewton(m, f, damping=1e-3), 30
    )
    assert newton[-1].norm() < 1e-3  # converged to the saddle
    a, b = free[-1]
    assert abs(a * b - 1) < 1e-3  # on the valley of minima


def test_undamped_steps_report_descent_for_psd_matrices(digits):
    model, loss_fn, X, y = digits
    out = secondorder.undamped_steps(model, loss_fn, X, y, (0.0, 0.1))
    assert set(out) == {(lam, n) for lam in (0.0, 0.1) for n in secondorder.UNDAMPED}
    assert out[0.1, "gauss_newton"].descent and out[0.1, "saddle_free"].descent
    assert all(math.isfinite(o.change) for o in out.values())
    # the damped Newton step is the dense solve
    g = curvature.flat_gradient(model, loss_fn, X, y)
    H = curvature.hessian(model, loss_fn, X, y)
    d = torch.linalg.solve(H + 0.1 * torch.eye(len(g)), g)
    with torch.no_grad():
        before = loss_fn(model(X), y).item()
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    torch.nn.utils.vector_to_parameters(theta - d, model.parameters())
    with torch.no_grad():
        after = loss_fn(model(X), y).item()
    assert out[0.1, "newton"].change == pytest.approx(after - before, rel=1e-8)
    with pytest.raises(ValueError, match="non-negative"):
        secondorder.undamped_steps(model, loss_fn, X, y, (-1.0,))


def test_lbfgs_pairs_satisfy_the_secant_equation_of_the_hessian_on_a_quadratic():
    torch.manual_seed(0)
    X = torch.randn(50, 4)
    y = torch.randn(50, 1)
    model = nn.Linear(4, 1)
    r = secondorder.lbfgs_against(model, nn.MSELoss(), X, y, iterations=4)
    assert r.secant_hessian < 1e-8 and r.hessian_fisher < 1e-12  # linear least squares: H = F
    assert r.cos_newton == pytest.approx(r.cos_ngd)


def test_invariance_classes():
    assert secondorder.invariance(1e-12, 1e-10, 10) == "exact"
    assert secondorder.invariance(1e-4, 1e-3, 10) == "first order"
    assert secondorder.invariance(0.5, 0.5, 10) == "none"


def test_lbfgs_is_not_invariant_to_scalings_or_nonlinear_maps():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 3, generator=g), torch.randn(30, 2, generator=g)
    model = problems.mlp([3, 2], seed=0)
    run = secondorder.lbfgs_run(nn.MSELoss(), X, y, lr=0.1, steps=3)
    scaling = DiagonalScaling.random(8, generator=g)
    assert compare_runs(model, scaling, nn.MSELoss(), X, run).parameter.max() > 1e-3
    assert compare_runs(model, Sinh(), nn.MSELoss(), X, run).parameter.max() > 1e-3
