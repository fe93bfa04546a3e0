"""Every curvature object of natlib against the one interface (natlib.interface).

One parametrised suite: ``matvec`` equals ``to_dense() @ v``; ``solve`` inverts the damped
matrix; ``to_dense`` is symmetric and in parameter order; ``from_batch`` takes ``kind``;
running estimates average and refresh; ``memory_bytes`` and ``flops`` are counts; and each
object equals its definition from the slow per-example reference where it is exact.
"""

from __future__ import annotations

import pytest
import torch
from cases import LOSSES, mlp_case, vector
from helpers import assert_close

from natlib import curvature
from natlib.adam import AdamPreconditioner
from natlib.approximations import BlockDiagonalFisher, DiagonalFisher
from natlib.ekfac import EKFACApproximation, scalings
from natlib.exact import GGN, Fisher, Hessian
from natlib.interface import Curvature, Flops, RunningCurvature
from natlib.kfac import KFACApproximation
from natlib.lbfgs import LBFGSOperator
from natlib.newton import SaddleFreeHessian
from natlib.shampoo import ShampooPreconditioner

pytestmark = pytest.mark.usefixtures("float64")

CLASSES = {
    "hessian": (Hessian, {}),
    "ggn": (GGN, {}),
    "saddle-free": (SaddleFreeHessian, {}),
    "fisher-exact": (Fisher, {"kind": "exact"}),
    "fisher-mc": (Fisher, {"kind": "mc", "mc_samples": 3}),
    "fisher-empirical": (Fisher, {"kind": "empirical"}),
    "kfac-exact": (KFACApproximation, {"kind": "exact", "damping_mode": "exact"}),
    "kfac-mc": (KFACApproximation, {"kind": "mc", "damping_mode": "exact"}),
    "kfac-empirical": (KFACApproximation, {"kind": "empirical", "damping_mode": "exact"}),
    "diagonal-exact": (DiagonalFisher, {"kind": "exact"}),
    "diagonal-mc": (DiagonalFisher, {"kind": "mc", "mc_samples": 3}),
    "diagonal-empirical": (DiagonalFisher, {"kind": "empirical"}),
    "blocks-exact": (BlockDiagonalFisher, {"kind": "exact"}),
    "blocks-empirical": (BlockDiagonalFisher, {"kind": "empirical"}),
    "ekfac-exact": (EKFACApproximation, {"kind": "exact"}),
    "ekfac-mc": (EKFACApproximation, {"kind": "mc"}),
    "ekfac-empirical": (EKFACApproximation, {"kind": "empirical"}),
    "adam": (AdamPreconditioner, {"kind": "empirical", "beta2": 0.25}),
    "adam-uncorrected": (AdamPreconditioner, {"beta2": 0.25, "bias_correction": False}),
    "shampoo": (ShampooPreconditioner, {"damping_mode": "exact"}),
    "lbfgs": (LBFGSOperator, {"iterations": 8, "history_size": 5}),
}


def build(name: str, loss: str = "ce", n: int = 7, seed: int = 0) -> Curvature:
    cls, options = CLASSES[name]
    case = mlp_case(loss, n=n, seed=seed)
    if options.get("kind") == "mc":
        options = options | {"generator": torch.Generator().manual_seed(seed)}
    return cls.from_batch(case.model, case.loss_fn, case.X, case.y, **options)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", CLASSES)
def test_matvec_equals_dense_product(name: str, loss: str) -> None:
    C = build(name, loss)
    v = vector(C.layout.numel)
    product = C.matvec(v)  # matrix-free where the object has a product
    assert_close(product, C.to_dense() @ v)


@pytest.mark.parametrize("name", CLASSES)
def test_dense_is_symmetric_and_default_to_dense_agrees(name: str) -> None:
    C = build(name)
    dense = C.to_dense()
    assert dense.shape == (C.layout.numel, C.layout.numel)
    assert_close(dense, dense.T, rtol=1e-12)
    assert_close(Curvature.to_dense(C), dense)  # the interface's default, column by column


@pytest.mark.parametrize("damping", [1e-2, 1.0])
@pytest.mark.parametrize("name", CLASSES)
def test_solve_inverts_the_damped_matrix(name: str, damping: float) -> None:
    C = build(name)
    if name.startswith("hessian"):
        damping = damping + 10.0  # keep H + lambda I away from singular
    v = vector(C.layout.numel)
    x = C.solve(v, damping)
    assert_close(C.matvec(x) + damping * x, v, rtol=1e-9)
    # solve(matvec(v)) + lambda solve(v) = v, the damped identity of the interface.
    assert_close(C.solve(C.matvec(v), damping) + damping * C.solve(v, damping), v, rtol=1e-9)


@pytest.mark.parametrize("name", CLASSES)
def test_costs_are_positive_counts(name: str) -> None:
    C = build(name)
    assert isinstance(C.flops, Flops)
    assert C.flops.solve > 0 and C.flops.refresh > 0 and C.flops.update >= 0
    C.solve(vector(C.layout.numel), 1e2)
    assert C.memory_bytes >= C.layout.numel * 8


