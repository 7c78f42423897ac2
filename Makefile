# Every target sets up .venv (and the offline data) first when needed.
# TORCH_SPEC: the torch requirement installed before the project. The default takes the
# CPU build; on a CUDA machine use e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.anchorlearn-installed
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup data demo test test-slow bench lint format clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,faiss]"
	touch $(STAMP)

data:
	bash scripts/install_data.sh

demo: setup
	$(VENV)/bin/anchorlearn demo --out $(RUN_DIR)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/sar_overhead.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
