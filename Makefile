# Every target sets up .venv (and the offline data) first when needed.
# TORCH_SPEC: the torch requirement installed before the project. pip takes the build of
# torch 2.13.0 its configured sources offer: the CPU build where pip finds a local CPU wheel
# (as on the CI machines), otherwise PyPI's, which pulls several GB of CUDA libraries. For a
# CPU-only build from PyTorch's index: `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
# On a CUDA machine use e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.anchorlearn-installed
# records the torch requirement the venv was installed with: a new TORCH_SPEC or
# TORCH_INDEX re-runs the installation
TORCH_RECORD := $(VENV)/.torch-spec
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
TIMM_PACKAGES ?= torchvision==0.28.0 timm==1.0.31

.PHONY: setup data demo test test-slow bench lint format clean FORCE

setup: $(STAMP) data

$(TORCH_RECORD): FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(TORCH_INDEX)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(TORCH_INDEX)' > $@

$(STAMP): pyproject.toml $(TORCH_RECORD)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,faiss,pretrained]"
	# timm's encoders and the torchvision release of torch 2.13 it imports, without letting
	# pip replace torch (see src/anchorlearn/models/_torchvision_compat.py)
	$(PY) -m pip install --no-deps $(TIMM_PACKAGES)
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
