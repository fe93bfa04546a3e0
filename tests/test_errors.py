"""Bad input and injected faults across natlib's public API (issue 10).

Every case asserts the exception type, a fragment of its message (the cause and what is
accepted), and that nothing was changed when it was raised: model parameters and buffers,
and the optimiser's whole ``state_dict`` (step counter, curvature, generator included).
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from cases import mlp_case
from torch import nn

import natlib
from natlib import curvature, factors, linalg, problems, reparam
from natlib.__main__ import main
from natlib.exact import Fisher
from natlib.kfac import KFACApproximation
from natlib.layout import ParamLayout
from natlib.optim import KFAC, NGD, train

pytestmark = pytest.mark.usefixtures("float64")
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------- helpers


def _state(obj: Any) -> Any:
    """A deep copy of what must not change: a module's parameters and buffers, an optimiser's
    or a curvature estimate's ``state_dict``."""
    return copy.deepcopy(obj.state_dict())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, z) for x, z in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def raises_unchanged(
    error: type[Exception], match: str, fn: Callable[[], Any], *watched: Any
) -> pytest.ExceptionInfo:
    """``fn()`` raises ``error`` matching ``match`` and leaves every watched object as it was."""
    before = [_state(w) for w in watched]
    with pytest.raises(error, match=match) as info:
        fn()
    for w, state in zip(watched, before):
        assert _same(state, _state(w)), f"{type(w).__name__} was changed by the failed call"
    return info


def _step(optimizer, model, loss_fn, X, y) -> None:
    optimizer.zero_grad()
    loss_fn(model(X), y).backward()
    optimizer.step()


def _trained(optimizer_class=KFAC, loss="ce", **options):
    """A small model, its optimiser after one good step, and the batch."""
    case = mlp_case(loss)
    if optimizer_class is KFAC:
        options.setdefault("T_inv", 1)
    optimizer = optimizer_class(case.model, case.loss_fn, damping=0.1, **options)
    _step(optimizer, case.model, case.loss_fn, case.X, case.y)
    return case.model, case.loss_fn, optimizer, case.X, case.y


def _backward(optimizer, model, loss_fn, X, y) -> None:
    optimizer.zero_grad()
    loss_fn(model(X), y).backward()


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return (self.linear(x),)


# ---------------------------------------------------------------------- batches


def _bad_batch(name: str):
    """``(model, loss_fn, X, y, error, match)`` for one kind of bad batch."""
    case = mlp_case("ce")
    model, loss_fn, X, y = case.model, case.loss_fn, case.X, case.y
    mse = mlp_case("mse")
    bce = mlp_case("bce")
    if name == "empty batch":
        return model, loss_fn, X[:0], y[:0], ValueError, r"X of shape \(0, 4\) holds no examples"
    if name == "list X":
        return model, loss_fn, X.tolist(), y, TypeError, "X must be a torch.Tensor, got list"
    if name == "list y":
        return model, loss_fn, X, y.tolist(), TypeError, "y must be a torch.Tensor, got list"
    if name == "float32 X, float64 model":
        return (
            model,
            loss_fn,
            X.float(),
            y,
            ValueError,
            "X is torch.float32 but the model's parameters are torch.float64",
        )
    if name == "X on another device":
        X_meta = torch.empty(X.shape, device="meta")
        return model, loss_fn, X_meta, y, ValueError, "X is on meta but the model's parameters"
    if name == "int32 labels":
        return (
            model,
            loss_fn,
            X,
            y.int(),
            ValueError,
            r"dtype int64 \(torch.long\).*got torch.int32",
        )
    if name == "labels out of range":
        return model, loss_fn, X, y + 3, ValueError, r"class indices must lie in \[0, 3\)"
    if name == "NaN target":
        y_nan = mse.y.clone()
        y_nan[1, 2] = NAN
        return mse.model, mse.loss_fn, mse.X, y_nan, ValueError, "the target y contains NaN"
    if name == "BCE target 2.0":
        return (
            bce.model,
            bce.loss_fn,
            bce.X,
            torch.full_like(bce.y, 2.0),
            ValueError,
            r"targets in \[0, 1\] \(probabilities\), got values in \[2, 2\]",
        )
    if name == "ignore_index":
        return (
            model,
            nn.CrossEntropyLoss(ignore_index=1),
            X,
            y,
            ValueError,
            r"ignore_index=1\) is not supported",
        )
    if name == "one class":
        one = problems.mlp([4, 1], seed=0)
        return one, loss_fn, X, torch.zeros_like(y), ValueError, "needs at least 2 classes"
    if name == "tuple output":
        return _TupleOutput(), loss_fn, X, y, TypeError, "model output must be a torch.Tensor"
    if name == "BatchNorm in training mode":
        bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
        return bn, loss_fn, X, y, ValueError, r"'1' \(BatchNorm1d\) is in training mode.*eval\(\)"
    if name == "Dropout in training mode":
        dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
        return dropout, loss_fn, X, y, ValueError, r"'1' \(Dropout\).*call model.eval\(\)"
    if name == "X and y of different lengths":
        return model, loss_fn, X, y[:5], ValueError, "different numbers of examples: 7 and 5"
    raise AssertionError(name)


