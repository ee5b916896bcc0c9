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

# The report's browser test drives headless Chromium: install it from the OS packages where apt-get may
# (root, or sudo without a password); elsewhere say so in one line and go on (that test then skips, saying why).
test: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then as=; elif sudo -n true 2>/dev/null; then as="sudo -n"; else as=none; fi; \
	  if [ "$$as" != none ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver from the OS packages (the report's browser test)"; \
	    { $$as apt-get update -qq && $$as env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null; } || echo "could not install chromium: the browser test will skip"; \
	  else echo "no chromium, and apt-get is not usable here (root or passwordless sudo): the browser test will skip"; fi; }
	$(RUN) pytest

bench: install
	$(RUN) python benchmarks/gguf_converter.py
	$(RUN) python benchmarks/onnx_runtime.py

clean-venv:
	rm -rf $(VENV)
