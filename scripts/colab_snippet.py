# The first lines of every lesson's setup cell, right after its two `# NBVAL_IGNORE_OUTPUT` lines.
# In the course's .venv they do nothing (`helper` is installed). Anywhere else (Colab, or a Jupyter
# without `make setup`) they clone the course, run scripts/colab_setup.py with the kernel's own Python
# (it installs the lessons' libraries and models and keeps the installed torch), and change into the
# repository's root, so that `import helper` finds helper.py. tests/test_helper_colab.py checks that
# every notebook holds the code below verbatim and that its URL is pyproject.toml's Repository.
# QUANT_COURSE_REPO overrides the URL (make test-colab clones a local copy). The snippet follows.
import importlib.util
import os

if importlib.util.find_spec("helper") is None:  # not in the course's environment: on Colab, or a bare Jupyter
    import subprocess
    import sys

    root = ".." if os.path.isfile("../helper.py") else "quantization-course"  # in a clone's notebooks/, or Colab
    if not os.path.isdir(root):
        repo = os.environ.get("QUANT_COURSE_REPO", "https://github.com/quantization-course/quantization-course")
        subprocess.run(["git", "clone", "--quiet", "--depth=1", repo, root], check=True)
    setup = [sys.executable, "-u", os.path.join(root, "scripts", "colab_setup.py")]  # installs the rest, keeps torch
    with subprocess.Popen(setup, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        for line in run.stdout:  # printed here as it comes, whatever the kernel does with a child's output
            print(line, end="")
    if run.returncode:
        raise RuntimeError(f"scripts/colab_setup.py failed (exit status {run.returncode}); its messages are above")
    os.chdir(root)  # the repository's root holds helper.py: `import helper` below finds it
