"""Argument and fault checks shared by every module, each written once.

Every check raises a ``ValueError`` (``TypeError`` for a value of the wrong type) whose
message names the argument and what is accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, get_args

import torch
from torch import Tensor


def check_finite(tensor: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``tensor`` holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or Inf.")


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


def check_positive_int(name: str, value: Any) -> None:
    """``value`` is an integer (Python or NumPy) of at least one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_choice(name: str, value: Any, choices: Any) -> None:
    """``value`` is one of the strings of the ``Literal`` type ``choices``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not supported; use one of {allowed}.")
