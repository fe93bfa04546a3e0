"""natlib: exact and approximate curvature and natural-gradient optimisers in PyTorch.

``natlib.setup`` and ``natlib.device`` are imported eagerly; every submodule
(``natlib.curvature``, ``natlib.kfac``, ...) is imported on first attribute access, so
``import natlib`` stays fast and does not load sympy or matplotlib until they are needed.
"""

import importlib
import pkgutil

from natlib.runtime import device, setup

# Every module of the package but __main__, found on disk: a new module needs no entry here.
SUBMODULES = tuple(
    sorted(module.name for module in pkgutil.iter_modules(__path__) if module.name != "__main__")
)

__all__ = ["device", "setup", *SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"natlib.{name}")
    raise AttributeError(f"module 'natlib' has no attribute {name!r}")
