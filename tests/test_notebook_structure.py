"""Every lesson follows the course's structure and is stored fully executed.

These checks read the stored notebooks (nbval re-executes them separately).
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
IGNORE = "# NBVAL_IGNORE_OUTPUT"


def _code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _markdown(path):
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


def test_lessons_are_numbered_consecutively():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(NOTEBOOKS) + 1))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_has_the_course_sections(path):
    text = _markdown(path)
    assert re.search(r"^# Lesson \d+ — ", text, re.M), "title '# Lesson N — ...'"
    for heading in ["What you will learn", "## Setup", "## Exercises", "## Summary and takeaways"]:
        assert heading in text, heading


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_is_stored_executed_in_order_without_errors(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata.kernelspec.name == "python3"
    counts = [c.execution_count for c in _code_cells(path) if c.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), "run top to bottom once, then save"
    for cell in _code_cells(path):
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_ignored_output_says_why(path):
    for cell in _code_cells(path):
        if IGNORE in cell.source:
            line = cell.source.split(IGNORE, 1)[1].splitlines()[0]
            reason = line.strip(" :-–(") or cell.source.splitlines()[1]
            assert len(reason) > 10, f"NBVAL_IGNORE_OUTPUT needs a reason: {cell.source[:80]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_most_outputs_are_checked(path):
    cells = [c for c in _code_cells(path) if c.outputs]
    checked = [c for c in cells if IGNORE not in c.source]
    assert len(checked) >= 0.8 * len(cells), f"only {len(checked)} of {len(cells)} cells with output are checked"


def test_no_progress_bars_in_stored_outputs():
    for path in NOTEBOOKS:
        for cell in _code_cells(path):
            for output in cell.outputs:
                assert "it/s]" not in output.get("text", ""), f"{path.name}: {cell.source[:60]!r}"
