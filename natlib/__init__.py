"""natlib: exact and approximate curvature and natural-gradient optimisers in PyTorch.

``natlib.setup`` and ``natlib.device`` are imported eagerly; every submodule
(``natlib.curvature``, ``natlib.kfac``, ...) is imported on first attribute access, so
``import natlib`` stays fast and does not load sympy or matplotlib until they are needed.
"""

import importlib

from natlib.runtime import device, setup

SUBMODULES = (
    "adam",
    "approximations",
    "bench",
    "bench_distributed",
    "checks",
    "coordinates",
    "costmodel",
    "curvature",
    "distributed",
    "ekfac",
    "exact",
    "factors",
    "feasibility",
    "fidelity",
    "comparison",
    "hessianfree",
    "gradient",
    "hessianfree",
    "hooks",
    "interface",
    "invariance",
    "kfac",
    "kunstner",
    "language",
    "launch",
    "layout",
    "lbfgs",
    "linalg",
    "losses",
    "newton",
    "notebooks",
    "optim",
    "plotting",
    "powerlaw",
    "preconditioned",
    "problems",
    "race",
    "reference",
    "recording",
    "reparam",
    "runtime",
    "scaling",
    "secondorder",
    "shampoo",
    "sweeps",
    "symbolic",
    "timing",
    "tuning",
)

__all__ = ["device", "setup", *SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"natlib.{name}")
    raise AttributeError(f"module 'natlib' has no attribute {name!r}")
