import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import curvature, problems
from natlib.reparam import (
    RULES,
    Affine,
    DiagonalScaling,
    Exp,
    Reparametrized,
    Sinh,
    compare,
    compare_step_sizes,
    direction,
    outputs,
    trajectory,
)

P = 5


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


MAPS = {
    "diagonal": lambda: DiagonalScaling.random(P, generator=generator()),
    "affine": lambda: Affine.random(P, generator=generator()),
    "sinh": Sinh,
    "exp": Exp,
}


pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def small():
    """A tanh network regressing random targets: 27 parameters, a full-rank Fisher.

    (Cross-entropy would leave the Fisher singular: shifting every logit by one constant
    changes nothing; see :func:`test_singular_fisher_is_invariant_in_function_space_only`.)
    """
    g = generator(1)
    X = torch.randn(64, 4, generator=g)
    y = torch.randn(64, 3, generator=g)
    model = problems.mlp([4, 3, 3], "tanh", seed=2)
    return model, nn.MSELoss(), X, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MAPS)
def test_round_trip_on_single_points_and_batches(name):
    h = MAPS[name]()
    phi = torch.randn(3, P, generator=generator(3))
    torch.testing.assert_close(h.inverse(h.forward(phi)), phi)
    theta = h.forward(phi)
    torch.testing.assert_close(h.forward(h.inverse(theta[0])), theta[0])


@pytest.mark.parametrize("name", MAPS)
def test_jacobian_matches_autograd(name):
    h = MAPS[name]()
    phi = torch.randn(P, generator=generator(4))
    torch.testing.assert_close(h.jacobian(phi), torch.func.jacrev(h.forward)(phi))


def test_random_maps_have_the_requested_spread():
    scaling = DiagonalScaling.random(1000, spread=3.0, generator=generator())
    logs = scaling.scales.log()
    assert -3.0 <= logs.min() < -2.9 and 2.9 < logs.max() <= 3.0
    affine = Affine.random(50, spread=3.0, generator=generator())
    singular_values = torch.linalg.svdvals(affine.A).log()
    assert -3.0 <= singular_values.min() and singular_values.max() <= 3.0
    assert (affine.A != 0).float().mean() > 0.99  # dense


