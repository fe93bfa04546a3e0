"""Book-level checks on the stored notebooks that nbval cannot make itself.

nbval compares the outputs of executed cells but silently accepts a cell that was never
executed, so a notebook saved half-run would pass. These tests close that gap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from natlib.notebooks import BOOK, book_notebooks, scientific

NOTEBOOKS = book_notebooks()


def code_cells(path: Path) -> list[dict]:
    return [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]


def test_the_book_has_notebooks():
    assert NOTEBOOKS, "book/ holds no chapter notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_was_executed_in_order(path):
    counts = [cell["execution_count"] for cell in code_cells(path)]
    assert counts, f"{path.name} has no code cell"
    assert all(isinstance(c, int) for c in counts), (
        f"{path.name}: cells {[i for i, c in enumerate(counts) if c is None]} were never "
        "executed; run `python -m natlib notebooks` to re-execute it"
    )
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1, 2, 3, ... in order; re-execute it "
        "top to bottom with `python -m natlib notebooks`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_sets_up_natlib(path):
    source = "".join(code_cells(path)[0]["source"])
    assert "natlib.setup(" in source, f"{path.name}: the first code cell must call natlib.setup"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_error_outputs(path):
    errors = [
        i
        for i, cell in enumerate(code_cells(path))
        for output in cell.get("outputs", [])
        if output["output_type"] == "error"
    ]
    assert not errors, f"{path.name}: code cells {errors} stored an error"


CLAIM_CHAPTERS = {
    "a": "01_reparametrization",
    "b": "03_kfac",
    "c": "04_scaling",
    "d": "05_alternatives",
    "e": "06_newton",
    "f": "06_newton",
}
VERDICT_TITLE = re.compile(r"```\{admonition\} Verdict[^\n]*?:\s*(confirmed|imprecise|wrong)")


def preface_row(claim: str) -> str:
    rows = [r for r in (BOOK / "index.md").read_text().splitlines() if r.startswith(f"| ({claim})")]
    assert len(rows) == 1, f"the preface has {len(rows)} rows for claim ({claim})"
    return rows[0]


@pytest.mark.parametrize(("claim", "chapter"), sorted(CLAIM_CHAPTERS.items()))
def test_preface_verdict_matches_the_chapter(claim, chapter):
    path = BOOK / f"{chapter}.ipynb"
    markdown = "".join(
        "".join(cell["source"])
        for cell in json.loads(path.read_text())["cells"]
        if cell["cell_type"] == "markdown"
    )
    verdicts = VERDICT_TITLE.findall(markdown)
    if list(CLAIM_CHAPTERS.values()).count(chapter) > 1:  # one verdict per claim it tests
        title = rf"```\{{admonition\}} Verdict on claim \({claim}\)[^\n]*?:\s*"
        verdicts = re.findall(title + r"(confirmed|imprecise|wrong)", markdown)
    assert len(verdicts) == 1, f"{chapter} should have one verdict for ({claim}): {verdicts}"
    row = preface_row(claim)
    assert f"**{verdicts[0]}**" in row and f"<{chapter}>" in row, (
        f"the preface's row for claim ({claim}) does not give {chapter}'s verdict "
        f"'{verdicts[0]}' with a link to it"
    )


@pytest.mark.parametrize("claim", "abcdef")
def test_every_claim_has_a_verdict(claim):
    row = preface_row(claim)
    assert "| pending" not in row and re.search(r"\*\*(confirmed|imprecise|wrong)\*\*", row)


def test_execute_writes_outputs_in_order(tmp_path, capsys):
    import nbformat

    from natlib.notebooks import execute

    path = tmp_path / "tiny.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("x = 20"),
        nbformat.v4.new_code_cell("print(x + 1)"),
    ]
    nbformat.write(notebook, path)
    execute([path], timeout=60)
    cells = code_cells(path)
    assert [cell["execution_count"] for cell in cells] == [1, 2]
    assert "".join(cells[1]["outputs"][0]["text"]) == "21\n"
    assert "[1/1] executing" in capsys.readouterr().out


def test_execute_rejects_a_non_notebook(tmp_path):
    from natlib.notebooks import execute

    with pytest.raises(FileNotFoundError, match=r"not a notebook file \(\.ipynb\)"):
        execute([tmp_path / "missing.ipynb"])


def test_record_path_is_absolute_and_finds_the_records():
    from natlib.notebooks import DATA, record_path

    for name in ("kfac_benchmark_cpu.json", "scaling-cpu.json"):
        path = record_path(name)
        assert path.is_absolute() and path == DATA / name and path.is_file()


def test_a_missing_record_names_the_file_and_the_command_that_writes_it(monkeypatch, tmp_path):
    from natlib import notebooks

    monkeypatch.setattr(notebooks, "DATA", tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        notebooks.record_path("scaling-cuda.json")
    message = str(missing.value)
    assert str(tmp_path / "scaling-cuda.json") in message
    assert (
        "python -m natlib bench scaling --device cuda --out book/data/scaling-cuda.json" in message
    )
    with pytest.raises(FileNotFoundError, match="no natlib command writes"):
        notebooks.record_path("unknown.json")


def test_record_command_for_each_kind_of_record():
    from natlib.notebooks import record_command

    assert record_command("kfac_benchmark_cuda.json") == (
        "NATLIB_DEVICE=cuda python -m natlib bench kfac --json book/data/kfac_benchmark_cuda.json"
    )
    assert record_command("scaling-cpu.json") == (
        "python -m natlib bench scaling --device cpu --out book/data/scaling-cpu.json"
    )
    assert record_command("distributed-cpu.json") == (
        "python -m natlib bench distributed --device cpu --out book/data/distributed-cpu.json"
    )
    assert record_command("newton-cpu.json") == (
        "python -m natlib bench newton --device cpu --out book/data/newton-cpu.json"
    )
    assert record_command("approximations-cpu.json") == (
        "python -m natlib bench approximations --device cpu --out book/data/approximations-cpu.json"
    )
    assert record_command("training-cpu.json") == (
        "python -m natlib bench training --device cpu --out book/data/training-cpu.json"
    )
    assert record_command("training-transformer-cpu.json") == (
        "python -m natlib bench training --problem transformer --device cpu "
        "--out book/data/training-transformer-cpu.json"
    )
    assert record_command("training-autoencoder-cpu.json") == (
        "python -m natlib bench training --problem autoencoder --device cpu "
        "--out book/data/training-autoencoder-cpu.json"
    )
    with pytest.raises(ValueError, match="not a recorded run"):
        record_command("../scaling-cpu.json")
    with pytest.raises(ValueError, match="not a recorded run"):
        record_command("training-mlp-cpu.json")


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (1.125e15, 1, "1.1 × 10¹⁵"),
        (3e-4, 0, "3 × 10⁻⁴"),
        (7.46e-5, 2, "7.46 × 10⁻⁵"),
        (1.0, 1, "1.0 × 10⁰"),
    ],
)
def test_scientific_writes_numbers_as_prose_does(value, digits, text):
    assert scientific(value, digits) == text


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_scientific_rejects_what_it_cannot_write(value):
    with pytest.raises(ValueError, match="positive finite"):
        scientific(value)


def _executed(*cells: tuple[str, list[dict]]) -> dict:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    for source, outputs in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.from_dict(o) for o in outputs]
        notebook.cells.append(cell)
    return notebook


def _stream(text: str) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def test_output_differences_lists_each_cell_but_ignored_ones_and_sanitized_text():
    from natlib.notebooks import output_differences, sanitizer

    figure = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "AAA"}}
    stored = _executed(
        ("print(1)", [_stream("a\nb = 1\n")]),
        ("# NBVAL_IGNORE_OUTPUT\nt()", [_stream("3.1 s\n")]),
        ("t()", [_stream("took 2.0 s\n"), figure]),
        (
            "x",
            [
                {
                    "output_type": "execute_result",
                    "execution_count": 1,
                    "metadata": {},
                    "data": {"text/plain": "0.5"},
                }
            ],
        ),
    )
    fresh = _executed(
        ("print(1)", [_stream("a\nb = 2\n")]),
        ("# NBVAL_IGNORE_OUTPUT\nt()", [_stream("9.9 s\n")]),
        ("t()", [_stream("took 7.5 s\n"), dict(figure, data={"image/png": "BBB"})]),
        ("x", []),
    )
    assert output_differences(stored, stored, sanitizer()) == []
    assert output_differences(stored, fresh, sanitizer()) == [
        "code cell 1, line 2: stored 'b = 1', now 'b = 2'",
        "code cell 4, line 1: stored '[text/plain] 0.5', now '<nothing>'",
    ]


def test_gpu_check_is_an_executable_script_with_a_cpu_dry_run():
    import os

    script = BOOK.parent / "scripts" / "gpu-check"
    assert os.access(script, os.X_OK)
    assert "--cpu-dry-run" in script.read_text()
