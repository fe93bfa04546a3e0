"""natlib.optim: K-FAC and dense NGD steps against dense natural-gradient steps."""

import copy
import math

import pytest
import torch
from cases import LOSSES, mlp_case
from helpers import assert_close
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import curvature, problems
from natlib.kfac import KFACApproximation
from natlib.layout import ParamLayout
from natlib.optim import KFAC, NGD, train

pytestmark = pytest.mark.usefixtures("float64")


def flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def one_step(optimizer: torch.optim.Optimizer, model, loss_fn, X, y) -> None:
    optimizer.zero_grad()
    loss_fn(model(X), y).backward()
    optimizer.step()


def exact_kfac(model: nn.Module, loss_fn: nn.Module, **kwargs) -> KFAC:
    """K-FAC with type-2 factors, no averaging, updated every step, exact damping."""
    options = dict(T_cov=1, T_inv=1, ema_decay=0.0, kind="exact", damping_mode="exact")
    return KFAC(model, loss_fn, **(options | kwargs))


def dense_step(model, loss_fn, X, y, damping: float, blocks: bool, extra=None) -> torch.Tensor:
    r""":math:`(F + \lambda I)^{-1}(\nabla L + \text{extra})`, F layer-block-diagonal if asked."""
    F = curvature.fisher(model, loss_fn, X)
    if blocks:
        F = ParamLayout.of(model).block_diagonal(F)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    if extra is not None:
        g = g + extra
    return torch.linalg.solve(F + damping * torch.eye(len(g)), g)


@pytest.mark.parametrize("name", LOSSES)
def test_step_is_block_diagonal_damped_ngd_for_one_example(name: str) -> None:
    model, loss_fn, X, y = mlp_case(name, (5, 4, 3), n=1)
    expected = flat(model) - 0.5 * dense_step(model, loss_fn, X, y, 0.1, blocks=True)
    one_step(exact_kfac(model, loss_fn, lr=0.5, damping=0.1), model, loss_fn, X, y)
    assert_close(flat(model), expected)


def test_step_is_full_damped_ngd_for_one_layer() -> None:
    model, loss_fn, X, y = mlp_case("ce", (5, 3), n=1)
    expected = flat(model) - 0.5 * dense_step(model, loss_fn, X, y, 0.1, blocks=False)
    one_step(exact_kfac(model, loss_fn, lr=0.5, damping=0.1), model, loss_fn, X, y)
    assert_close(flat(model), expected)


def test_momentum_and_weight_decay_over_two_steps() -> None:
    model, loss_fn, X, y = mlp_case("ce", (5, 4, 3), n=1)
    lr, lam, mu, wd = 0.3, 0.1, 0.9, 0.01
    reference = copy.deepcopy(model)
    optimizer = exact_kfac(model, loss_fn, lr=lr, damping=lam, momentum=mu, weight_decay=wd)
    buffer = torch.zeros_like(flat(model))
    for _ in range(2):
        theta = flat(reference)
        delta = dense_step(reference, loss_fn, X, y, lam, blocks=True, extra=wd * theta)
        buffer = mu * buffer + delta
        torch.nn.utils.vector_to_parameters(theta - lr * buffer, reference.parameters())
        one_step(optimizer, model, loss_fn, X, y)
    assert_close(flat(model), flat(reference))


def test_kl_clipping_scales_the_step() -> None:
    """With clipping, the step is ``nu`` times the unclipped one, ``nu = sqrt(kappa / (lr^2
    <delta, g>))``."""
    model, loss_fn, X, y = mlp_case("ce", (5, 4, 3), n=1)
    lr, lam, kappa = 0.5, 0.1, 1e-4
    delta = dense_step(model, loss_fn, X, y, lam, blocks=True)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    nu = min(1.0, (kappa / (lr**2 * (delta @ g))).sqrt().item())
    assert nu < 1.0
    expected = flat(model) - lr * nu * delta
    optimizer = exact_kfac(model, loss_fn, lr=lr, damping=lam, kl_clip=kappa)
    one_step(optimizer, model, loss_fn, X, y)
    assert_close(flat(model), expected)


