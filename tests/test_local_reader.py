"""A reader runs the notebooks locally: from ``book/`` (``jupyter lab book/``, nbval), from the
repository root, or from wherever their front end starts the kernel.

The default run checks this cheaply but for real:

- statically, that no code cell opens a path relative to the working directory, changes it,
  or writes a file (so re-running a notebook changes nothing but its own outputs);
- by execution, that the cells which read ``book/data/`` print their stored text in a fresh
  kernel started in the repository root and in an unrelated empty directory, which stays empty.

Every notebook already runs top to bottom from ``book/`` under nbval in the default run.
Running all of them a second time, from the repository root, doubles that cost (each takes up
to two minutes), so it is the opt-in ``pytest -m slow tests/test_local_reader.py``.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
from helpers import checkout_env, nbval_sanitize, stdout

from natlib.notebooks import BOOK, book_notebooks

ROOT = BOOK.parent
NOTEBOOKS = book_notebooks()
CELL_TIMEOUT = 600  # seconds per cell, as `python -m natlib notebooks` allows

# Calls that open a file when given its name.
OPENERS = {
    "open",
    "Path",
    "PurePath",
    "load",
    "loadtxt",
    "genfromtxt",
    "fromfile",
    "read_csv",
    "read_json",
    "read_record",
    "imread",
}
# Calls that write files or change the working directory.
WRITERS = {
    "savefig",
    "write_text",
    "write_bytes",
    "to_csv",
    "to_json",
    "dump",
    "save",
    "savez",
    "savez_compressed",
    "savetxt",
    "imsave",
    "mkdir",
    "touch",
    "write_json",
    "write_record",
    "chdir",
}
# A string that starts like a path relative to the working directory.
RELATIVE = re.compile(r"^(\.{1,2}/|(book|data|_build|natlib|tests)/)")


def code_sources(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def working_directory_uses(source: str) -> list[str]:
    """What in ``source`` depends on, or changes, the working directory or writes a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if RELATIVE.match(node.value):
                found.append(f"relative path {node.value!r}")
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            literal = any(  # the file name (first argument) is or holds a string literal,
                isinstance(n, ast.Constant) and isinstance(n.value, str)  # not record_path's
                for arg in node.args[:1]
                if not (isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "record_path")
                for n in ast.walk(arg)
            )
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), "")
            mode = next((k.value.value for k in node.keywords if k.arg == "mode"), mode)
            if name in OPENERS and literal:
                found.append(f"opens a file by a name relative to the working directory: {name}()")
            if name in WRITERS or (name == "open" and set(str(mode)) & set("wax+")):
                found.append(f"writes a file or changes directory: {name}()")
    return found


def test_the_check_finds_working_directory_uses():
    """The static check below is not vacuous: it flags what the notebooks used to do."""
    flagged = {
        'json.loads(Path("data/kfac_benchmark_cpu.json").read_text())': 2,
        'path = Path("data") / f"scaling-{name}.json"': 1,
        'plt.savefig("figure.png")': 1,
        'with open(p, "w") as f: pass': 1,
        'os.chdir("..")': 1,
    }
    for source, expected in flagged.items():
        assert len(working_directory_uses(source)) == expected, source
    assert working_directory_uses('record_path("scaling-cpu.json")') == []
    assert working_directory_uses('read_record(record_path("scaling-cpu.json"))') == []
    assert len(working_directory_uses('read_record(Path("scaling-cpu.json"))')) == 2
    assert working_directory_uses('print("K-FAC step / SGD step")') == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_depends_on_the_working_directory(path):
    found = {
        i: uses
        for i, source in enumerate(code_sources(path))
        if (uses := working_directory_uses(source))
    }
    assert not found, (
        f"{path.name}: code cells (counted from 0) {found}; open recorded runs with "
        "natlib.notebooks.record_path(name) and do not write files from a notebook"
    )


