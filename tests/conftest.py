"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def float64():
    """Exactness checks run in float64, as ``natlib.setup`` arranges in the book."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
