import pytest
import sympy as sp

from natlib import symbolic


@pytest.mark.parametrize("family", ["bernoulli", "gaussian"])
def test_gradient_and_fisher_transform_with_the_jacobian(family):
    law = symbolic.transformation_law(family)
    assert law.gradient_residual().is_zero_matrix
    assert law.fisher_residual().is_zero_matrix


def test_textbook_fishers_come_out_of_the_definition():
    bernoulli = symbolic.transformation_law("bernoulli")
    (p,), (z,) = bernoulli.theta, bernoulli.phi
    assert sp.simplify(bernoulli.fisher_theta[0] - 1 / (p * (1 - p))) == 0
    sigmoid = 1 / (1 + sp.exp(-z))
    assert sp.simplify((bernoulli.fisher_phi[0] - sigmoid * (1 - sigmoid)).rewrite(sp.exp)) == 0

    gaussian = symbolic.transformation_law("gaussian")
    (_, sigma), (_, s) = gaussian.theta, gaussian.phi
    assert sp.simplify(gaussian.fisher_theta - sp.diag(1 / sigma**2, 2 / sigma**2)).is_zero_matrix
    assert sp.simplify(gaussian.fisher_phi - sp.diag(sp.exp(-2 * s), 2)).is_zero_matrix


def test_fisher_information_from_its_definition():
    mu = sp.Symbol("mu", real=True)
    y = sp.Symbol("y")

    def expectation(e: sp.Expr) -> sp.Expr:  # y = mu +- 1 with probability 1/2 each
        return (e.subs(y, mu + 1) + e.subs(y, mu - 1)) / 2

    F = symbolic.fisher_information(-((y - mu) ** 2) / 2, [mu], expectation)
    assert F == sp.Matrix([[1]])


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="bernoulli"):
        symbolic.transformation_law("poisson")


def test_affine_natural_gradient_step_is_exactly_invariant_and_gd_is_not():
    steps = symbolic.affine_steps(2)
    assert sp.simplify(steps.ngd_phi - steps.ngd_theta).is_zero_matrix
    assert sp.simplify(steps.gd_phi - steps.gd_predicted).is_zero_matrix
    assert not sp.simplify(steps.gd_phi - steps.gd_theta).is_zero_matrix


@pytest.mark.parametrize("n", [0, 1.5])
def test_affine_steps_rejects_bad_dimension(n):
    with pytest.raises(ValueError, match="positive integer"):
        symbolic.affine_steps(n)


@pytest.mark.parametrize("n", [1, 2])
def test_newton_step_is_exactly_invariant_under_affine_maps(n):
    residual = symbolic.newton_affine_residual(n)
    assert residual.shape == (n, 1) and residual.is_zero_matrix


@pytest.mark.parametrize("n", [0, 1.5])
def test_newton_affine_residual_rejects_bad_dimension(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        symbolic.newton_affine_residual(n)


def test_nonlinear_ngd_discrepancy_is_second_order_with_the_h_second_derivative():
    g, F, h1, h2 = sp.symbols("g F h' h''")
    c1, c2 = symbolic.nonlinear_step_discrepancy("ngd")
    assert c1 == 0
    assert sp.simplify(c2 - h2 * (g / (F * h1)) ** 2 / 2) == 0


def test_nonlinear_newton_discrepancy_is_first_order():
    g, H, h1, h2 = sp.symbols("g H h' h''")
    (c1,) = symbolic.nonlinear_step_discrepancy("newton", order=1)
    assert sp.simplify(c1 - g**2 * h2 / (H * (H * h1**2 + g * h2))) == 0
    assert c1.subs(h2, 0) == 0  # affine maps: Newton is invariant too


def test_nonlinear_step_discrepancy_rejects_bad_input():
    with pytest.raises(ValueError, match="'ngd' or 'newton'"):
        symbolic.nonlinear_step_discrepancy("gd")
    with pytest.raises(ValueError, match="order"):
        symbolic.nonlinear_step_discrepancy("ngd", order=0)


@pytest.mark.parametrize("family", ["bernoulli", "gaussian", "categorical"])
def test_kl_is_half_the_fisher_quadratic_form_to_second_order(family):
    expansion = symbolic.kl_expansion(family)
    assert expansion.residuals() == (0, 0, 0)
    assert expansion.coefficients[3] != 0  # the expansion is not exact: O(t^3) remains


@pytest.mark.parametrize(
    ("family", "likelihood"), [("bernoulli", "Bernoulli"), ("categorical", "Categorical")]
)
def test_kl_fisher_is_the_output_hessian_of_natlib_losses(family, likelihood):
    import torch

    from natlib import losses

    expansion = symbolic.kl_expansion(family)
    logits = [0.3, -1.0, 2.0][: len(expansion.theta)]
    fisher = expansion.fisher.subs(dict(zip(expansion.theta, logits)))
    output = torch.tensor([logits], dtype=torch.float64)
    expected = getattr(losses, likelihood)("sum").hessian(output)
    torch.testing.assert_close(
        torch.tensor(sp.matrix2numpy(fisher, dtype=float)), expected[0], rtol=1e-12, atol=0
    )
