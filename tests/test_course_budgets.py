"""Every lesson has a run-time and memory budget, and its stored run stays within 1.5x of it.

The budgets live in each notebook's metadata (`course.budget_s`, `course.budget_mb`);
`make refresh` (scripts/run_course.py --in-place) stores the run that made the outputs
(`course.last_run`: seconds, the kernel's peak MB, the machine, the date). This is a guard
against regressions on the machine that refreshed the outputs, not a benchmark.
"""

import nbformat
import pytest

import helper

NOTEBOOKS = helper.NOTEBOOKS
SLACK = 1.5


def _run_course():
    return helper.load_script("scripts/run_course.py")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_run_is_within_the_lessons_budget(path):
    course = nbformat.read(path, as_version=4).metadata.get("course", {})
    assert course.get("budget_s", 0) > 0 and course.get("budget_mb", 0) > 0, f"{path.name} has no budget"
    run = course.get("last_run")
    assert run, f"{path.name} has no stored run: refresh it with `make refresh NB=notebooks/{path.name}`"
    assert run["seconds"] <= SLACK * course["budget_s"], (
        f"{path.name} ran {run['seconds']} s, more than {SLACK}x its budget of {course['budget_s']} s"
    )
    assert run["peak_mb"] <= SLACK * course["budget_mb"], (
        f"{path.name} peaked at {run['peak_mb']} MB, more than {SLACK}x its budget of {course['budget_mb']} MB"
    )
    assert run["machine"] and run["date"]


def test_lesson_budgets_add_up_to_the_course_budget():
    """The course's budget: 8 min 17 s since Lessons 10, 11 and 13 landed (issue 26's target is 5 minutes),
    no kernel above 3 GB, lessons included; the lessons leave 15 s to make's checks and the site."""
    run_course = _run_course()
    budgets = [nbformat.read(p, as_version=4).metadata["course"] for p in NOTEBOOKS]
    assert run_course.COURSE_BUDGET_S <= 497 and run_course.LESSONS_BUDGET_S <= run_course.COURSE_BUDGET_S - 15
    assert sum(b["budget_s"] for b in budgets) <= run_course.LESSONS_BUDGET_S
    assert max(b["budget_mb"] for b in budgets) <= run_course.COURSE_BUDGET_MB == 3000


def test_sections_follow_the_numbered_headings():
    run_course = _run_course()
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Lesson 0 — Title"),
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_markdown_cell("## Setup"),
            nbformat.v4.new_code_cell("y = 2"),
            nbformat.v4.new_markdown_cell("text\n\n## 1. First part\nmore"),
            nbformat.v4.new_code_cell("z = 3"),
            nbformat.v4.new_markdown_cell("### a subsection"),
            nbformat.v4.new_code_cell("w = 4"),
        ]
    )
    expected = ["", "", "Setup", "Setup"] + ["1. First part"] * 4  # a ### heading opens no section
    assert run_course.sections_by_cell(notebook) == expected


def test_report_flags_what_is_over_budget():
    report = _run_course().report
    assert report("10_x", 59.4, 2233.0, (90, 2500)) == "10_x: 59 s (budget 90 s), peak 2,233 MB (budget 2,500 MB)"
    assert report("06_x", 88, 5200, (60, 3000)).count("OVER") == 2
