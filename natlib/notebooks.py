"""Re-execute the book's notebooks in place, so their stored outputs match the current natlib.

Run ``python -m natlib notebooks`` (all of ``book/*.ipynb``) or name notebooks to execute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

BOOK = Path(__file__).resolve().parent.parent / "book"


def book_notebooks() -> list[Path]:
    """The chapter notebooks in ``book/``, in file-name order."""
    return sorted(BOOK.glob("*.ipynb"))


def execute(paths: Sequence[Path], timeout: int = 600) -> None:
    """Execute each notebook top to bottom in a fresh kernel and write it back with outputs.

    The kernel starts in the notebook's folder (as nbval starts it), so relative paths such as
    ``data/...`` mean the same under both. Prints a line when each notebook starts and ends
    (the kernel's own start-up warnings can come in between).
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