BAD_BATCHES = [
    "empty batch",
    "list X",
    "list y",
    "float32 X, float64 model",
    "X on another device",
    "int32 labels",
    "labels out of range",
    "NaN target",
    "BCE target 2.0",
    "ignore_index",
    "one class",
    "tuple output",
    "BatchNorm in training mode",
    "Dropout in training mode",
    "X and y of different lengths",
]
CURVATURES = {
    "flat_gradient": curvature.flat_gradient,
    "hessian": curvature.hessian,
    "ggn": curvature.ggn,
    "fisher": curvature.fisher,
    "empirical fisher": lambda *a: curvature.fisher(*a, kind="empirical"),
}


@pytest.mark.parametrize("function", CURVATURES)
@pytest.mark.parametrize("bad", BAD_BATCHES)
def test_bad_batches_are_rejected_by_exact_curvature(function, bad):
    model, loss_fn, X, y, error, match = _bad_batch(bad)
    raises_unchanged(error, match, lambda: CURVATURES[function](model, loss_fn, X, y), model)


@pytest.mark.parametrize(
    "bad",
    [
        "empty batch",
        "list X",
        "float32 X, float64 model",
        "X on another device",
        "int32 labels",
        "BCE target 2.0",
        "one class",
        "tuple output",
        "Dropout in training mode",
    ],
)
def test_bad_batches_are_rejected_by_kfac(bad):
    model, loss_fn, X, y, error, match = _bad_batch(bad)
    raises_unchanged(
        error,
        match,
        lambda: KFACApproximation.from_batch(model, loss_fn, X, y, kind="empirical"),
        model,
    )


def test_batchnorm_statistics_are_untouched_by_kfac():
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3))
    case = mlp_case("ce")
    raises_unchanged(
        ValueError,
        r"'1' \(BatchNorm1d\) is in training mode.*call model.eval\(\)",
        lambda: KFACApproximation.from_batch(bn, case.loss_fn, case.X),
        bn,
    )
    bn.eval()
    KFACApproximation.from_batch(bn, case.loss_fn, case.X)  # evaluation mode is accepted


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (nn.L1Loss(), "L1Loss is not supported; supported: CrossEntropyLoss"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), "class weights or label smoothing"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "class weights or label smoothing"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "weight or pos_weight"),
        (nn.MSELoss(reduction="none"), "is not supported; supported"),
    ],
)
def test_unsupported_losses_are_named(loss_fn, match):
    case = mlp_case("mse")
    raises_unchanged(
        ValueError, match, lambda: curvature.fisher(case.model, loss_fn, case.X), case.model
    )


# ---------------------------------------------------------------------- natural gradient


