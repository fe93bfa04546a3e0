"""natlib.checks: each check accepts what it names and rejects the rest with that name."""

import numpy as np
import pytest
import torch

from natlib.checks import (
    check_choice,
    check_float_dtype,
    check_integer,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_seed,
    check_tensor,
    check_unit_interval,
    is_finite,
)
from natlib.losses import FisherKind


def test_accepted_values() -> None:
    check_positive("damping", 1e-3)
    check_positive("damping", np.float64(2.0))
    check_non_negative("lr", 0)
    check_unit_interval("momentum", 0.0)
    check_positive_int("T_inv", np.int64(3))
    check_choice("Fisher kind", "mc", FisherKind)


@pytest.mark.parametrize(
    "check, value, error, message",
    [
        (check_positive, 0.0, ValueError, "damping must be a positive finite number, got 0.0"),
        (check_positive, float("inf"), ValueError, "positive finite number, got inf"),
        (check_positive, float("nan"), ValueError, "positive finite number, got nan"),
        (check_positive, "1", TypeError, "damping must be a real number"),
        (check_positive, True, TypeError, "damping must be a real number"),
        (check_non_negative, -1.0, ValueError, "damping must be a non-negative finite number"),
        (check_non_negative, float("nan"), ValueError, "non-negative finite number, got nan"),
        (check_unit_interval, 1.0, ValueError, r"damping must lie in \[0, 1\), got 1.0"),
        (check_unit_interval, float("nan"), ValueError, "must lie in"),
        (check_positive_int, 0, ValueError, "damping must be a positive integer, got 0"),
        (check_positive_int, 2.0, ValueError, "positive integer, got 2.0"),
        (check_positive_int, True, ValueError, "positive integer, got True"),
    ],
)
def test_rejected_values_name_the_argument(check, value, error, message) -> None:
    with pytest.raises(error, match=message):
        check("damping", value)


def test_choice_lists_what_is_supported() -> None:
    with pytest.raises(ValueError, match=r"kind 'type-2' is not supported; use one of \('exact'"):
        check_choice("kind", "type-2", FisherKind)


def test_integers_seeds_dtypes_and_tensors() -> None:
    check_integer("n", np.int64(2), 2)
    check_seed(np.uint32(2**32 - 1))
    check_float_dtype(torch.float32)
    check_tensor("X", torch.zeros(1))
    with pytest.raises(ValueError, match="n must be an integer of at least 2, got 1"):
        check_integer("n", 1, 2)
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 4294967295\]"):
        check_seed(np.float64(1.0))
    with pytest.raises(ValueError, match="got 4294967296"):
        check_seed(2**32)
    with pytest.raises(ValueError, match="torch.float16 is not supported"):
        check_float_dtype(torch.float16)
    with pytest.raises(TypeError, match="X must be a torch.Tensor, got ndarray"):
        check_tensor("X", np.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_finite_sees_every_nan_and_inf_and_survives_overflowing_sums(dtype) -> None:
    big = torch.finfo(dtype).max
    assert is_finite(torch.tensor([big, big], dtype=dtype))  # the sum overflows, entries don't
    assert is_finite(torch.tensor([big, -big, 1.0], dtype=dtype))
    assert is_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 3, 6):
            x = torch.ones(7, dtype=dtype)
            x[where] = bad
            assert not is_finite(x)
    assert not is_finite(torch.tensor([float("inf"), -float("inf")], dtype=dtype))
    assert not is_finite(torch.tensor([big, big, float("nan")], dtype=dtype))