@pytest.mark.parametrize("kind", ["mc", "empirical"])
@pytest.mark.parametrize("damping_mode", ["exact", "pi"])
def test_state_dict_resumes_bit_identically(kind: str, damping_mode: str) -> None:
    data = problems.digits()
    X, y = data.X_train[:240], data.y_train[:240]
    batches = [(X[i : i + 40], y[i : i + 40]) for i in range(0, 240, 40)] * 2
    options = dict(lr=0.1, damping=0.01, momentum=0.9, weight_decay=1e-4, T_cov=2, T_inv=3)
    options |= dict(kl_clip=0.01, kind=kind, damping_mode=damping_mode, seed=5)

    model = problems.mlp([64, 16, 10], seed=0)
    optimizer = KFAC(model, data.loss_fn, **options)
    for Xb, yb in batches[:5]:
        one_step(optimizer, model, data.loss_fn, Xb, yb)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    for Xb, yb in batches[5:]:
        one_step(optimizer, model, data.loss_fn, Xb, yb)

    resumed = problems.mlp([64, 16, 10], seed=1)
    resumed.load_state_dict(saved_model)
    optimizer = KFAC(resumed, data.loss_fn, **(options | dict(seed=0)))
    optimizer.load_state_dict(saved_optimizer)
    for Xb, yb in batches[5:]:
        one_step(optimizer, resumed, data.loss_fn, Xb, yb)
    assert torch.equal(flat(resumed), flat(model))


@pytest.mark.parametrize("kind", ["mc", "empirical", "exact"])
def test_loss_decreases_on_digits(kind: str) -> None:
    data = problems.digits()
    model = problems.mlp([64, 32, 10], seed=0)
    optimizer = KFAC(model, data.loss_fn, lr=0.3, damping=0.01, momentum=0.5, kind=kind)
    trace = train(model, optimizer, data.loss_fn, data.X_train, data.y_train, 60, 128, seed=0)
    assert trace.losses[0] > 2.0 and trace.losses[-1] < 0.1, trace.losses


def test_float32_factors_and_eigh_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = torch.linalg.eigh, []

    def fails_in_float32(matrix: torch.Tensor):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    data = problems.digits(dtype=torch.float32)
    model = problems.mlp([64, 16, 10], seed=0).float()
    optimizer = KFAC(model, data.loss_fn, lr=0.1, damping=0.01)
    one_step(optimizer, model, data.loss_fn, data.X_train[:64], data.y_train[:64])
    A = optimizer.curvature.factors["0"][0]
    (a, QA), _ = optimizer.curvature.eigen["0"]
    assert A.dtype == a.dtype == QA.dtype == torch.float32
    assert calls == [torch.float32, torch.float64] * 4


def test_nan_factor_names_the_layer() -> None:
    model = problems.mlp([3, 4, 2], seed=0)
    optimizer = KFAC(model, nn.MSELoss(), damping=0.1)
    X = torch.ones(5, 3)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the model output contains NaN"):
        one_step(optimizer, model, nn.MSELoss(), X, torch.zeros(5, 2))


def test_clear_errors() -> None:
    model = problems.mlp([3, 2], seed=0)
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*only nn.Linear"):
        KFAC(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), nn.MSELoss())
    for damping in (0.0, -0.1):
        with pytest.raises(ValueError, match="damping must be a positive"):
            KFAC(model, nn.MSELoss(), damping=damping)
    with pytest.raises(ValueError, match="T_inv must be a positive integer"):
        KFAC(model, nn.MSELoss(), T_inv=0)
    with pytest.raises(ValueError, match="Fisher kind 'type-1' is not supported"):
        KFAC(model, nn.MSELoss(), kind="type-1")
    optimizer = KFAC(model, nn.MSELoss())
    with pytest.raises(RuntimeError, match="'0.weight' has no gradient"):
        optimizer.step()
    with torch.no_grad():
        model(torch.ones(4, 3))  # not recorded: no gradients enabled
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no forward pass was recorded"):
        optimizer.step()
    empirical = KFAC(model, nn.MSELoss(), kind="empirical")
    model(torch.ones(4, 3))  # forward without backward
    with pytest.raises(RuntimeError, match="needs loss.backward"):
        empirical.step()


