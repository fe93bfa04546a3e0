"""natlib: exact and approximate curvature and natural-gradient optimisers in PyTorch."""

from natlib import problems
from natlib.runtime import device, setup

__all__ = ["device", "problems", "setup"]
__version__ = "0.1.0"
