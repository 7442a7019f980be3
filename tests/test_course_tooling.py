"""quantcourse/tooling.py: how the structure tests read a notebook's checks, on hand-made cells."""

import nbformat

import helper

IGNORE = "# NBVAL_IGNORE_OUTPUT\n# the value depends on the CPU's kernels\n"


def _cell(source: str, output: str | None = None):
    cell = nbformat.v4.new_code_cell(source)
    if output is not None:
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=output)]
    return cell


def test_asserts_finds_claims_assertions_and_checks_and_nothing_else():
    assert helper.asserts(_cell('helper.claim("the loss fell", loss < 3)'))
    assert helper.asserts(_cell("helper.check_versions()"))
    assert helper.asserts(_cell("y = f(x)\nif y:\n    assert y == 2"))
    assert helper.asserts(_cell("check_ex1(576)"))
    assert not helper.asserts(_cell("print('assert that it holds')"))  # the word, not the statement
    assert not helper.asserts(_cell("claim = 3\nasserted = claim"))


def test_output_checks_counts_compared_backed_and_unbacked_cells(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[
            _cell("print(1 + 1)", "2\n"),  # compared exactly
            _cell(IGNORE + "ppl = 14.8\nprint(ppl)", "14.8\n"),  # ignored, and the next cell asserts on ppl
            _cell('helper.claim("perplexity below 20", ppl, 0, 20)', "✓ perplexity below 20\n"),  # compared
            _cell(IGNORE + "speed = 3.1\nprint(speed)", "3.1\n"),  # ignored; the next claim is about something else
            _cell('helper.claim("two is two", 2 == 2)', "✓ two is two\n"),  # compared
            _cell("x = 1"),  # no output: not counted
        ]
    )
    path = tmp_path / "99_example.ipynb"
    nbformat.write(notebook, path)
    assert helper.is_ignored(notebook.cells[1]) and not helper.is_ignored(notebook.cells[0])
    assert helper.cell_markers(IGNORE) == {"check": False}
    assert helper.output_checks(path) == (5, 3, 1)  # with output, compared, ignored but backed
