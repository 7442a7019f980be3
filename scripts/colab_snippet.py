# The first lines of every lesson's setup cell, right after its two `# NBVAL_IGNORE_OUTPUT` lines;
# tests/test_course_colab.py checks that every notebook holds the code below verbatim.
# - In the course's .venv (`helper` importable) they do nothing.
# - They install only on Colab, told by on_colab(): Colab's kernel has imported google.colab before
#   the first cell runs; a module in this kernel, unlike an environment variable, does not come
#   along from elsewhere by chance. Anywhere else, only with the opt-in QUANT_COURSE_SETUP=1.
#   Without either they stop with a RuntimeError that gives the README's commands: nothing is
#   installed into a Python (a base or conda Jupyter) that nobody asked to change.
# - They clone the course only when no copy is there (a clone's notebooks/ has ../helper.py; a
#   second run finds quantization-course/), and only from a URL they were told is the course's
#   own: QUANT_COURSE_REPO. The default after it is empty while pyproject.toml marks its
#   Repository URL as a placeholder ([tool.quantcourse] repository-published = false): nothing is
#   ever cloned from a namespace the course does not own. Once the URL is the course's own and
#   marked so, it becomes the default here and in every setup cell (the test checks that too).
# - Then scripts/colab_setup.py, from that copy, runs in the kernel (bootstrap): it installs the
#   lessons' libraries and models into the kernel's Python, keeping its torch and every package
#   the kernel has already imported, and changes into the repository's root, where `import helper`
#   finds helper.py. The snippet follows.
import importlib.util
import os
import runpy
import subprocess
import sys

on_colab = lambda: "google.colab" in sys.modules  # Colab's kernel has imported it before the first cell runs
if importlib.util.find_spec("helper") is None:  # not in the course's .venv: set up on Colab or when asked, else stop
    root = ".." if os.path.isfile("../helper.py") else "quantization-course"  # in a clone's notebooks/, or a new clone
    url = os.environ.get("QUANT_COURSE_REPO", "")  # no default: pyproject.toml's URL is a placeholder (README)
    if not (on_colab() or os.environ.get("QUANT_COURSE_SETUP") == "1") or not (os.path.isdir(root) or url):
        raise RuntimeError(
            "Nothing installed. Run `make course` (or `make setup`), then `.venv/bin/jupyter lab notebooks/`. Or, to "
            "install into this Python, QUANT_COURSE_SETUP=1 (outside a clone, also QUANT_COURSE_REPO); see README.md."
        )
    if not os.path.isdir(root):
        subprocess.run(["git", "clone", "--quiet", "--depth=1", "--", url, root], check=True)
    runpy.run_path(f"{root}/scripts/colab_setup.py")["bootstrap"]()  # installs into this kernel, enters the clone
