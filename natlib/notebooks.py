"""The book's files as the notebooks find them, and re-executing the notebooks in place.

Run ``python -m natlib notebooks`` (all of ``book/*.ipynb``) or name notebooks to execute.
Notebooks open recorded runs through :func:`record_path`, so they run from any working
directory: the repository root, ``book/``, or wherever a front end starts the kernel.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

BOOK = Path(__file__).resolve().parent.parent / "book"
DATA = BOOK / "data"  # recorded runs, JSON written by ``python -m natlib bench ...``

_RECORD_NAME = re.compile(
    r"(?P<kind>kfac_benchmark_|scaling-|approximations-|training-)(?P<device>cpu|cuda)\.json"
)


def book_notebooks() -> list[Path]:
    """The chapter notebooks in ``book/``, in file-name order."""
    return sorted(BOOK.glob("*.ipynb"))


def record_command(name: str) -> str:
    """The command that writes the recorded run ``book/data/<name>``, run from the repository root.

    Known records are ``kfac_benchmark_<device>.json``, ``scaling-<device>.json``,
    ``approximations-<device>.json`` and ``training-<device>.json`` with ``<device>``
    ``cpu`` or ``cuda``.
    """
    match = _RECORD_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a recorded run; known names are kfac_benchmark_<device>.json, "
            "scaling-<device>.json, approximations-<device>.json and training-<device>.json with "
            "<device> cpu or cuda."
        )
    out = f"book/data/{name}"
    if match["kind"] in ("scaling-", "approximations-", "training-"):
        bench = match["kind"].rstrip("-")
        return f"python -m natlib bench {bench} --device {match['device']} --out {out}"
    return f"NATLIB_DEVICE={match['device']} python -m natlib bench kfac --json {out}"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def scientific(value: float, digits: int = 1) -> str:
    """``value`` as prose writes it, for gluing into a sentence: ``1.1 × 10¹⁵``, ``3 × 10⁻⁴``.

    Raises:
        ValueError: ``value`` is not finite or not positive.
    """
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"scientific() writes positive finite numbers, not {value!r}.")
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def record_path(name: str) -> Path:
    """The absolute path of the recorded run ``book/data/<name>``, whatever the working directory.

    Raises:
        FileNotFoundError: the record is missing; the message names the file and the command
            that writes it.
    """
    path = DATA / name
    if not path.is_file():
        try:
            how = f"write it with `{record_command(name)}` from the repository root"
        except ValueError:
            how = "no natlib command writes a record of that name"
        raise FileNotFoundError(
            f"{path} does not exist: the recorded run {name} is missing; {how}."
        )
    return path


def execute(paths: Sequence[Path], timeout: int = 600) -> None:
    """Execute each notebook top to bottom in a fresh kernel and write it back with outputs.

    The kernel starts in the notebook's folder (as nbval and JupyterLab start it); the notebooks
    do not depend on that, as they open files through :func:`record_path`. Prints a line when
    each notebook starts and ends (the kernel's own start-up warnings can come in between).
    """
    import nbformat
    from nbclient import NotebookClient

    for i, path in enumerate(paths, 1):
        path = Path(path)
        if path.suffix != ".ipynb" or not path.is_file():
            raise FileNotFoundError(f"{path} is not a notebook file (.ipynb).")
        print(f"[{i}/{len(paths)}] executing {path}", flush=True)
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        nbformat.write(notebook, path)
        print(f"[{i}/{len(paths)}] {path} done in {time.perf_counter() - start:.1f} s", flush=True)
