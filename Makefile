# Two entry points for a fresh machine: `make repro` (main job) and `make test` (test suite).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Stages call `python ...`: the venv must come first on PATH for dvc.
RUN := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: install repro test bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

repro: install
	$(RUN) dvc repro
	$(RUN) dvc metrics show metrics/reference.json metrics/parity

test: install
	$(RUN) pytest

bench: install
	$(RUN) python benchmarks/gguf_converter.py
	$(RUN) python benchmarks/onnx_runtime.py

clean-venv:
	rm -rf $(VENV)