@pytest.mark.parametrize(
    "options, match",
    [
        ({"damping": INF}, "damping must be a positive finite number, got inf"),
        ({"damping": 0.0}, "damping must be a positive finite number, got 0.0"),
        ({"damping": 1e-3, "tol": NAN}, "tol must be a positive finite number, got nan"),
        ({"damping": 1e-3, "max_iter": 0}, "max_iter must be a positive integer, got 0"),
    ],
)
def test_natural_gradient_checks_its_options(options, match):
    case = mlp_case("ce")
    raises_unchanged(
        ValueError,
        match,
        lambda: curvature.natural_gradient(case.model, case.loss_fn, case.X, case.y, **options),
        case.model,
    )


def test_natural_gradient_in_float32_converges_with_its_default_tolerance():
    case = mlp_case("ce")
    model = case.model.float()
    d = curvature.natural_gradient(model, case.loss_fn, case.X.float(), case.y, damping=1e-3)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()


# ---------------------------------------------------------------------- optimisers: construction


@pytest.mark.parametrize(
    "optimizer_class, options, error, match",
    [
        (KFAC, {"lr": INF}, ValueError, "lr must be a non-negative finite number, got inf"),
        (KFAC, {"lr": -0.1}, ValueError, "lr must be a non-negative finite number"),
        (KFAC, {"weight_decay": NAN}, ValueError, "weight_decay must be a non-negative finite"),
        (KFAC, {"damping": 0.0}, ValueError, "damping must be a positive finite number"),
        (KFAC, {"momentum": 1.0}, ValueError, r"momentum must lie in \[0, 1\)"),
        (KFAC, {"ema_decay": NAN}, ValueError, r"ema_decay must lie in \[0, 1\)"),
        (KFAC, {"T_inv": 0}, ValueError, "T_inv must be a positive integer"),
        (KFAC, {"T_cov": 1.5}, ValueError, "T_cov must be a positive integer"),
        (KFAC, {"kl_clip": -1.0}, ValueError, "kl_clip must be a positive finite number"),
        (KFAC, {"lr": "0.1"}, TypeError, "lr must be a real number"),
        (KFAC, {"kind": "type-1"}, ValueError, "Fisher kind 'type-1' is not supported"),
        (KFAC, {"damping_mode": "tikhonov"}, ValueError, "damping mode 'tikhonov' is not"),
        (KFAC, {"mc_samples": 0}, ValueError, "mc_samples must be a positive integer"),
        (NGD, {"lr": NAN}, ValueError, "lr must be a non-negative finite number, got nan"),
        (NGD, {"damping": INF}, ValueError, "damping must be a positive finite number, got inf"),
    ],
)
def test_optimisers_check_hyper_parameters_at_construction(optimizer_class, options, error, match):
    case = mlp_case("ce")
    raises_unchanged(
        error, match, lambda: optimizer_class(case.model, case.loss_fn, **options), case.model
    )


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("optimizer_class", [KFAC, NGD])
def test_tied_weights_are_rejected(optimizer_class):
    model = _Tied()
    raises_unchanged(
        ValueError,
        r"'b.weight' is the same tensor as 'a.weight' \(tied weights\)",
        lambda: optimizer_class(model, nn.MSELoss()),
        model,
    )


def test_kfac_names_a_layer_it_does_not_support():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    raises_unchanged(
        ValueError,
        r"'1' \(LayerNorm\) has parameters, but the Kronecker-factored methods here \(K-FAC, ",
        lambda: KFAC(model, nn.MSELoss()),
        model,
    )


