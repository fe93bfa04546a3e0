"""Module hooks that hold their owner weakly, so models stay plain models when copied.

``copy.deepcopy`` and ``pickle`` copy a module's hooks with it. A hook here only acts on the
module it was registered on, while its owner (an optimiser or a recorder) is alive; a copy of
the module, or an unpickled one, carries an inert hook instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


def _inert(*args: Any) -> None:
    return None


class WeakHook:
    """Calls ``getattr(owner, method)(module, *args)`` for the registered module only."""

    def __init__(self, owner: object, method: str, module: nn.Module) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._module = weakref.ref(module)

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        owner = self._owner()
        if owner is None or module is not self._module():
            return None
        return getattr(owner, self._method)(module, *args)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple:
        return (_make_inert, ())


def _make_inert() -> Callable[..., None]:
    return _inert


def register(module: nn.Module, owner: object, method: str, pre: bool = False) -> RemovableHandle:
    """Register ``owner.method`` as a forward (``pre``: forward-pre) hook of ``module``."""
    hook = WeakHook(owner, method, module)
    if pre:
        return module.register_forward_pre_hook(hook)
    return module.register_forward_hook(hook)
