"""The course's own tooling, for scripts and tests (no lesson uses it): the lessons' notebooks, how
their outputs are checked, and loading a script of scripts/ or benchmarks/ as a module."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from quantcourse.core.config import REPO_DIR

__all__ = ["NOTEBOOKS", "load_script", "output_checks", "cell_markers", "is_ignored", "asserts"]

NOTEBOOKS = sorted((REPO_DIR / "notebooks").glob("[0-9][0-9]_*.ipynb"))
"""The lessons, in course order."""


def load_script(relative_path: str) -> ModuleType:
    """Import a file of the repository that is not a package module (scripts/run_course.py, ...) by path.

    The module is registered in sys.modules under its file name, once: a second call returns it.
    """
    path = REPO_DIR / relative_path
    if not path.is_file():
        raise FileNotFoundError(f"no script {relative_path!r} under {REPO_DIR}")
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cell_markers(source: str) -> dict:
    """The nbval options a cell's comments set, read by nbval's own parser."""
    from nbval.plugin import find_comment_markers

    return dict(find_comment_markers(source))


def is_ignored(cell) -> bool:
    """True if nbval does not compare this cell's output (a `# NBVAL_IGNORE_OUTPUT` line)."""
    return cell_markers(cell.source).get("check") is False


def asserts(cell) -> bool:
    """True if the cell checks something: helper.claim / check_versions calls, asserts, check functions."""
    return bool(re.search(r"\bhelper\.(claim|check_versions)\(|^\s*assert\b|\bcheck\w*\(", cell.source, re.M))


def _names(source: str, kind: type) -> set[str]:
    """Names a cell binds (kind=ast.Store) or reads (ast.Load); IPython magics are left out."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, kind)}


def output_checks(path: str | Path) -> tuple[int, int, int]:
    """(cells with output, compared exactly, ignored but backed by an assertion).

    An ignored cell is backed when it asserts something itself, or when the next cell asserts and
    reads a name the ignored cell computed (a claim about something else backs nothing).
    """
    import nbformat

    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    with_output = exact = backed = 0
    for i, cell in enumerate(cells):
        if not cell.outputs:
            continue
        with_output += 1
        following = cells[i + 1] if i + 1 < len(cells) else None
        if not is_ignored(cell):
            exact += 1
        elif asserts(cell) or (
            following is not None
            and asserts(following)
            and _names(cell.source, ast.Store) & _names(following.source, ast.Load)
        ):
            backed += 1
    return with_output, exact, backed
