"""Argument and fault checks shared by every module, each written once.

Every check raises a ``ValueError`` (``TypeError`` for a value of the wrong type) whose
message names the argument and what is accepted; the two ``warn_`` functions warn instead.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, get_args

import torch
from torch import Tensor, nn

FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding accepts [0, 2**32 - 1]
FLOAT32_CONDITION_LIMIT = 1e6  # above it a float32 solve loses about 10 % of its accuracy
# Modules whose forward pass differs between training and evaluation mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class NonFiniteError(ValueError):
    """A gradient, curvature or step holds NaN or Inf (:func:`check_finite`): in training, the
    sign of a diverged run."""


def is_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    NaN and Inf propagate through a sum, so one reduction (about 40 times cheaper than an
    element-wise test on the CPU) settles the common case; only a sum that is not finite,
    which overflow of finite entries can also cause, falls back to the element-wise test.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` (a ``ValueError``) naming ``what`` if ``tensor`` holds
    NaN or Inf."""
    if not is_finite(tensor):
        raise NonFiniteError(f"{what} contains NaN or Inf.")


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    return float(value)


def check_positive(name: str, value: Any) -> None:
    """``value`` is a finite number above zero (damping, tolerances, learning rates of 0 are
    rejected with it)."""
    if not (math.isfinite(_real(name, value)) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def check_non_negative(name: str, value: Any) -> None:
    """``value`` is a finite number at least zero."""
    if not (math.isfinite(_real(name, value)) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}.")


def check_unit_interval(name: str, value: Any) -> None:
    """``value`` lies in ``[0, 1)`` (decays and momenta)."""
    if not 0.0 <= _real(name, value) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")


def check_integer(name: str, value: Any, minimum: int) -> None:
    """``value`` is an integer (Python or NumPy) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        accepted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ValueError(f"{name} must be {accepted}, got {value!r}.")


def check_positive_int(name: str, value: Any) -> None:
    """``value`` is an integer (Python or NumPy) of at least one."""
    check_integer(name, value, 1)


def check_seed(seed: Any) -> None:
    """``seed`` is an integer (Python or NumPy) in ``[0, 2**32 - 1]``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}.")


def check_float_dtype(dtype: Any) -> None:
    """``dtype`` is ``torch.float32`` or ``torch.float64`` (data and models are real)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use torch.float32 or torch.float64.")


def check_tensor(name: str, value: Any) -> None:
    """``value`` is a ``torch.Tensor`` (not a list, array or tuple of tensors)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")


def check_batch(model: nn.Module, X: Any, y: Any = None) -> None:
    """``X`` (and ``y``) are tensors on the model's device, ``X`` non-empty and, when
    floating-point, of the model's dtype; the model is in evaluation mode where that matters
    (checked before any forward pass, so nothing is changed)."""
    check_tensor("X", X)
    if y is not None:
        check_tensor("y", y)
    if X.ndim == 0 or X.shape[0] == 0:
        raise ValueError(
            f"the batch X of shape {tuple(X.shape)} holds no examples; pass at least one."
        )
    parameter = next(model.parameters(), None)
    if parameter is not None:
        if X.is_floating_point() and X.dtype != parameter.dtype:
            raise ValueError(
                f"X is {X.dtype} but the model's parameters are {parameter.dtype}; convert one "
                "to the other (X.to(dtype) or model.to(dtype))."
            )
        for name, tensor in (("X", X), ("y", y)):
            if tensor is not None and tensor.device != parameter.device:
                raise ValueError(
                    f"{name} is on {tensor.device} but the model's parameters are on "
                    f"{parameter.device}; move them to one device."
                )
    check_eval_mode(model)


def check_eval_mode(model: nn.Module) -> None:
    """No BatchNorm or Dropout layer of ``model`` is in training mode (its output would
    depend on the batch or on chance, and BatchNorm would update its running statistics)."""
    for name, module in model.named_modules():
        if isinstance(module, _MODE_DEPENDENT) and module.training:
            raise ValueError(
                f"layer {name or '<root>'!r} ({type(module).__name__}) is in training mode, "
                "where curvature is not defined per example; call model.eval() first."
            )


def check_choice(name: str, value: Any, choices: Any) -> None:
    """``value`` is one of the strings of the ``Literal`` type ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not supported; use one of {allowed}.")


def warn_pseudo_inverse(what: str, damping: float) -> None:
    """Warn that the damped ``what`` was not numerically positive definite, so a solve fell
    back to the pseudo-inverse."""
    warnings.warn(
        f"the damped {what} (damping {damping:g}) is not numerically positive definite; "
        "solving with its pseudo-inverse instead. Raise the damping for an inverse.",
        RuntimeWarning,
        stacklevel=3,
    )


def warn_float32_condition(estimate: float, what: str) -> None:
    """Warn when a float32 matrix's estimated condition number exceeds
    ``FLOAT32_CONDITION_LIMIT`` (1e6): its solves then lose 10 % or more."""
    if estimate > FLOAT32_CONDITION_LIMIT:
        warnings.warn(
            f"the {what} in float32 has estimated condition number {estimate:.1e} > "
            f"{FLOAT32_CONDITION_LIMIT:.0e}; its solve may be off by 10 % or more. Use float64 "
            "or raise the damping.",
            RuntimeWarning,
            stacklevel=3,
        )
