"""Every public name of the course (helper.__all__) is used by some test.

Read from the tests' source (AST): a name counts as used where a test file writes `helper.<name>`, imports
it from helper or a quantcourse module (`from helper import NOTEBOOKS`), or reads it as an attribute of a
quantcourse module it imported (`from quantcourse.core import models` ... `models.cache_is_valid`). A name
no test uses goes on ALLOWED_UNTESTED with the reason, or gets a test.
"""

import ast
from pathlib import Path

import helper

TESTS = Path(__file__).resolve().parent

ALLOWED_UNTESTED: dict[str, str] = {}
"""{public name: why no test calls it}. Empty: every public name has a test."""


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for a Name or a chain of Attributes on one, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _is_course_module(name: str) -> bool:
    return name == "helper" or name == "quantcourse" or name.startswith("quantcourse.")


def names_used(path: Path) -> set[str]:
    """The names of helper or a quantcourse module that a test file uses (imports or reads as attributes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, used = set(), set()  # dotted names that denote helper or a quantcourse module here; the names used
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_course_module(alias.name):
                    modules.add(alias.asname or alias.name)  # `import quantcourse.core.sizes`: that dotted name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_course_module(node.module):
            for alias in node.names:
                used.add(alias.name)
                modules.add(alias.asname or alias.name)  # `from quantcourse.core import models`: a module
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node.value) in modules:
            used.add(node.attr)
    return used


def test_the_scan_sees_each_way_a_test_uses_a_name(tmp_path):
    example = tmp_path / "test_example.py"
    example.write_text(
        "import helper\n"
        "import quantcourse.core.sizes\n"
        "from helper import NOTEBOOKS\n"
        "from quantcourse.core import models as m\n"
        "from quantcourse.lesson09_gptq_awq_nf4 import rtn_quantize\n"
        "def test_x():\n"
        "    helper.model_size(None)\n"
        "    quantcourse.core.sizes.format_bytes(1)\n"
        "    m.cache_is_valid(None)\n"
        "    other.perplexity = 1\n"  # an attribute of something else: not a use
        "    'helper.token_nll'\n"  # a string: not a use
    )
    used = names_used(example)
    assert {"model_size", "format_bytes", "cache_is_valid", "NOTEBOOKS", "rtn_quantize"} <= used
    assert not {"perplexity", "token_nll"} & used


def test_every_public_name_is_used_by_a_test_or_allowed_with_a_reason():
    used = set().union(*(names_used(p) for p in sorted(TESTS.glob("test_*.py")) if p != Path(__file__).resolve()))
    untested = [name for name in helper.__all__ if name not in used and name not in ALLOWED_UNTESTED]
    assert not untested, (
        f"no test uses {untested}: write one (see CONTRIBUTING.md, Tests) or add the name to ALLOWED_UNTESTED in "
        f"{Path(__file__).name} with the reason; where they are defined: {[helper.where(n) for n in untested]}"
    )
    assert all(isinstance(r, str) and r.strip() for r in ALLOWED_UNTESTED.values()), "a reason for every entry"
    stale = sorted(set(ALLOWED_UNTESTED) - set(helper.__all__))
    assert not stale, f"ALLOWED_UNTESTED names what helper does not export: {stale}"
    tested_anyway = sorted(set(ALLOWED_UNTESTED) & used)
    assert not tested_anyway, f"these have a test now: take them off ALLOWED_UNTESTED: {tested_anyway}"