# ---------------------------------------------------------------------- optimisers: step


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("lr", NAN, "lr must be a non-negative finite number, got nan"),
        ("lr", INF, "lr must be a non-negative finite number, got inf"),
        ("damping", INF, "damping must be a positive finite number, got inf"),
        ("damping", 0.0, "damping must be a positive finite number, got 0.0"),
        ("momentum", NAN, r"momentum must lie in \[0, 1\)"),
        ("weight_decay", -1.0, "weight_decay must be a non-negative finite number"),
    ],
)
@pytest.mark.parametrize("optimizer_class", [KFAC, NGD])
def test_hyper_parameters_changed_after_construction_are_checked_at_step(
    optimizer_class, key, value, match
):
    model, loss_fn, optimizer, X, y = _trained(optimizer_class)
    optimizer.param_groups[0][key] = value
    _backward(optimizer, model, loss_fn, X, y)
    raises_unchanged(ValueError, match, optimizer.step, model, optimizer)


@pytest.mark.parametrize("optimizer_class", [KFAC, NGD])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_gradients_name_the_parameter(optimizer_class, value):
    model, loss_fn, optimizer, X, y = _trained(optimizer_class)
    _backward(optimizer, model, loss_fn, X, y)
    model[2].bias.grad[0] = value
    raises_unchanged(
        ValueError,
        "the gradient of parameter '2.bias' contains NaN or Inf",
        optimizer.step,
        model,
        optimizer,
    )


@pytest.mark.parametrize("optimizer_class", [KFAC, NGD])
def test_a_missing_gradient_is_named(optimizer_class):
    model, loss_fn, optimizer, X, y = _trained(optimizer_class)
    optimizer.zero_grad()
    model(X)
    raises_unchanged(RuntimeError, "'0.weight' has no gradient", optimizer.step, model, optimizer)


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_a_nan_model_output_is_caught_in_the_forward_pass(kind):
    model, loss_fn, optimizer, X, y = _trained(KFAC, kind=kind)
    X_nan = X.clone()
    X_nan[2, 1] = NAN
    raises_unchanged(
        ValueError, "the model output contains NaN or Inf", lambda: model(X_nan), model, optimizer
    )


def test_nan_factors_name_the_layer(monkeypatch):
    model, loss_fn, optimizer, X, y = _trained(KFAC)
    monkeypatch.setattr(factors, "input_factor", lambda a, bias: torch.full((5, 5), NAN))
    _backward(optimizer, model, loss_fn, X, y)
    raises_unchanged(
        ValueError, "factor A of layer '0' contains NaN or Inf", optimizer.step, model, optimizer
    )


def _fail(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")


@pytest.mark.parametrize(
    "dtype, match",
    [
        (torch.float64, r"eigendecomposition of factor A of layer '0' did not converge\."),
        (torch.float32, "factor A of layer '0' did not converge, in float64 either"),
    ],
)
def test_an_injected_eigendecomposition_failure_names_the_layer(monkeypatch, dtype, match):
    case = mlp_case("ce")
    model, X = case.model.to(dtype), case.X.to(dtype)
    optimizer = KFAC(model, case.loss_fn, damping=0.1, T_inv=1)
    _step(optimizer, model, case.loss_fn, X, case.y)
    _backward(optimizer, model, case.loss_fn, X, case.y)
    monkeypatch.setattr(torch.linalg, "eigh", _fail)
    raises_unchanged(ValueError, match, optimizer.step, model, optimizer)
    monkeypatch.undo()  # the optimiser goes on from where it was
    _step(optimizer, model, case.loss_fn, X, case.y)
    assert optimizer.steps == 2


def test_a_failure_on_the_first_step_leaves_no_curvature(monkeypatch):
    case = mlp_case("ce")
    optimizer = KFAC(case.model, case.loss_fn, damping=0.1)
    _backward(optimizer, case.model, case.loss_fn, case.X, case.y)
    monkeypatch.setattr(torch.linalg, "eigh", _fail)
    raises_unchanged(ValueError, "did not converge", optimizer.step, case.model, optimizer)
    assert optimizer.curvature is None and optimizer.steps == 0


def test_nan_eigenvalues_are_caught_after_the_float64_retry(monkeypatch):
    model, loss_fn, optimizer, X, y = _trained(KFAC)
    nan_eigh = lambda M: (torch.full(M.shape[:1], NAN, dtype=M.dtype), M)  # noqa: E731
    monkeypatch.setattr(torch.linalg, "eigh", nan_eigh)
    _backward(optimizer, model, loss_fn, X, y)
    raises_unchanged(
        ValueError,
        "the eigenvalues of factor A of layer '0' contains NaN or Inf",
        optimizer.step,
        model,
        optimizer,
    )


def test_an_overflowing_float32_inverse_names_the_layer():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).float()
    factor = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float32))
    approx = KFACApproximation(
        ParamLayout.of(model, kronecker=True),
        {"0": (factor, factor.clone())},
        1,
        1,
        damping_mode="exact",
    )
    approx.refresh(1.0)
    raises_unchanged(
        ValueError,
        "the damped inverse of layer '0' contains NaN or Inf",
        lambda: approx.refresh(1e-42),  # 1 / (0 + 1e-42) overflows float32
        approx,
    )


