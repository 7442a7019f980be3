"""The README's "Run a lesson on Colab" section, from pyproject.toml's [project.urls] Repository.

Usage: python scripts/colab_links.py            # the whole section (Markdown) on stdout
       python scripts/colab_links.py --rows     # only the table's rows, one per lesson

Each lesson gets Colab's standard badge linking to
https://colab.research.google.com/github/<owner>/<repo>/blob/main/notebooks/<lesson>.ipynb.
A fork changes the URL in pyproject.toml, runs this and pastes the output into README.md;
tests/test_course_colab.py checks that the README's section is the one this prints. The notebooks'
setup cell (scripts/colab_snippet.py) clones by default from that URL only once pyproject.toml
marks it as the course's own ([tool.quantcourse] repository-published = true; default_clone_url).
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


def repository_published(pyproject: Path = REPO_DIR / "pyproject.toml") -> bool:
    """Whether pyproject.toml marks its Repository URL as the course's own: [tool.quantcourse] repository-published."""
    text = pyproject.read_text()
    table = re.search(r"^\[tool\.quantcourse\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = table and re.search(r"^repository-published\s*=\s*(true|false)\s*(?:#.*)?$", table.group(1), re.M)
    if not found:
        raise ValueError(f"{pyproject} has no [tool.quantcourse] repository-published = true or false")
    return found.group(1) == "true"


def default_clone_url(pyproject: Path = REPO_DIR / "pyproject.toml") -> str:
    """The URL the setup cell clones when QUANT_COURSE_REPO is not set: none ("") while it is a placeholder."""
    return repository_url(pyproject) if repository_published(pyproject) else ""


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

Each badge opens the lesson in Google Colab, straight from GitHub. The links use the repository
URL in `pyproject.toml` (`[project.urls] Repository`); a fork or a move changes that line and
pastes the output of `python scripts/colab_links.py` here (`tests/test_course_colab.py` checks
that they agree).
{published}
| lesson | |
|---|---|
{rows}

The first lines of every lesson's Setup cell (`scripts/colab_snippet.py`, verbatim in each
notebook) decide whether they may install anything:

- **In the course's `.venv`** (`import helper` works) they do nothing.
- **On Colab, or with the opt-in `QUANT_COURSE_SETUP=1`**, they set the course up in the
  kernel's own Python (below). Colab is told by `"google.colab" in sys.modules` (the snippet's
  `on_colab()`): Colab's kernel has imported that module before the first cell runs, and unlike
  an environment variable it does not come along from elsewhere by chance. Elsewhere the opt-in
  goes into the kernel's environment: `QUANT_COURSE_SETUP=1 jupyter lab`, or
  `%env QUANT_COURSE_SETUP=1` in a cell above the Setup cell.
- **Anywhere else** (a base or conda Jupyter opened on a clone's notebook, say) they install
  nothing and stop with a `RuntimeError` whose message gives the commands: `make course` (or
  `make setup`), then `.venv/bin/jupyter lab notebooks/`; or the opt-in.

Where they set up. In a clone's `notebooks/` folder (`../helper.py` is there) they use that
clone and clone nothing. Elsewhere they clone the repository into `quantization-course/` (in
`/content` on Colab; a second run finds it there), but only from a URL they were told is the
course's own:
{clone_rule}
Then `scripts/colab_setup.py`, from that copy, runs in the kernel: it installs with the kernel's
own `pip` what the lessons import (`requirements.txt`, at the exact versions of
`constraints.txt`) and the packaged models (`requirements-models.txt`), and changes into the
repository's root, where `import helper` finds `helper.py`.

What the install keeps. Colab's own `torch`, never replaced: it is built for Colab's GPU, and
the course pins a CPU wheel. `helper.check_versions()` prints it as a note (the course was
tested with torch {torch}; numbers may differ a little) and still checks every other library.
And every package the kernel has already imported (ipykernel, packaging, ...: the top-level
names in `sys.modules`, mapped to their distributions): each stays at its installed version
instead of `constraints.txt`'s, because a second version under a running kernel leaves it with
half of each (a fresh machine's `make test-colab` once failed so: `cannot import name
'_TrimmedRelease' from 'packaging.version'`). Where the lessons need another version of one of
them, pip fails and the message names them: install that version, restart the kernel, run the
cell again.

The install takes a few minutes, once per Colab session; running the cell again skips it. The
first lesson that uses SmolLM2 converts its packaged GGUF file to safetensors (about 30 s, once
per session). The lessons compute on the CPU only (no cell moves a model to a GPU), so Colab's
CPU runtime should do; Requirements below gives the memory they need.

What has been verified: `make test-colab` (and `make test`, once, in its native pass) runs these
paths here, in a bare virtual environment that has only another torch (2.14.1, a CUDA build),
another packaging (26.4; the course pins 26.3) and Jupyter's kernel. Not on Colab and without
the opt-in, Lesson 1's setup cell stops with the message and changes nothing (nothing cloned,
the same `pip freeze`). On a stand-in Colab (a `google.colab` module that the kernel imports at
its start, with packaging, and `COLAB_RELEASE_TAG` set) the cell clones a local copy of this
working tree (named by `QUANT_COURSE_REPO`) and installs the rest; torch and packaging are kept,
Lesson 1 runs, and SmolLM2 loads and gives a finite perplexity. Then, in that clone's
`notebooks/` with `QUANT_COURSE_SETUP=1`, a new kernel's setup cell clones nothing and finds
everything installed. The fast tests run the snippet's other cases with a stand-in setup script.
Not verified: a real Colab session (that its kernel has imported `google.colab` is the common
way to tell Colab, not checked there), and any GPU. Nothing in the course has been run on a GPU.
"""

PUBLISHED = {
    False: """
That URL (`github.com/{path}`) is a placeholder for now
(`[tool.quantcourse] repository-published = false`): the course does not own that namespace, so
the badges work only once the course is published there, and the setup cell never clones from it.
""",
    True: "",
}

CLONE_RULE = {
    False: """\
`QUANT_COURSE_REPO` (`%env QUANT_COURSE_REPO=<the course's git URL>` in a cell above the Setup
cell). The snippet has no default URL while pyproject.toml's is a placeholder; without
`QUANT_COURSE_REPO` it stops with the same message. Once the course is published at its own URL,
`repository-published = true` makes that URL the snippet's default, after `QUANT_COURSE_REPO`
(the test then demands it in every setup cell).
""",
    True: """\
`QUANT_COURSE_REPO` if set, else the URL above, which pyproject.toml marks as the course's own
(`[tool.quantcourse] repository-published = true`).
""",
}


def readme_section(url: str, notebooks: list[tuple[str, str]], torch_version: str, published: bool = False) -> str:
    """The README's whole "Run a lesson on Colab" section."""
    return SECTION.format(
        published=PUBLISHED[published].format(path=github_path(url)),
        rows="\n".join(table_rows(url, notebooks)),
        clone_rule=CLONE_RULE[published],
        torch=torch_version,
    )


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
    published = repository_published()
    rows = "\n".join(table_rows(url, found)) + "\n"
    text = rows if args.rows else readme_section(url, found, course_torch(), published)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
