"""The package's shape: every submodule imports, and imports flow one way through the layers.

DESIGN.md, low to high: runtime, checks, hooks, losses -> layout, linalg, costmodel, powerlaw,
coordinates -> problems, language, curvature, factors, interface, recording -> kfac, exact,
reference, gradient, lbfgs, preconditioned -> newton, approximations, adam, shampoo, ekfac,
reparam, ... -> optim, hessianfree, invariance -> timing, distributed -> bench,
bench_distributed, scaling, sweeps, fidelity, comparison, race -> ``__main__`` (launch is layer 0).
No module imports a layer above its own or the package root's re-exports, and none is longer
than ``MAX_LINES``.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import natlib

PACKAGE = Path(natlib.__file__).parent
MAX_LINES = 500  # DESIGN.md: modules of a few hundred lines
LAYERS = {
    "runtime": 0,
    "checks": 0,
    "hooks": 0,
    "losses": 0,
    "plotting": 0,
    "notebooks": 0,
    "launch": 0,
    "layout": 1,
    "linalg": 1,
    "costmodel": 1,
    "problems": 2,
    "language": 2,
    "curvature": 2,
    "factors": 2,
    "interface": 2,
    "recording": 2,
    "kfac": 3,
    "preconditioned": 3,
    "powerlaw": 1,
    "coordinates": 1,
    "exact": 3,
    "reference": 3,
    "newton": 4,
    "gradient": 3,
    "lbfgs": 3,
    "approximations": 4,
    "adam": 4,
    "shampoo": 4,
    "ekfac": 4,
    "symbolic": 4,
    "reparam": 4,
    "kunstner": 4,
    "optim": 5,
    "hessianfree": 5,
    "secondorder": 5,
    "tuning": 6,
    "feasibility": 7,
    "invariance": 5,
    "timing": 6,
    "distributed": 6,
    "bench": 7,
    "bench_distributed": 7,
    "scaling": 7,
    "sweeps": 7,
    "fidelity": 7,
    "comparison": 7,
    "race": 7,
    "__main__": 8,
}


def natlib_imports(path: Path) -> set[str]:
    """The natlib submodules a file imports, anywhere in it (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "natlib":
            names = [f"natlib.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "natlib":
                found.add(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "natlib")
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), f"give these modules a layer: {modules ^ set(LAYERS)}"
    assert set(natlib.SUBMODULES) == set(LAYERS) - {"__main__"}


@pytest.mark.parametrize("module", sorted(set(LAYERS) - {"__main__"}))
def test_lazy_submodule_access(module):
    assert getattr(natlib, module) is importlib.import_module(f"natlib.{module}")


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_flow_downwards(module):
    imported = natlib_imports(PACKAGE / f"{module}.py")
    assert "natlib" not in imported, f"{module} imports from the package root"
    above = {m for m in imported if LAYERS[m] > LAYERS[module]}
    assert not above, f"natlib.{module} (layer {LAYERS[module]}) imports higher layers {above}"
    if LAYERS[module] == 0:
        allowed = {"plotting", "checks"} - {module}  # checks imports nothing of natlib
        assert not imported - allowed, f"layer-0 module {module} imports {imported}"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_no_module_is_over_the_line_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"natlib/{path.name} has {lines} lines; split it by concept"


def test_unknown_attribute_is_an_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        natlib.nonexistent  # noqa: B018


def test_every_submodule_is_documented_in_the_api_page():
    """book/api.md documents each submodule by an ``{eval-rst}`` ``automodule`` block with
    ``:members:`` (MyST's ``{automodule}`` fence does not render there)."""
    text = (PACKAGE.parent / "book" / "api.md").read_text()
    assert "```{automodule}" not in text, "use ```{eval-rst} blocks in book/api.md"
    blocks = re.findall(
        r"```\{eval-rst\}\n\.\. automodule:: natlib\.(\w+)\n   :members:.*\n```", text
    )
    assert len(blocks) == len(set(blocks)), f"documented twice: {blocks}"
    assert text.count(".. automodule::") == len(blocks), "an automodule block is malformed"
    missing = set(natlib.SUBMODULES) - set(blocks)
    assert not missing, f"book/api.md does not document {sorted(missing)}"
