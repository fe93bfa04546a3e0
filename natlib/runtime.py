"""Seeding, default dtype, device and thread choice, shared by every notebook, test and
benchmark."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from natlib.checks import check_float_dtype, check_positive_int, check_seed

DEVICE_VARIABLE = "NATLIB_DEVICE"


def device() -> torch.device:
    """The device natlib computes on: CUDA when available, else the CPU.

    The environment variable ``NATLIB_DEVICE`` (``cpu``, ``cuda`` or ``cuda:N``) overrides
    the choice; asking for CUDA on a machine without a GPU is an error, not a silent fallback.
    """
    requested = os.environ.get(DEVICE_VARIABLE, "").strip()
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested != "cpu" and requested != "cuda" and not requested.startswith("cuda:"):
        raise ValueError(
            f"{DEVICE_VARIABLE}={requested!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'."
        )
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"{DEVICE_VARIABLE}={requested!r} asks for a GPU, but torch sees no CUDA device; "
            f"set {DEVICE_VARIABLE}=cpu or unset it."
        )
    return torch.device(requested)


def setup(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.device:
    """Make a run reproducible and return the device to compute on.

    Seeds Python's, NumPy's and torch's generators (CUDA included), sets torch's default
    dtype and asks torch for deterministic algorithms where they exist. It loads no
    matplotlib: importing :mod:`natlib.plotting` installs the book's figure style.

    Args:
        seed: an integer in ``[0, 2**32 - 1]``.
        dtype: ``torch.float64`` (exactness checks) or ``torch.float32`` (speed).

    Returns:
        ``natlib.device()``.

    Raises:
        TypeError: if ``seed`` is not an integer.
        ValueError: if ``seed`` or ``dtype`` is out of range, or ``NATLIB_DEVICE`` is not
            supported.
        RuntimeError: if ``NATLIB_DEVICE`` asks for CUDA on a machine without it.
    """
    check_seed(seed)
    check_float_dtype(dtype)
    chosen = device()
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))
    torch.set_default_dtype(dtype)
    if chosen.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    return chosen


def threads(count: int) -> contextlib.AbstractContextManager[None]:
    """Run the block with ``count`` torch threads and restore the previous count after it.

    Timings on one thread, read on the process's CPU clock, are what other processes on a
    shared machine disturb least; small per-example loops are also faster on one thread.
    """
    check_positive_int("threads", count)
    return _temporarily(torch.get_num_threads, torch.set_num_threads, count)


def default_dtype(dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Run the block with torch's default dtype ``dtype`` and restore the previous one after
    it: a model drawn inside is the same whatever the caller's default."""
    check_float_dtype(dtype)
    return _temporarily(torch.get_default_dtype, torch.set_default_dtype, dtype)


@contextlib.contextmanager
def _temporarily(
    get: Callable[[], Any], set_to: Callable[[Any], None], value: Any
) -> Iterator[None]:
    """Set a global with ``set_to(value)`` for the block, then restore what ``get`` gave."""
    previous = get()
    set_to(value)
    try:
        yield
    finally:
        set_to(previous)