@pytest.mark.parametrize("damping_mode", ["exact", "pi"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_kfac_against_a_hand_computed_reference(kind: str, damping_mode: str) -> None:
    """Five steps with averaging (decay 0.8), T_cov = 2, T_inv = 3 and momentum, against a
    reference built from :meth:`KFACApproximation.from_batch` and dense Kronecker algebra."""
    data = problems.digits()
    batches = [(data.X_train[i : i + 30], data.y_train[i : i + 30]) for i in range(0, 150, 30)]
    lr, lam, mu, decay, seed = 0.2, 0.05, 0.5, 0.8, 3
    model = problems.mlp([64, 6, 10], seed=0)
    reference = copy.deepcopy(model)
    optimizer = KFAC(
        model,
        data.loss_fn,
        lr=lr,
        damping=lam,
        momentum=mu,
        T_cov=2,
        T_inv=3,
        ema_decay=decay,
        kind=kind,
        damping_mode=damping_mode,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    factors, inverse, buffer = None, None, torch.zeros(ParamLayout.of(model).numel)
    for k, (X, y) in enumerate(batches):
        if k % 2 == 0:
            batch = KFACApproximation.from_batch(
                reference, data.loss_fn, X, y, kind=kind, generator=generator
            ).factors
            if factors is None:
                factors = batch
            else:
                factors = {
                    n: tuple(decay * old + (1 - decay) * new for old, new in zip(f, batch[n]))
                    for n, f in factors.items()
                }
        if k % 3 == 0:
            inverse = torch.linalg.inv(damped_kronecker(reference, factors, lam, damping_mode))
        g = curvature.flat_gradient(reference, data.loss_fn, X, y)
        buffer = mu * buffer + inverse @ g
        torch.nn.utils.vector_to_parameters(flat(reference) - lr * buffer, reference.parameters())
        one_step(optimizer, model, data.loss_fn, X, y)
        assert_close(flat(model), flat(reference), rtol=1e-9)


def damped_kronecker(model, factors, lam: float, mode: str) -> torch.Tensor:
    r"""Dense :math:`\mathrm{diag}_l(A_l \otimes G_l + \lambda I)` or, for ``"pi"``,
    :math:`\mathrm{diag}_l((A_l + \pi_l \sqrt\lambda I) \otimes (G_l + \sqrt\lambda/\pi_l I))`."""
    blocks = []
    for layer in ParamLayout.of(model, kronecker=True).blocks:
        A, G = factors[layer.name]
        eye_a, eye_g = torch.eye(A.shape[0]), torch.eye(G.shape[0])
        if mode == "pi":
            pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
            block = torch.kron(G + lam**0.5 / pi * eye_g, A + pi * lam**0.5 * eye_a)
        else:
            block = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0])
        order = layer.permutation()
        blocks.append(block[order][:, order])
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_ngd_matches_dense_fisher_steps(kind: str) -> None:
    data = problems.digits()
    X, y = data.X_train[:40], data.y_train[:40]
    model = problems.mlp([64, 5, 10], seed=0)
    reference = copy.deepcopy(model)
    optimizer = NGD(model, data.loss_fn, lr=0.5, damping=0.1, kind=kind, seed=2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        F = curvature.fisher(reference, data.loss_fn, X, y, kind=kind, generator=generator)
        g = curvature.flat_gradient(reference, data.loss_fn, X, y)
        step = torch.linalg.solve(F + 0.1 * torch.eye(len(g)), g)
        torch.nn.utils.vector_to_parameters(flat(reference) - 0.5 * step, reference.parameters())
        one_step(optimizer, model, data.loss_fn, X, y)
        assert_close(flat(model), flat(reference), rtol=1e-9)


def test_ngd_step_is_damped_natural_gradient() -> None:
    model = problems.mlp([5, 4, 3], seed=1)
    loss_fn, X, y = nn.MSELoss(), torch.linspace(-1, 1, 15).view(3, 5), torch.zeros(3, 3)
    expected = flat(model) - 0.5 * dense_step(model, loss_fn, X, y, 0.1, blocks=False)
    one_step(NGD(model, loss_fn, lr=0.5, damping=0.1), model, loss_fn, X, y)
    assert_close(flat(model), expected)


def test_train_stops_when_the_loss_diverges() -> None:
    model = problems.mlp([3, 2], seed=0)
    X, y = torch.randn(8, 3), torch.randn(8, 2)
    trace = train(model, torch.optim.SGD(model.parameters(), lr=1e6), nn.MSELoss(), X, y, 50, 4)
    assert len(trace.steps) < 6 and not torch.isfinite(torch.tensor(trace.losses[-1]))


def test_train_records_a_step_that_meets_nan_as_divergence() -> None:
    """A natlib optimiser raises NonFiniteError on NaN or Inf; train ends the run there with
    an infinite loss, while other errors still propagate."""
    from natlib.checks import NonFiniteError

    class Failing(torch.optim.SGD):
        def __init__(self, params, error: Exception) -> None:
            super().__init__(params, lr=0.1)
            self.error, self.calls = error, 0

        def step(self, closure=None):
            self.calls += 1
            if self.calls == 3:
                raise self.error
            return super().step(closure)

    model = problems.mlp([3, 2], seed=0)
    X, y = torch.randn(8, 3), torch.randn(8, 2)
    failing = Failing(model.parameters(), NonFiniteError("the gradient contains NaN or Inf."))
    trace = train(model, failing, nn.MSELoss(), X, y, 10, 4, eval_every=1)
    assert trace.steps == [0, 1, 2, 3] and trace.losses[-1] == float("inf")
    assert all(math.isfinite(loss) for loss in trace.losses[:-1])
    with pytest.raises(ValueError, match="shape"):
        train(model, Failing(model.parameters(), ValueError("shape")), nn.MSELoss(), X, y, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    data = problems.digits()
    runs = []
    for device in ("cpu", "cuda"):
        model = problems.mlp([64, 16, 10], seed=0).to(device)
        optimizer = KFAC(model, data.loss_fn, lr=0.1, damping=0.01, kind="exact", T_inv=2)
        X, y = data.X_train[:128].to(device), data.y_train[:128].to(device)
        for _ in range(4):
            one_step(optimizer, model, data.loss_fn, X, y)
        runs.append(flat(model).cpu())
    assert_close(runs[1], runs[0], rtol=1e-8)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", float("nan"), "lr must be a non-negative finite number"),
        ("lr", float("inf"), "lr must be a non-negative finite number"),
        ("damping", 0.0, "damping must be a positive finite number"),
        ("weight_decay", float("nan"), "weight_decay must be a non-negative finite number"),
        ("momentum", 1.0, "momentum must lie in"),
    ],
)
def test_hyperparameters_are_checked_at_construction_and_every_step(key, value, message):
    model = problems.mlp([3, 2], seed=0)
    with pytest.raises(ValueError, match=message):
        KFAC(model, nn.MSELoss(), **{key: value})
    optimizer = KFAC(model, nn.MSELoss())
    optimizer.param_groups[0][key] = value  # as a scheduler might
    before = flat(model)
    with pytest.raises(ValueError, match=message):
        one_step(optimizer, model, nn.MSELoss(), torch.ones(4, 3), torch.zeros(4, 2))
    assert torch.equal(flat(model), before) and optimizer.curvature is None


def test_non_finite_gradient_names_the_parameter_and_changes_nothing() -> None:
    model = problems.mlp([3, 2], seed=0)
    optimizer = NGD(model, nn.MSELoss(), damping=0.1)
    before = flat(model)
    optimizer.zero_grad()
    nn.MSELoss()(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
    model[0].bias.grad[0] = float("inf")
    with pytest.raises(ValueError, match="gradient of parameter '0.bias' contains NaN or Inf"):
        optimizer.step()
    assert torch.equal(flat(model), before) and optimizer.steps == 0


@pytest.mark.parametrize(
    "other",
    [dict(damping_mode="exact"), dict(kind="empirical"), dict(width=5)],
    ids=["damping mode", "kind", "layer width"],
)
def test_state_dict_from_other_settings_is_rejected(other: dict) -> None:
    width = other.pop("width", 4)
    X, y = torch.ones(6, 3), torch.zeros(6, 2)
    model = problems.mlp([3, 4, 2], seed=0)
    optimizer = KFAC(model, nn.MSELoss(), damping=0.1, kind="mc")
    one_step(optimizer, model, nn.MSELoss(), X, y)
    saved = optimizer.state_dict()
    target = problems.mlp([3, width, 2], seed=0)
    resumed = KFAC(target, nn.MSELoss(), damping=0.1, **({"kind": "mc"} | other))
    with pytest.raises(ValueError, match="saved with settings"):
        resumed.load_state_dict(saved)
    assert resumed.steps == 0 and resumed.curvature is None