# The names of natlib.notebooks that locate files (``scientific`` formats numbers instead).
FILE_HELPERS = {"BOOK", "DATA", "record_path", "record_command"}


def notebooks_imports(sources: list[str]) -> tuple[str, set[str]]:
    """The notebook's import statements, and the names it imports from ``natlib.notebooks``
    that locate files."""
    imports, helpers = [], set()
    for source in sources:
        for node in ast.parse(source).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                imports.append(ast.unparse(node))
                if isinstance(node, ast.ImportFrom) and node.module == "natlib.notebooks":
                    helpers |= {alias.asname or alias.name for alias in node.names}
    return "\n".join(imports), helpers & FILE_HELPERS


def uses_names(source: str, names: set[str]) -> bool:
    tree = ast.parse(source)
    return any(isinstance(n, ast.Name) and n.id in names for n in ast.walk(tree))


def run(notebook, cwd: Path) -> None:
    """Execute ``notebook`` in memory, in a fresh kernel whose working directory is ``cwd``."""
    from nbclient import NotebookClient

    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    ).execute(env=checkout_env())


def untracked() -> str:
    """Files git would list as untracked (new and not ignored): what a run must not leave."""
    return subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


RECORD_READERS = [p for p in NOTEBOOKS if notebooks_imports(code_sources(p))[1]]


def test_some_notebook_reads_records():
    """Guard against a vacuous pass of the test below."""
    assert RECORD_READERS, "no notebook imports natlib.notebooks; is book/data/ still read?"


@pytest.mark.parametrize("where", ["repository root", "empty directory"])
@pytest.mark.parametrize("path", RECORD_READERS, ids=lambda p: p.name)
def test_cells_that_read_records_run_from_any_directory(path, where, tmp_path):
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    imports, helpers = notebooks_imports([cell.source for cell in code])
    readers = [cell for cell in code if uses_names(cell.source, helpers)]
    assert readers, (
        f"{path.name} imports {sorted(helpers)} from natlib.notebooks but never uses them"
    )

    run_here = ROOT if where == "repository root" else tmp_path
    before = untracked()
    fresh = nbformat.v4.new_notebook()
    fresh.cells = [nbformat.v4.new_code_cell(imports)] + [
        nbformat.v4.new_code_cell(cell.source) for cell in readers
    ]
    run(fresh, run_here)

    for stored, ran in zip(readers, fresh.cells[1:]):
        errors = [o for o in ran.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} from the {where}: {errors[0].ename}: {errors[0].evalue}"
        if "NBVAL_IGNORE_OUTPUT" not in stored.source:
            assert nbval_sanitize(stdout(ran.outputs)) == nbval_sanitize(stdout(stored.outputs)), (
                f"{path.name}, run from the {where}, printed\n{stdout(ran.outputs)}\n"
                f"where the stored notebook has\n{stdout(stored.outputs)}"
            )
    assert untracked() == before, f"running {path.name}'s cells left files in the repository"
    assert list(tmp_path.iterdir()) == [], f"running {path.name}'s cells wrote files into its cwd"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_the_repository_root(path):
    """Top to bottom in a fresh kernel started in the repository root: no error, the stored
    printed text (cells marked ``NBVAL_IGNORE_OUTPUT`` aside), and no new file."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    stored = [copy.deepcopy(cell.outputs) for cell in notebook.cells if cell.cell_type == "code"]
    before = untracked()
    run(notebook, ROOT)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for i, (cell, outputs) in enumerate(zip(code, stored)):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}, code cell {i}: {errors[0].ename}: {errors[0].evalue}"
        if "NBVAL_IGNORE_OUTPUT" not in cell.source:
            assert nbval_sanitize(stdout(cell.outputs)) == nbval_sanitize(stdout(outputs)), (
                f"{path.name}, code cell {i} printed\n{stdout(cell.outputs)}\n"
                f"where the stored notebook has\n{stdout(outputs)}"
            )
    assert untracked() == before, f"running {path.name} left files in the repository"