@pytest.mark.parametrize("info", [1, 3])
def test_an_injected_cholesky_failure_in_ngd_is_explained(monkeypatch, info):
    model, loss_fn, optimizer, X, y = _trained(NGD)
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda C: (cholesky_ex(C)[0], torch.tensor(info))
    )
    _backward(optimizer, model, loss_fn, X, y)
    raises_unchanged(
        ValueError,
        "damped Fisher with damping 0.1 is not positive definite.*raise the damping or use float64",
        optimizer.step,
        model,
        optimizer,
    )


def test_ngd_with_dropout_in_training_mode_asks_for_eval():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    case = mlp_case("ce")
    optimizer = NGD(model, case.loss_fn)
    _backward(optimizer, model, case.loss_fn, case.X, case.y)
    raises_unchanged(
        ValueError, r"\(Dropout\) is in training mode", optimizer.step, model, optimizer
    )


def test_step_without_a_recorded_forward_pass():
    model, loss_fn, optimizer, X, y = _trained(KFAC)
    with torch.no_grad():
        model(X)  # not recorded: no gradient flows
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    raises_unchanged(RuntimeError, "no forward pass was recorded", optimizer.step, model, optimizer)


# ---------------------------------------------------------------------- optimisers: state


def _saved(**options) -> dict:
    *_, optimizer, _, _ = _trained(KFAC, **options)
    return optimizer.state_dict()


@pytest.mark.parametrize(
    "saved_with",
    [{"damping_mode": "exact"}, {"kind": "mc"}, {"kind": "empirical"}, {"mc_samples": 2}],
)
def test_a_state_dict_of_other_settings_is_rejected(saved_with):
    state = _saved(**saved_with)
    model, _, optimizer, _, _ = _trained(KFAC)
    raises_unchanged(
        ValueError,
        "the state_dict was saved with settings",
        lambda: optimizer.load_state_dict(state),
        model,
        optimizer,
    )


def test_a_state_dict_of_another_width_is_rejected():
    wide = mlp_case("ce", sizes=(4, 6, 3))
    other = KFAC(wide.model, wide.loss_fn, damping=0.1)
    _step(other, wide.model, wide.loss_fn, wide.X, wide.y)
    model, _, optimizer, _, _ = _trained(KFAC)
    raises_unchanged(
        ValueError,
        r"saved with settings.*\('0.weight', \(6, 4\)\)",
        lambda: optimizer.load_state_dict(other.state_dict()),
        model,
        optimizer,
    )


def test_a_plain_torch_state_dict_is_rejected():
    model, _, optimizer, _, _ = _trained(KFAC)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    raises_unchanged(
        ValueError,
        "not saved by a natlib optimiser",
        lambda: optimizer.load_state_dict(plain),
        model,
        optimizer,
    )


# ---------------------------------------------------------------------- copies of hooked models


