"""Execute every lesson notebook and write browsable HTML with an index (the course command).

Usage: python scripts/run_course.py            # execute copies into build/, write build/html/
       python scripts/run_course.py --in-place [NOTEBOOK ...]  # refresh the stored outputs
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BUILD = REPO / "build"
CELL_TIMEOUT_S = 1200


PEAK_PROBE = "import helper as _h\nprint('__PEAK_MB__', _h.peak_rss_mb())"


def execute(path: Path) -> tuple[nbformat.NotebookNode, float, float]:
    """Run one notebook top to bottom in its own folder: (notebook, seconds, the kernel's peak MB).

    The peak is the kernel process's own high-water mark (helper.peak_rss_mb, MB = 10**6 bytes),
    read by one extra cell appended for the run and removed before the notebook is saved.
    """
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PEAK_PROBE))
    start = time.perf_counter()
    ExecutePreprocessor(timeout=CELL_TIMEOUT_S, kernel_name="python3").preprocess(
        notebook, {"metadata": {"path": str(path.parent)}}
    )
    seconds = time.perf_counter() - start
    probe = notebook.cells.pop()
    text = "".join(o.get("text", "") for o in probe.outputs)
    peak_mb = float(text.split("__PEAK_MB__")[1].split()[0]) if "__PEAK_MB__" in text else float("nan")
    return notebook, seconds, peak_mb


def title_of(notebook: nbformat.NotebookNode, fallback: str) -> str:
    """The first markdown heading of a notebook."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("# ").strip()
    return fallback


def write_index(rows: list[tuple[str, str, float, float]], total: float) -> Path:
    """build/html/index.html: every lesson, a link to its executed HTML, its run time and peak memory."""
    items = "\n".join(
        f"<tr><td><a href='{html.escape(href)}'>{html.escape(title)}</a></td><td>{seconds:.0f} s</td>"
        f"<td>{peak:,.0f} MB</td></tr>"
        for href, title, seconds, peak in rows
    )
    peak_mb = max((peak for *_, peak in rows), default=float("nan"))
    page = (
        "<!doctype html><meta charset='utf-8'><title>Quantization course</title>"
        "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}"
        "td{padding:.3em 1em}</style><h1>Quantization course: executed lessons</h1>"
        f"<table><tr><th>Lesson</th><th>Run time</th><th>Peak memory</th></tr>{items}</table>"
        f"<p>Total {total:.0f} s; peak memory of one lesson's kernel {peak_mb:,.0f} MB.</p>"
    )
    out = BUILD / "html" / "index.html"
    out.write_text(page)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-place", action="store_true", help="overwrite the stored outputs")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    paths = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    (BUILD / "html").mkdir(parents=True, exist_ok=True)
    rows, total = [], 0.0
    for path in paths:
        print(f"Executing {path.name} ...", flush=True)
        notebook, seconds, peak_mb = execute(path)
        total += seconds
        print(f"  done in {seconds:.0f} s, peak memory {peak_mb:,.0f} MB", flush=True)
        if args.in_place:
            nbformat.write(notebook, path)
            continue
        body, _ = HTMLExporter().from_notebook_node(notebook)
        (BUILD / "html" / f"{path.stem}.html").write_text(body)
        rows.append((f"{path.stem}.html", title_of(notebook, path.stem), seconds, peak_mb))
    if not args.in_place:
        print(f"Open {write_index(rows, total)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