def test_affine_rejects_singular_and_misshapen_maps():
    with pytest.raises(ValueError, match="singular"):
        Affine(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        Affine(torch.ones(2, 3))
    with pytest.raises(ValueError, match="b must have shape"):
        Affine(torch.eye(2), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        Affine(torch.eye(2) * float("nan"))


def test_maps_reject_wrong_sizes_and_domains():
    with pytest.raises(ValueError, match="this map acts on 5"):
        Affine.random(P, generator=generator()).forward(torch.zeros(4))
    with pytest.raises(ValueError, match="this map acts on 5"):
        DiagonalScaling.random(P, generator=generator()).inverse(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="non-zero"):
        DiagonalScaling(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="positive"):
        Exp().inverse(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="one point"):
        Sinh().jacobian(torch.zeros(2, 3))


def test_reparametrized_model_has_phi_as_its_only_parameter(small):
    model, _, X, _ = small
    h = Affine.random(num_params(model), generator=generator())
    wrapped = Reparametrized(model, h)
    assert [name for name, _ in wrapped.named_parameters()] == ["phi"]
    theta = parameters_to_vector(model.parameters())
    torch.testing.assert_close(wrapped.theta(), theta)
    torch.testing.assert_close(wrapped(X), model(X))
    torch.testing.assert_close(outputs(model, theta, X), model(X))
    with pytest.raises(ValueError, match="this map acts on"):
        Reparametrized(model, Affine.random(3, generator=generator()))


def test_curvature_of_the_wrapped_model_obeys_the_tensor_laws(small):
    """F_phi = J^T F_theta J, and H_phi = J^T H_theta J + sum_i g_i h''_i for elementwise h."""
    model, loss_fn, X, y = small
    wrapped = Reparametrized(model, Sinh())
    phi = wrapped.phi.detach()
    J = Sinh().jacobian(phi)
    F_theta = curvature.fisher(model, loss_fn, X, y)
    torch.testing.assert_close(curvature.fisher(wrapped, loss_fn, X, y), J.T @ F_theta @ J)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    torch.testing.assert_close(curvature.flat_gradient(wrapped, loss_fn, X, y), J.T @ g)
    H_theta = curvature.hessian(model, loss_fn, X, y)
    expected = J.T @ H_theta @ J + torch.diag(g * torch.sinh(phi))
    torch.testing.assert_close(curvature.hessian(wrapped, loss_fn, X, y), expected)


@pytest.mark.parametrize("rule", ["ngd", "newton"])
@pytest.mark.parametrize("name", ["diagonal", "affine"])
def test_second_order_steps_are_invariant_under_affine_maps(small, rule, name):
    model, loss_fn, X, y = small
    build = {"diagonal": DiagonalScaling.random, "affine": Affine.random}[name]
    h = build(num_params(model), generator=generator())
    c = compare(model, h, loss_fn, X, y, rule, lr=0.5, steps=3)
    assert c.theta.shape == c.theta_via_phi.shape == (4, num_params(model))
    assert c.parameter.max() < 1e-8 and c.function.max() < 1e-8


def test_first_order_rules_depend_on_the_coordinates(small):
    model, loss_fn, X, y = small
    diagonal = DiagonalScaling.random(num_params(model), generator=generator())
    dense = Affine.random(num_params(model), generator=generator())
    for rule in ("gd", "rms_emp"):
        assert compare(model, diagonal, loss_fn, X, y, rule, lr=0.1).parameter.item() > 1.0
    assert compare(model, diagonal, loss_fn, X, y, "diag_fisher", lr=0.1).parameter < 1e-10
    assert compare(model, dense, loss_fn, X, y, "diag_fisher", lr=0.1).parameter > 0.1


def test_gd_step_in_phi_is_the_gd_step_preconditioned_by_A_At(small):
    model, loss_fn, X, y = small
    h = Affine.random(num_params(model), generator=generator())
    c = compare(model, h, loss_fn, X, y, "gd", lr=1e-3)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    step = c.theta_via_phi[1] - c.theta_via_phi[0]
    torch.testing.assert_close(step, -1e-3 * h.A @ h.A.T @ g)


def test_ngd_under_a_nonlinear_map_is_invariant_to_first_order_only(small):
    model, loss_fn, X, y = small

    def discrepancy(rule: str, lr: float) -> float:
        return compare(model, Sinh(), loss_fn, X, y, rule, lr=lr).parameter.item()

    ngd, newton = ([discrepancy(rule, lr) for lr in (1e-4, 1e-3)] for rule in ("ngd", "newton"))
    assert 0 < ngd[0] < 1e-3
    assert ngd[1] / ngd[0] == pytest.approx(10.0, rel=0.05)  # relative error O(eta)
    assert newton[0] > 1e-2 and newton[1] / newton[0] == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("rule", ["gd", "ngd"])
def test_step_size_sweep_matches_one_step_runs(small, rule):
    model, loss_fn, X, y = small
    lrs = [1e-3, 1e-2, 1e-1]
    sweep = compare_step_sizes(model, Sinh(), loss_fn, X, y, rule, lrs)
    assert sweep.theta.shape == (4, num_params(model))
    for k, lr in enumerate(lrs):
        one = compare(model, Sinh(), loss_fn, X, y, rule, lr)
        torch.testing.assert_close(sweep.theta_via_phi[k + 1], one.theta_via_phi[1])
        torch.testing.assert_close(sweep.parameter[k], one.parameter[0])
        torch.testing.assert_close(sweep.function[k], one.function[0])


def test_damping_breaks_invariance(small):
    model, loss_fn, X, y = small
    h = DiagonalScaling.random(num_params(model), generator=generator())
    errors = [
        compare(model, h, loss_fn, X, y, "ngd", lr=0.1, damping=lam).parameter.item()
        for lam in (0.0, 1e-3, 1e-1)
    ]
    assert errors[0] < 1e-10 < errors[1] < errors[2]


def test_singular_fisher_is_invariant_in_function_space_only():
    """Softmax regression with all ten class rows is over-parametrised: F has a null space."""
    g = generator(5)
    X = torch.randn(40, 3, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    model = problems.mlp([3, 3], seed=6)
    h = DiagonalScaling.random(num_params(model), generator=generator())
    c = compare(model, h, nn.CrossEntropyLoss(), X, y, "ngd", lr=0.1)
    assert c.parameter.item() > 1e-2 and c.function.item() < 1e-8


def test_directions_solve_their_curvature_systems(small):
    model, loss_fn, X, y = small
    g = curvature.flat_gradient(model, loss_fn, X, y)
    F = curvature.fisher(model, loss_fn, X, y)
    H = curvature.hessian(model, loss_fn, X, y)
    eye = torch.eye(len(g))
    torch.testing.assert_close(F @ direction(model, loss_fn, X, y, "ngd"), g)
    torch.testing.assert_close((H + eye) @ direction(model, loss_fn, X, y, "newton", 1.0), g)
    torch.testing.assert_close(direction(model, loss_fn, X, y, "diag_fisher"), g / F.diagonal())


def test_trajectory_leaves_the_model_unchanged(small):
    model, loss_fn, X, y = small
    before = parameters_to_vector(model.parameters()).clone()
    path = trajectory(model, loss_fn, X, y, "gd", lr=0.1, steps=2)
    torch.testing.assert_close(parameters_to_vector(model.parameters()), before)
    torch.testing.assert_close(path[0], before)
    assert not torch.equal(path[2], before)


def test_bad_rules_damping_steps_and_losses_are_rejected(small):
    model, loss_fn, X, y = small
    with pytest.raises(ValueError, match="supported; use one of"):
        direction(model, loss_fn, X, y, "sgd")
    with pytest.raises(ValueError, match="damping"):
        direction(model, loss_fn, X, y, "ngd", damping=-1.0)
    with pytest.raises(ValueError, match="steps"):
        trajectory(model, loss_fn, X, y, "gd", lr=0.1, steps=0)
    with pytest.raises(ValueError, match="supported"):
        compare(model, Sinh(), nn.L1Loss(), X, X[:, :3], "gd", lr=0.1)
    assert set(RULES) == {"gd", "ngd", "newton", "diag_fisher", "rms_emp"}


def test_diagonal_rules_reject_a_zero_diagonal():
    model = nn.Linear(2, 2)
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])  # a dead input
    y = torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="zeros; use damping"):
        direction(model, nn.CrossEntropyLoss(), X, y, "diag_fisher")
    assert torch.isfinite(direction(model, nn.CrossEntropyLoss(), X, y, "rms_emp", 1e-8)).all()


def test_saddle_free_rule_rescales_by_the_absolute_hessian(small):
    model, loss_fn, X, y = small
    g = curvature.flat_gradient(model, loss_fn, X, y)
    H = curvature.hessian(model, loss_fn, X, y)
    values, vectors = torch.linalg.eigh(H)
    expected = vectors @ ((vectors.T @ g) / (values.abs() + 0.1))
    torch.testing.assert_close(direction(model, loss_fn, X, y, "saddle_free", 0.1), expected)


def test_compare_runs_agrees_with_compare(small):
    from natlib.reparam import compare_runs

    model, loss_fn, X, y = small
    h = Sinh()
    expected = compare(model, h, loss_fn, X, y, "ngd", lr=0.1, steps=2, damping=1e-3)

    def run(m):
        return trajectory(m, loss_fn, X, y, "ngd", 0.1, 2, 1e-3)

    actual = compare_runs(model, h, loss_fn, X, run)
    torch.testing.assert_close(actual.parameter, expected.parameter)
    torch.testing.assert_close(actual.function, expected.function)
