"""natlib.kunstner: closed forms against natlib.curvature, and the flows' geometry."""

import pytest
import torch
from torch.nn.utils import vector_to_parameters

from natlib import curvature, kunstner, problems

STARTS = [[2.0, 4.5], [1.0, 0.0], [4.5, 3.0], [-0.5, 3.0]]


pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def regression():
    p = problems.kunstner_linear_regression(n=200, dtype=torch.float64)
    return kunstner.LinearRegression(p.X_train, p.y_train)


def test_closed_forms_match_natlib_curvature(regression):
    model, loss_fn, X, y = regression.as_torch()
    n = len(y)
    prior = torch.eye(2) / (regression.prior_variance * n)
    for theta in torch.tensor(STARTS):
        vector_to_parameters(theta, model.parameters())
        data_gradient = curvature.flat_gradient(model, loss_fn, X, y)
        torch.testing.assert_close(
            regression.gradient(theta), data_gradient + prior @ theta, rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            regression.fisher(), curvature.fisher(model, loss_fn, X) + prior, rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            regression.empirical_fisher(theta),
            curvature.fisher(model, loss_fn, X, y, kind="empirical"),
            rtol=1e-12,
            atol=0,
        )


def test_gradient_is_the_gradient_of_the_loss_and_vanishes_at_the_minimiser(regression):
    theta = torch.tensor(STARTS, requires_grad=True)
    (expected,) = torch.autograd.grad(regression.loss(theta).sum(), theta)
    torch.testing.assert_close(regression.gradient(theta.detach()), expected, rtol=1e-12, atol=0)
    assert regression.gradient(regression.minimiser()).norm() < 1e-12


def test_natural_gradient_flow_is_straight(regression):
    path = kunstner.flow(kunstner.field(regression, "ngd"), torch.tensor(STARTS), 1e-2, 1000)
    torch.testing.assert_close(kunstner.path_ratio(path), torch.ones(4), rtol=0, atol=1e-6)


def test_path_ratio_does_not_depend_on_the_euler_step(regression):
    vector = kunstner.field(regression, "ef", gamma=3.0)
    coarse = kunstner.flow(vector, torch.tensor(STARTS), 1e-2, 1000)
    fine = kunstner.flow(vector, torch.tensor(STARTS), 2.5e-3, 4000)
    torch.testing.assert_close(
        kunstner.path_ratio(coarse), kunstner.path_ratio(fine), rtol=5e-3, atol=0
    )
    assert kunstner.path_ratio(fine).max() > 1.5


def test_path_ratio_of_a_known_path():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])[:, None]  # (T, B=1, P)
    torch.testing.assert_close(kunstner.path_ratio(square), torch.tensor([2 / 2**0.5]))


def test_empirical_fisher_matches_the_fisher_only_when_well_specified():
    results = {
        name: kunstner.misspecification(*kunstner.logistic_dataset(name, n=400))
        for name in kunstner.LOGISTIC_DATASETS
    }
    well = results["well-specified"].relative_difference
    assert well < 0.2
    for name in ("misspecified noise", "misspecified model"):
        assert results[name].relative_difference > 2 * well


def test_logistic_datasets_are_balanced_and_reproducible():
    X, y = kunstner.logistic_dataset("misspecified model", n=10, seed=3)
    assert X.shape == (10, 2) and y.tolist() == [0.0] * 5 + [1.0] * 5
    torch.testing.assert_close(X, kunstner.logistic_dataset("misspecified model", n=10, seed=3)[0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: kunstner.field(r, "adam"), "preconditioner 'adam'"),
        (lambda r: kunstner.logistic_dataset("xor"), "dataset 'xor'"),
    ],
)
def test_bad_names_are_rejected(regression, call, match):
    with pytest.raises(ValueError, match=match):
        call(regression)
