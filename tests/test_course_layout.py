"""The code is laid out the way the course is: one module per lesson, core/ for what lessons share.

Read from the source (AST), not by importing: the import rules hold for every import statement at
module level, and no import cycle exists anywhere in the project.
"""

import ast
import re
from pathlib import Path

import pytest

import helper

REPO = Path(helper.REPO_DIR)
PACKAGE = REPO / "quantcourse"
CORE_ORDER = (
    "machine config memory models images llama_cpp generation sizes timing evaluation surgery benchmark".split()
)
LESSON_FILES = sorted(PACKAGE.glob("lesson[0-9][0-9]_*.py"))
PROJECT_FILES = sorted(
    p
    for p in [*REPO.glob("*.py"), *(REPO / "quantcourse").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    + [*(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").glob("*.py")]
)


def _imports(path: Path, top_level_only: bool = True) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file (at module level only, by default)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_every_notebook_has_its_module_and_every_module_its_notebook():
    stems = [p.stem for p in helper.NOTEBOOKS]
    modules = [p.stem for p in LESSON_FILES]
    assert modules == [f"lesson{stem}" for stem in stems]


def test_tests_mirror_the_modules():
    """test_lessonNN_<notebook stem>.py per lesson, test_core_<module>.py per core module, test_course_* else."""
    tests = sorted(p.stem for p in (REPO / "tests").glob("test_*.py"))
    assert [t for t in tests if t.startswith("test_lesson")] == [f"test_lesson{p.stem}" for p in helper.NOTEBOOKS]
    assert [t for t in tests if t.startswith("test_core_")] == sorted(f"test_core_{m}" for m in CORE_ORDER)
    assert all(t.startswith(("test_lesson", "test_core_", "test_course_")) for t in tests), tests


def test_core_holds_exactly_the_modules_in_their_order():
    assert sorted(p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__") == sorted(CORE_ORDER)


def test_helper_reexports_every_module_in_course_order():
    core = [f"quantcourse.core.{name}" for name in CORE_ORDER]
    lessons = [_module_name(p) for p in LESSON_FILES]
    assert helper.MODULES == core + lessons + ["quantcourse.tooling"]


def test_core_modules_import_only_earlier_core_modules():
    for rank, name in enumerate(CORE_ORDER):
        for module, line in _imports(PACKAGE / "core" / f"{name}.py", top_level_only=False):
            if module.startswith("quantcourse"):
                parts = module.split(".")
                assert parts[1] == "core" and len(parts) >= 3, f"core/{name}.py:{line} imports {module}"
                assert CORE_ORDER.index(parts[2]) < rank, f"core/{name}.py:{line} imports a later module {module}"


def test_lesson_modules_import_core_and_earlier_lessons_at_module_level():
    for path in LESSON_FILES:
        number = int(path.stem[6:8])
        for module, line in _imports(path, top_level_only=False):
            match = re.match(r"quantcourse\.lesson(\d\d)_", module)
            if match:
                assert int(match.group(1)) < number, f"{path.name}:{line} imports a later lesson {module}"
        top = set(_imports(path))
        for module, line in _imports(path, top_level_only=False):
            if module.startswith("quantcourse"):
                assert (module, line) in top, f"{path.name}:{line} imports {module} inside a function"


def test_nothing_in_the_package_imports_helper_and_nothing_imports_tests():
    for path in PROJECT_FILES:
        for module, line in _imports(path, top_level_only=False):
            assert module.split(".")[0] != "tests", f"{path.relative_to(REPO)}:{line} imports the tests"
            if path.is_relative_to(PACKAGE):
                assert module.split(".")[0] != "helper", f"{path.relative_to(REPO)}:{line} imports helper"


def test_no_sys_path_hacks():
    """No code calls sys.path.insert/append (a test may write such a line into a file it runs elsewhere)."""
    for path in PROJECT_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target = ast.unparse(node.func)
                assert target not in ("sys.path.insert", "sys.path.append"), f"{path.relative_to(REPO)} edits sys.path"


def test_no_import_cycle_among_the_projects_modules():
    modules = {_module_name(p): p for p in PROJECT_FILES if not p.is_relative_to(REPO / "tests")}
    graph = {
        name: {m for m, _ in _imports(path, top_level_only=False) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_files_are_small():
    for path in [REPO / "helper.py", *PACKAGE.rglob("*.py")]:
        limit = 300 if path.name == "helper.py" else 600
        assert len(path.read_text().splitlines()) <= limit, f"{path.relative_to(REPO)} is over {limit} lines"


def test_a_name_exported_twice_is_an_error(tmp_path, monkeypatch):
    """helper refuses two modules that export one name (run on a copy of helper with a clash added)."""
    clash = tmp_path / "clash_a.py"
    clash.write_text('__all__ = ["model_size"]\nmodel_size = None\n')
    source = (
        (REPO / "helper.py")
        .read_text()
        .replace('    "quantcourse.tooling",', '    "quantcourse.tooling",\n    "clash_a",')
    )
    (tmp_path / "helper_copy.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="'model_size' is exported by both quantcourse.core.sizes and clash_a"):
        __import__("helper_copy")


def test_where_names_the_file_of_a_lesson_function():
    assert helper.where("gptq_quantize") == "quantcourse/lesson09_gptq_awq_nf4.py"
    assert (REPO / helper.where("model_size")).is_file()
    for name in helper.__all__:
        assert getattr(helper, name) is getattr(__import__(helper.HOME[name], fromlist=[name]), name)
    with pytest.raises(KeyError, match="no 'nonexistent'"):
        helper.where("nonexistent")


@pytest.mark.parametrize("path", helper.NOTEBOOKS, ids=lambda p: p.stem)
def test_every_lesson_names_the_module_that_holds_its_code(path):
    import nbformat

    intro = nbformat.read(path, as_version=4).cells[0].source
    module = f"quantcourse/lesson{path.stem}.py"
    assert f"[`{module}`](../{module})" in intro, f"{path.name}'s introduction must link {module}"
    assert (REPO / module).is_file()
