"""The course site and the slides open in a real browser (headless Chromium) and their links resolve.

`scripts/run_course.py --no-execute` builds the site from the stored outputs (what `make course`
writes after executing), `--slides` the reveal.js decks (`make slides`). Chromium renders each
page (`--dump-dom` returns the DOM after its scripts ran); the test follows the navigation bar
from the contents through every lesson and back, and checks that reveal.js really started in a
deck with no solutions in it. `make setup-browser` installs Debian's Chromium (`make test` does).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import helper

REPO = Path(helper.REPO_DIR)
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what a headless Chromium needs on this closed network (no background connections, no sandbox as root)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LINK = re.compile(r"<a\b[^>]*>", re.S)
# the site's HTML and links are the same whatever the CPU's instruction sets: the forced-AVX2 pass leaves these out
pytestmark = [pytest.mark.slow, pytest.mark.cpu_independent]


def attribute(tag: str, name: str) -> str | None:
    found = re.search(rf"\b{name}=\"([^\"]*)\"", tag)
    return found.group(1) if found else None


class Browser:
    def __init__(self, profile: Path):
        if not Path(CHROMIUM).exists():
            raise RuntimeError("Chromium is not installed: run `make setup-browser`")
        self.profile = profile
        self.doms: dict[Path, str] = {}

    def run(self, url: str, *extra: str) -> str:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", *extra, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    def dom(self, page: Path) -> str:
        """The page's DOM after its scripts ran (3 s of virtual time), as Chromium serializes it.

        Rendered once per page (a Chromium start costs about a second); the built pages do not change.
        """
        if page not in self.doms:
            self.doms[page] = self.run(page.as_uri(), "--dump-dom", "--virtual-time-budget=3000")
        return self.doms[page]

    def links(self, page: Path, rel: str | None = None) -> list[Path]:
        """The targets of the page's links (with that rel), resolved against the page's folder."""
        tags = [tag for tag in LINK.findall(self.dom(page)) if rel is None or attribute(tag, "rel") == rel]
        return [(page.parent / attribute(tag, "href")).resolve() for tag in tags if attribute(tag, "href")]

    def screenshot(self, page: Path, png: Path) -> Path:
        self.run(page.as_uri(), f"--screenshot={png}", "--window-size=1280,900", "--virtual-time-budget=3000")
        return png


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Browser]:
    root = tmp_path_factory.mktemp("site")
    script = REPO / "scripts" / "run_course.py"
    for args in (["--slides", "--out", str(root / "slides")], ["--no-execute", "--out", str(root / "html")]):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, Browser(root / "profile")


def test_contents_page_links_every_lesson_and_its_slides(built):
    root, browser = built
    index = root / "html" / "index.html"
    targets = browser.links(index)
    pages = [root / "html" / f"{p.stem}.html" for p in NOTEBOOKS]
    decks = [root / "slides" / f"{p.stem}.slides.html" for p in NOTEBOOKS]
    assert [t for t in targets if t.suffix == ".html" and t.parent == root / "html"] == pages
    assert [t for t in targets if t.parent == root / "slides"] == decks
    assert all(t.exists() for t in targets)
    text = browser.dom(index)
    for path in NOTEBOOKS:  # each lesson's title, stored run time and the machine its outputs were made on
        run = nbformat.read(path, as_version=4).metadata["course"]["last_run"]
        assert f"{run['seconds']:.0f} s" in text and run["machine"] in text


def test_previous_and_next_walk_through_every_lesson(built):
    root, browser = built
    pages = [root / "html" / f"{p.stem}.html" for p in NOTEBOOKS]
    for i, page in enumerate(pages):
        contents = browser.links(page, "contents")
        assert contents and all(t == root / "html" / "index.html" for t in contents)  # top and bottom bars
        expected_next = [pages[i + 1]] * 2 if i + 1 < len(pages) else []
        expected_prev = [pages[i - 1]] * 2 if i > 0 else []
        assert browser.links(page, "next") == expected_next, page.name
        assert browser.links(page, "prev") == expected_prev, page.name
        assert "outputs made on" in browser.dom(page)


def test_slides_start_reveal_and_leave_the_solutions_out(built):
    root, browser = built
    deck = root / "slides" / "12_decode_speed.slides.html"
    dom = browser.dom(deck)
    assert re.search(r'class="[^"]*\breveal\b[^"]*\bready\b', dom), "reveal.js did not start (no 'ready' class)"
    assert "Summary and takeaways" in dom and "Exercise 1" in dom
    assert "Solutions" not in dom and "check_ex1(576" not in dom  # the solution cells are gone
    notebook = nbformat.read(REPO / "notebooks" / "12_decode_speed.ipynb", as_version=4)
    headings = sum(len(re.findall(r"^#{1,2}\s", c.source, re.M)) for c in notebook.cells if c.cell_type == "markdown")
    stacks = re.findall(r'<section[^>]*class="stack\b', dom)  # reveal.js's top-level slides, once started
    assert len(stacks) == headings >= 9  # the title, Setup, the numbered sections, Exercises, the summary
    assert "white-space: pre-wrap" in dom  # long code lines wrap on a slide instead of being cut off


def test_screenshots_render(built):
    root, browser = built
    shots = []
    for page in (root / "html" / "index.html", root / "html" / "12_decode_speed.html"):
        shots.append(browser.screenshot(page, root / f"{page.stem}.png"))
    shots.append(browser.screenshot(root / "slides" / "12_decode_speed.slides.html", root / "slide.png"))
    for png in shots:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png  # a real, non-blank image


def test_site_and_slides_fold_the_bootstrap_into_one_line(built):
    """The first code a reader of the site or the slides sees is the lesson's, not the Colab set-up."""
    root, _ = built
    run_course = helper.load_script("scripts/run_course.py")
    for path in NOTEBOOKS:
        assert "on_colab()" in nbformat.read(path, as_version=4).cells[2].source  # the notebook keeps it
        for page in (root / "html" / f"{path.stem}.html", root / "slides" / f"{path.stem}.slides.html"):
            text = page.read_text()
            assert "on_colab" not in text and "QUANT_COURSE_SETUP" not in text, page.name
            assert "scripts/colab_snippet.py" in text and "setup_notebook" in text, page.name
    folded = run_course.fold_bootstrap(nbformat.read(NOTEBOOKS[0], as_version=4))
    assert folded.cells[2].source.startswith("# NBVAL_IGNORE_OUTPUT\n# reason:")
    assert run_course.BOOTSTRAP_FOLDED in folded.cells[2].source