@pytest.mark.parametrize("copy_of", ["deepcopy", "pickle"])
def test_a_copied_model_with_kfac_attached_is_a_plain_model(copy_of):
    model, loss_fn, optimizer, X, y = _trained(KFAC)
    if copy_of == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        twin = pickle.loads(pickle.dumps(model))
    before = _state(optimizer)
    with torch.no_grad():
        assert torch.equal(twin(X), model(X))
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    _step(sgd, twin, loss_fn, X, y)  # trains as a plain model; K-FAC sees none of it
    assert _same(before, _state(optimizer))
    own = KFAC(twin, loss_fn, damping=0.1)  # and takes an optimiser of its own
    _step(own, twin, loss_fn, X, y)
    _step(optimizer, model, loss_fn, X, y)
    assert own.steps == 1 and optimizer.steps == 2


def test_trajectory_copies_a_model_with_kfac_attached():
    model, loss_fn, optimizer, X, y = _trained(KFAC)
    before = _state(optimizer)
    path = reparam.trajectory(model, loss_fn, X, y, "ngd", lr=0.1, steps=2, damping=1e-3)
    assert path.shape == (3, 43) and torch.isfinite(path).all()
    assert _same(before, _state(optimizer))


# ---------------------------------------------------------------------- reparam


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: reparam.trajectory(*c, "gd", lr=NAN), "lr must be a positive finite number"),
        (lambda c: reparam.trajectory(*c, "gd", lr=0.0), "lr must be a positive finite number"),
        (lambda c: reparam.trajectory(*c, "gd", lr=INF), "lr must be a positive finite number"),
        (lambda c: reparam.trajectory(*c, "gd", 0.1, steps=0), "steps must be a positive"),
        (lambda c: reparam.trajectory(*c, "sgd", 0.1), "rule 'sgd' is not supported; use one"),
        (lambda c: reparam.direction(*c, "ngd", damping=-1.0), "damping must be a non-negative"),
        (lambda c: reparam.direction(*c, "ngd", damping=NAN), "damping must be a non-negative"),
        (
            lambda c: reparam.compare(c[0], reparam.Sinh(), *c[1:], "gd", NAN),
            "lr must be a positive finite number, got nan",
        ),
        (
            lambda c: reparam.compare_step_sizes(c[0], reparam.Sinh(), *c[1:], "gd", [0.1, 0.0]),
            "step size must be a positive finite number, got 0.0",
        ),
        (
            lambda c: reparam.compare_step_sizes(c[0], reparam.Sinh(), *c[1:], "gd", [NAN]),
            "step size must be a positive finite number, got nan",
        ),
    ],
)
def test_reparam_checks_step_sizes_and_rules(call, match):
    case = mlp_case("ce")
    batch = (case.model, case.loss_fn, case.X, case.y)
    raises_unchanged(ValueError, match, lambda: call(batch), case.model)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"eval_every": 0}, "eval_every must be a positive integer, got 0"),
        ({"steps": -1}, "steps must be an integer of at least 0, got -1"),
        ({"y": slice(3)}, r"X of shape \(7, 4\) and y of shape \(3,\) hold different numbers"),
    ],
)
def test_train_checks_its_arguments(options, match):
    case = mlp_case("ce")
    sgd = torch.optim.SGD(case.model.parameters(), lr=0.1)
    y = case.y[options.pop("y", slice(None))]
    arguments = {"steps": 2, **options}
    raises_unchanged(
        ValueError,
        match,
        lambda: train(case.model, sgd, case.loss_fn, case.X, y, **arguments),
        case.model,
        sgd,
    )


