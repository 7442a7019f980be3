"""The README's "Run a lesson on Colab" section, from pyproject.toml's [project.urls] Repository.

Usage: python scripts/colab_links.py            # the whole section (Markdown) on stdout
       python scripts/colab_links.py --rows     # only the table's rows, one per lesson

Each lesson gets Colab's standard badge linking to
https://colab.research.google.com/github/<owner>/<repo>/blob/main/notebooks/<lesson>.ipynb.
A fork changes the URL in pyproject.toml, runs this and pastes the output into README.md;
tests/test_helper_colab.py checks that the README's rows are the ones this prints. The notebooks'
setup cell (scripts/colab_snippet.py) holds the same URL.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
SNIPPET_FILE = REPO_DIR / "scripts" / "colab_snippet.py"


def repository_url(pyproject: Path = REPO_DIR / "pyproject.toml") -> str:
    """The public URL of the repository: pyproject.toml's [project.urls] Repository."""
    text = pyproject.read_text()
    table = re.search(r"^\[project\.urls\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = table and re.search(r'^Repository\s*=\s*"([^"]+)"', table.group(1), re.M)
    if not found:
        raise ValueError(f'{pyproject} has no [project.urls] Repository = "https://github.com/..."')
    return found.group(1)


def github_path(url: str) -> str:
    """`owner/name` of a GitHub repository URL (https://github.com/owner/name[.git][/])."""
    match = re.fullmatch(r"https://github\.com/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+?)(?:\.git)?/?", url.strip())
    if match is None:
        raise ValueError(f"Colab opens notebooks from GitHub; not a GitHub repository URL: {url!r}")
    return f"{match.group(1)}/{match.group(2)}"


def colab_url(url: str, notebook: str, branch: str = "main") -> str:
    """Colab's address of a notebook of the repository, e.g. notebook='01_data_types.ipynb'."""
    return f"https://colab.research.google.com/github/{github_path(url)}/blob/{branch}/notebooks/{notebook}"


def lessons(folder: Path = REPO_DIR / "notebooks") -> list[tuple[str, str]]:
    """(file name, title) of each lesson; the title from its first line, `# Lesson N — Title`."""
    found = []
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        first = "".join(json.loads(path.read_text())["cells"][0]["source"]).splitlines()[0]
        found.append((path.name, first.lstrip("# ").strip()))
    return found


def table_rows(url: str, notebooks: list[tuple[str, str]]) -> list[str]:
    """One Markdown table row per lesson: its title and the badge that opens it on Colab."""
    return [f"| {title} | [![Open In Colab]({BADGE})]({colab_url(url, name)}) |" for name, title in notebooks]


def setup_snippet(path: Path = SNIPPET_FILE) -> str:
    """The code the lessons' setup cells start with: colab_snippet.py after its header comment."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(lines[start:]).strip("\n") + "\n"


SECTION = """\
## Run a lesson on Colab

Each badge opens the lesson in Google Colab, straight from GitHub:

| lesson | |
|---|---|
{rows}

The first lines of every lesson's Setup cell notice that they run outside the course's `.venv`.
They then clone this repository into `quantization-course/` (in `/content` on Colab), install
with the kernel's own `pip` what the lessons import (`requirements.txt`, at the exact versions
of `constraints.txt`) and the packaged models (`requirements-models.txt`), and change into the
clone, where `import helper` finds `helper.py`.

Colab's own `torch` is kept, never replaced: it is built for Colab's GPU, and the course pins a
CPU wheel. `helper.check_versions()` prints it as a note (the course was tested with torch
{torch}; numbers may differ a little) and still checks every other library.

The install takes a few minutes, once per Colab session; running the cell again skips it. The
first lesson that uses SmolLM2 converts its packaged GGUF file to safetensors (about 30 s, once
per session). The lessons compute on the CPU only (no cell moves a model to a GPU), so Colab's
CPU runtime should do; Requirements below gives the memory they need.

What has been verified: `make test-colab` runs this install path here, in a bare virtual
environment that already has another torch (2.14.1, a CUDA build) and only Jupyter's kernel: the
setup cell clones a copy of the repository and installs the rest, that torch is kept, Lesson 1
runs, and SmolLM2 loads and gives a finite perplexity. Not verified: a real Colab session, and
any GPU. Nothing in the course has been run on a GPU.
"""


def readme_section(url: str, notebooks: list[tuple[str, str]], torch_version: str) -> str:
    """The README's whole "Run a lesson on Colab" section."""
    return SECTION.format(rows="\n".join(table_rows(url, notebooks)), torch=torch_version)


def course_torch(constraints: Path = REPO_DIR / "constraints.txt") -> str:
    """The torch version the course pins (without its local label, e.g. 2.13.0)."""
    match = re.search(r"^torch==([^\s+]+)", constraints.read_text(), re.M)
    if match is None:
        raise ValueError(f"no torch pin in {constraints}")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", action="store_true", help="print only the table rows")
    args = parser.parse_args(argv)
    url, found = repository_url(), lessons()
    text = "\n".join(table_rows(url, found)) + "\n" if args.rows else readme_section(url, found, course_torch())
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