@pytest.mark.parametrize("name", CLASSES)
def test_running_estimate_averages_and_resumes(name: str) -> None:
    C, D = build(name, seed=0), build(name, seed=1)
    if not isinstance(C, RunningCurvature):
        pytest.skip("not a running estimate")
    if isinstance(C, KFACApproximation | ShampooPreconditioner):  # each factor, not the product
        mine, theirs = (
            (C.factors, D.factors) if isinstance(C, KFACApproximation) else (C.moments, D.moments)
        )
        expected = {n: [0.25 * a + 0.75 * b for a, b in zip(f, theirs[n])] for n, f in mine.items()}
        C.update(D, decay=0.25)
        averaged = C.factors if isinstance(C, KFACApproximation) else C.moments
        for n, factors in averaged.items():
            for factor, want in zip(factors, expected[n]):
                assert_close(factor, want)
    elif isinstance(C, EKFACApproximation):  # the batch's gradients in C's eigenbasis
        expected = {
            n: 0.25 * S + 0.75 * scalings(C.basis[n], *D.samples[n]) for n, S in C.scalings.items()
        }
        C.update(D, decay=0.25)
        for n, S in C.scalings.items():
            assert_close(S, expected[n])
    elif isinstance(C, AdamPreconditioner):  # the squared gradients, as torch.optim.Adam
        expected = [0.25 * v + 0.75 * g * g for v, g in zip(C.second_moment, D.gradient)]
        C.update(D, decay=0.25)
        for v, want in zip(C.second_moment, expected):
            assert_close(v, want, rtol=1e-15)
    else:
        expected = 0.25 * C.to_dense() + 0.75 * D.to_dense()
        C.update(D, decay=0.25)
        assert_close(C.to_dense(), expected)
    damping = 11.0
    C.refresh(damping)
    case = mlp_case(seed=0)
    restored = type(C).from_state_dict(case.model, case.loss_fn, C.state_dict())
    v = vector(C.layout.numel)
    assert torch.equal(restored.solve(v, damping), C.solve(v, damping))


@pytest.mark.parametrize("loss", LOSSES)
def test_exact_objects_equal_their_definitions(loss: str) -> None:
    case = mlp_case(loss, n=5)
    args = (case.model, case.loss_fn, case.X, case.y)
    assert_close(Hessian.from_batch(*args).to_dense(), curvature.hessian(*args))
    assert_close(GGN.from_batch(*args).to_dense(), curvature.ggn(*args))
    for kind in ("exact", "empirical"):
        assert_close(
            Fisher.from_batch(*args, kind=kind).to_dense(),
            curvature.fisher(*args, kind=kind),
        )


@pytest.mark.parametrize("loss", LOSSES)
def test_kfac_is_exact_for_one_example(loss: str) -> None:
    """The case where K-FAC is provably exact: one example, the Fisher's diagonal blocks."""
    case = mlp_case(loss, sizes=(4, 5, 3, 3), n=1)
    K = KFACApproximation.from_batch(case.model, case.loss_fn, case.X, case.y)
    F = Fisher.from_batch(case.model, case.loss_fn, case.X, case.y)
    assert_close(K.to_dense(), K.layout.block_diagonal(F.to_dense()))


@pytest.mark.parametrize("name", CLASSES)
def test_bad_vectors_and_damping_are_rejected(name: str) -> None:
    C = build(name)
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        C.matvec(torch.zeros(3))
    if isinstance(C, LBFGSOperator):  # damping 0 is the two-loop recursion
        for damping in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="damping must be a non-negative finite number"):
                C.solve(vector(C.layout.numel), damping)
        return
    for damping in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be a positive finite number"):
            C.solve(vector(C.layout.numel), damping)


def test_hessian_and_ggn_have_no_kind() -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match="has no Fisher kind"):
        Hessian.from_batch(case.model, case.loss_fn, case.X, case.y, kind="mc")
    with pytest.raises(ValueError, match="has no Fisher kind"):
        GGN.watch(case.model, case.loss_fn, kind="empirical", mc_samples=1, generator=None)


@pytest.mark.parametrize("name", ["hessian", "ggn", "saddle-free"])
def test_watcher_reads_the_labels_from_the_loss_call(name: str) -> None:
    cls = CLASSES[name][0]
    case = mlp_case("mse")
    watcher = cls.watch(case.model, case.loss_fn, kind="exact", mc_samples=1, generator=None)
    watcher.start((case.X,))
    output = case.model(case.X)
    watcher.finish(output)
    case.loss_fn(output, case.y)
    case.loss_fn(output, case.y + 1.0)  # only the first call after the pass counts
    estimate = watcher.estimate()
    assert_close(estimate.to_dense(), build(name, "mse").to_dense())
    with pytest.raises(RuntimeError, match="no labelled pass was recorded"):
        watcher.estimate()  # consumed
    watcher.remove()


def test_matrix_free_solve_uses_conjugate_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    import natlib.exact

    monkeypatch.setattr(natlib.exact, "DENSE_LIMIT", 10)
    C = build("fisher-exact")
    v = vector(C.layout.numel)
    x = C.solve(v, 0.1)
    assert C._dense is None  # never formed
    assert_close(C.matvec(x) + 0.1 * x, v, rtol=1e-9)


def test_matrix_free_refresh_and_update_keep_the_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond DENSE_LIMIT, refresh only records the damping and an update without averaging
    takes the batch's product over, so an optimiser never forms the matrix."""
    import natlib.exact

    monkeypatch.setattr(natlib.exact, "DENSE_LIMIT", 10)
    C, D = build("ggn", seed=0), build("ggn", seed=1)
    C.refresh(0.1)
    C.update(D, decay=0.0)
    assert C._dense is None and C.memory_bytes == 0 and C.damping == 0.1
    v = vector(C.layout.numel)
    x = C.solve(v, C.damping)
    assert C._dense is None
    assert_close(D.to_dense() @ x + 0.1 * x, v, rtol=1e-9)