# ---------------------------------------------------------------------- problems and runtime


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: problems.load("digits", dtype=torch.int64), ValueError, "dtype torch.int64 is"),
        (lambda: problems.load("mnist"), ValueError, "unknown problem 'mnist'; supported: digits"),
        (lambda: problems.load("digits", seed=-1), ValueError, r"seed must be an integer in \["),
        (lambda: problems.load("digits", seed="3"), TypeError, r"seed must be an integer in \["),
        (lambda: problems.load("digits", seed=1.5), TypeError, r"seed must be an integer in \["),
        (
            lambda: problems.kunstner_linear_regression(n=10.5),
            ValueError,
            "n must be an integer of at least 2, got 10.5",
        ),
        (
            lambda: problems.logistic_toy(n=1),
            ValueError,
            "n must be an integer of at least 2, got 1",
        ),
        (lambda: problems.mlp([4]), ValueError, "sizes must be at least two positive integers"),
        (lambda: problems.mlp([4, 2.5]), ValueError, "at least two positive integers"),
        (lambda: problems.mlp([4, 3], activation="gelu"), ValueError, "activation 'gelu' is not"),
        (lambda: natlib.setup(seed=-1), ValueError, r"seed must be an integer in \[0, 4294967295"),
        (lambda: natlib.setup(seed=0.5), TypeError, r"seed must be an integer in \[0, 4294967295"),
        (lambda: natlib.setup(dtype=torch.int32), ValueError, "use torch.float32 or torch.float64"),
    ],
)
def test_problems_and_setup_name_what_they_accept(call, error, match):
    default = torch.get_default_dtype()
    with pytest.raises(error, match=match):
        call()
    assert torch.get_default_dtype() == default


def test_numpy_integers_are_seeds_and_sizes_everywhere():
    a = problems.load("logistic-toy", seed=np.int64(3), n=np.int64(10))
    b = problems.load("logistic-toy", seed=3, n=10)
    assert torch.equal(a.X_train, b.X_train)
    model = problems.mlp([np.int64(4), 3], seed=np.int64(1))
    assert model[0].in_features == 4


# ---------------------------------------------------------------------- linear algebra


def test_eigh_names_what_is_not_finite():
    with pytest.raises(ValueError, match="factor G of layer 'x' contains NaN or Inf"):
        linalg.eigh(torch.tensor([[1.0, NAN], [NAN, 1.0]]), "factor G of layer 'x'")


def test_conjugate_gradient_checks_its_tolerance():
    with pytest.raises(ValueError, match="tol must be a positive finite number, got nan"):
        linalg.conjugate_gradient(lambda v: v, torch.ones(3), tol=NAN)


# ---------------------------------------------------------------------- warnings


def test_the_pseudo_inverse_fallback_warns_when_damping_asked_for_an_inverse():
    case = mlp_case("ce")
    with pytest.warns(RuntimeWarning, match="damped Hessian .* not numerically positive"):
        reparam.direction(case.model, case.loss_fn, case.X, case.y, "newton", damping=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damping: the pseudo-inverse is what was asked for
        reparam.direction(case.model, case.loss_fn, case.X, case.y, "newton")


def test_an_ill_conditioned_float32_fisher_warns():
    case = mlp_case("ce", n=2)  # rank 4 of 43: the damping sets the condition number
    model32 = copy.deepcopy(case.model).float()
    fisher = Fisher.from_batch(model32, case.loss_fn, case.X.float())
    v = torch.ones(43, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="float32 has estimated condition number 1.0e"):
        fisher.solve(v, damping=1e-7)  # condition about 1e7: the solve is off by about 15 %
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher.solve(v, damping=1e-3)  # condition about 1e3: quiet
        exact64 = Fisher.from_batch(case.model, case.loss_fn, case.X)
        exact64.solve(v.double(), damping=1e-7)  # float64: quiet


# ---------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["notebooks", "missing.ipynb"], {}, "missing.ipynb is not a notebook file"),
        (["notebooks", "--timeout", "0"], {}, "--timeout must be a positive number"),
        (["bench", "kfac"], {"NATLIB_DEVICE": "tpu"}, "NATLIB_DEVICE='tpu' is not supported"),
        (["bench", "kfac", "--device", "gpu"], {}, "invalid choice: 'gpu'"),
        (["bench", "kfac", "--threads", "0"], {}, "--threads must be a positive integer"),
    ],
)
def test_the_command_line_reports_bad_arguments_without_a_traceback(
    argv, env, message, monkeypatch, capsys
):
    from natlib import bench

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bench, "kfac_benchmark", lambda device=None, **_: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
