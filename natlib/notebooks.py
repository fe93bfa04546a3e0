"""The book's files as the notebooks find them, and re-executing the notebooks in place.

Run ``python -m natlib notebooks`` (all of ``book/*.ipynb``) or name notebooks to execute.
Notebooks open recorded runs through :func:`record_path`, so they run from any working
directory: the repository root, ``book/``, or wherever a front end starts the kernel.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BOOK = Path(__file__).resolve().parent.parent / "book"
DATA = BOOK / "data"  # recorded runs, JSON written by ``python -m natlib bench ...``

_RECORD_NAME = re.compile(
    r"(?P<kind>kfac_benchmark_|scaling-|distributed-|newton-|approximations-|training-|"
    r"training-(?P<task>autoencoder|cnn|transformer)-|sweep-(?P<problem>kfac-ngd|autoencoder)-)"
    r"(?P<device>cpu|cuda)\.json"
)


def book_notebooks() -> list[Path]:
    """The chapter notebooks in ``book/``, in file-name order."""
    return sorted(BOOK.glob("*.ipynb"))


def record_command(name: str) -> str:
    """The command that writes the recorded run ``book/data/<name>``, run from the repository root.

    Known records are ``kfac_benchmark_<device>.json``, ``scaling-<device>.json``,
    ``distributed-<device>.json``, ``newton-<device>.json``, ``approximations-<device>.json``,
    ``training-<device>.json``, ``training-<problem>-<device>.json`` (``<problem>``
    ``autoencoder``, ``cnn`` or ``transformer``) and ``sweep-<problem>-<device>.json``
    (``<problem>`` ``kfac-ngd`` or ``autoencoder``) with ``<device>`` ``cpu`` or ``cuda``.

    Raises:
        ValueError: ``name`` is not one of them.
    """
    match = _RECORD_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a recorded run; known names are kfac_benchmark_<device>.json, "
            "scaling-<device>.json, distributed-<device>.json, newton-<device>.json, "
            "approximations-<device>.json, training-<device>.json, "
            "training-<autoencoder|cnn|transformer>-<device>.json and "
            "sweep-<kfac-ngd|autoencoder>-<device>.json with <device> cpu or cuda."
        )
    out = f"book/data/{name}"
    if match["problem"]:
        return (
            f"python -m natlib bench sweep --problem {match['problem']} "
            f"--device {match['device']} --out {out}"
        )
    if match["task"]:
        return (
            f"python -m natlib bench training --problem {match['task']} "
            f"--device {match['device']} --out {out}"
        )
    if match["kind"] in ("scaling-", "distributed-", "newton-", "approximations-", "training-"):
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


#: The marker of cells whose output nbval (and :func:`output_differences`) does not compare.
IGNORE_OUTPUT = "# NBVAL_IGNORE_OUTPUT"
#: The MIME types nbval compares (images as PNG or JPEG are skipped, as nbval skips them).
COMPARED_TYPES = ("text/plain", "text/html", "image/svg+xml")
SANITIZER = BOOK / "nbval_sanitize.cfg"


def sanitizer(path: Path = SANITIZER) -> Callable[[str], str]:
    """The regular-expression replacements of nbval's sanitizer file ``path`` (timings,
    addresses, progress bars), as one function on text."""
    import configparser

    config = configparser.ConfigParser()
    config.read(path)
    rules = [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]

    def apply(text: str) -> str:
        for pattern, replacement in rules:
            text = pattern.sub(replacement, text)
        return text

    return apply


def printed(cell: dict) -> list[str]:
    """What a code cell showed that nbval compares: streams, the :data:`COMPARED_TYPES` of
    results and displays, and errors, in order."""
    shown = []
    for output in cell.get("outputs", []):
        kind = output["output_type"]
        if kind == "stream":
            shown.append(f"[{output['name']}] {''.join(output['text'])}")
        elif kind == "error":
            shown.append(f"[error] {output['ename']}: {output['evalue']}")
        else:
            data = output.get("data", {})
            shown += [f"[{t}] {''.join(data[t])}" for t in COMPARED_TYPES if t in data]
    return shown


def output_differences(stored: dict, fresh: dict, sanitize: Callable[[str], str]) -> list[str]:
    """Every difference between two executions of a notebook (``nbformat`` notebooks) in what
    their code cells printed, after ``sanitize``, skipping cells marked
    :data:`IGNORE_OUTPUT`; one line per cell, naming it and the first lines that differ."""
    cells = [(c, f) for c, f in zip(stored["cells"], fresh["cells"]) if c["cell_type"] == "code"]
    if len(stored["cells"]) != len(fresh["cells"]):
        return [f"{len(stored['cells'])} cells stored, {len(fresh['cells'])} executed"]
    differences = []
    for index, (old, new) in enumerate(cells, 1):
        if IGNORE_OUTPUT in "".join(old["source"]):
            continue
        before = sanitize("\n".join(printed(old))).splitlines()
        after = sanitize("\n".join(printed(new))).splitlines()
        if before != after:
            line = next(
                (i for i, (a, b) in enumerate(zip(before, after)) if a != b),
                min(len(before), len(after)),
            )
            was = before[line] if line < len(before) else "<nothing>"
            now = after[line] if line < len(after) else "<nothing>"
            differences.append(f"code cell {index}, line {line + 1}: stored {was!r}, now {now!r}")
    return differences
