import pytest
import torch
from torch import nn

from natlib import problems


def test_digits_classification_split_and_standardisation():
    p = problems.digits(seed=0, dtype=torch.float64)
    assert p.X_train.shape == (1348, 64) and p.X_test.shape == (449, 64)
    assert len(p.y_train) + len(p.y_test) == 1797
    assert p.X_train.dtype == torch.float64 and p.y_train.dtype == torch.int64
    assert set(p.y_train.tolist()) == set(range(10))
    std = p.X_train.std(0)
    varying = std > 0
    assert varying.sum() >= 60  # a few border pixels are always 0 in the training set
    zeros = torch.zeros(64, dtype=torch.float64)
    torch.testing.assert_close(p.X_train.mean(0), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(std[varying], torch.ones_like(std[varying]), atol=1e-12, rtol=0)
    assert isinstance(p.loss_fn, nn.CrossEntropyLoss)


def test_digits_train_and_test_are_disjoint_and_cover_the_data():
    from sklearn.datasets import load_digits

    p = problems.digits(seed=1, dtype=torch.float64)
    raw = torch.from_numpy(load_digits().data)
    both = torch.cat([p.X_train, p.X_test])
    assert both.shape == raw.shape
    rows = {tuple(r) for r in both.round(decimals=8).tolist()}
    assert len(rows) == len({tuple(r) for r in raw.tolist()})  # no example lost or repeated


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("digits", {}),
        ("digits-autoencoder", {}),
        ("digits-autoencoder", {"scale": "standardize"}),
        ("kunstner-linear-regression", {}),
        ("logistic-toy", {}),
    ],
)
def test_problems_are_deterministic_given_a_seed(name, kwargs):
    a, b = problems.load(name, seed=5, **kwargs), problems.load(name, seed=5, **kwargs)
    c = problems.load(name, seed=6, **kwargs)
    for field in ("X_train", "y_train", "X_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.X_train, c.X_train)


def test_problems_follow_dtype_and_device():
    p = problems.load("logistic-toy", dtype=torch.float32, device="cpu")
    assert p.X_train.dtype == torch.float32 and p.X_train.device.type == "cpu"
    assert p.theta_star.dtype == torch.float32


def test_autoencoder_targets_are_inputs():
    p = problems.digits_autoencoder(seed=0, dtype=torch.float64)
    assert torch.equal(p.X_train, p.y_train) and torch.equal(p.X_test, p.y_test)
    assert p.X_train.min() == 0.0 and p.X_train.max() == 1.0
    assert isinstance(p.loss_fn, nn.BCEWithLogitsLoss)
    q = problems.digits_autoencoder(seed=0, scale="standardize", dtype=torch.float64)
    assert torch.equal(q.X_train, problems.digits(seed=0, dtype=torch.float64).X_train)
    assert isinstance(q.loss_fn, nn.MSELoss)


def test_kunstner_regression_matches_the_paper_setup():
    p = problems.kunstner_linear_regression(seed=0, dtype=torch.float64)
    assert p.X_train.shape == (1000, 2)
    assert torch.all(p.X_train[:, 0] == 1.0) and torch.all(p.X_train[:, 1] > 0)
    log_z = p.X_train[:, 1].log()
    assert abs(log_z.mean()) < 0.1 and abs(log_z.std() - 0.75) < 0.05
    theta = torch.linalg.lstsq(p.X_train, p.y_train[:, None]).solution.squeeze()
    assert torch.allclose(theta, torch.tensor([2.0, 2.0], dtype=torch.float64), atol=0.2)
    residual = p.y_train - p.X_train @ p.theta_star
    assert abs(residual.var() - 1.0) < 0.15


def test_logistic_toy_labels_follow_the_model():
    p = problems.logistic_toy(seed=0, n=20000, dtype=torch.float64)
    assert p.X_train.shape == (20000, 2) and set(p.y_train.unique().tolist()) == {0.0, 1.0}
    probability = torch.sigmoid(p.X_train @ p.theta_star)
    assert abs(p.y_train.mean() - probability.mean()) < 0.02


def test_unknown_problem_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: digits, digits-autoencoder"):
        problems.load("mnist")


@pytest.mark.parametrize("bad", [{"test_fraction": 0.0}, {"test_fraction": 1.5}, {"seed": -1}])
def test_bad_split_arguments(bad):
    with pytest.raises(ValueError):
        problems.digits(**bad)


def test_bad_autoencoder_scale():
    with pytest.raises(ValueError, match="'unit' or 'standardize'"):
        problems.digits_autoencoder(scale="minmax")


def test_mlp_shapes_and_seeded_init():
    model = problems.mlp([64, 20, 20, 10], seed=0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 20), (20, 20), (20, 10)]
    assert isinstance(model[1], nn.Tanh) and isinstance(model[-1], nn.Linear)
    same = problems.mlp([64, 20, 20, 10], seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    assert sum(p.numel() for p in model.parameters()) == 64 * 20 + 20 + 20 * 20 + 20 + 210
    assert problems.mlp([3, 2], bias=False)[0].bias is None


@pytest.mark.parametrize(
    ("sizes", "activation", "match"),
    [([64], "tanh", "at least two"), ([64, 0], "tanh", "positive"), ([4, 2], "gelu", "tanh")],
)
def test_mlp_bad_input(sizes, activation, match):
    with pytest.raises(ValueError, match=match):
        problems.mlp(sizes, activation=activation)


def test_digits_cnn_shapes_seed_and_kfac_step() -> None:
    from natlib.optim import KFAC

    data = problems.digits()
    model = problems.digits_cnn(channels=(4, 6, 8), seed=3)
    assert model(data.X_train[:5]).shape == (5, 10)
    assert model[-1].in_features == 8 * 2 * 2
    again = problems.digits_cnn(channels=(4, 6, 8), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    optimizer = KFAC(model, data.loss_fn, lr=0.1, damping=0.1)
    X, y = data.X_train[:64], data.y_train[:64]
    before = data.loss_fn(model(X), y).item()
    for _ in range(3):
        optimizer.zero_grad()
        data.loss_fn(model(X), y).backward()
        optimizer.step()
    assert data.loss_fn(model(X), y).item() < before
    assert optimizer.curvature.positions == {"1": 64, "3": 16, "5": 4, "8": 1}
    with pytest.raises(ValueError, match="channels must be positive"):
        problems.digits_cnn(channels=())


def test_mlp_draws_its_weights_in_the_dtype_it_is_given():
    """A seed gives the same float64 weights whatever torch's default dtype."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        a = problems.mlp([4, 3, 2], seed=0, dtype=torch.float64)
        torch.set_default_dtype(torch.float64)
        b = problems.mlp([4, 3, 2], seed=0)
    finally:
        torch.set_default_dtype(previous)
    assert a[0].weight.dtype == torch.float64
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
