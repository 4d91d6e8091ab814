# Two commands for a fresh machine: `make demo` trains on the embedded demo data,
# `make test` runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a multi-gigabyte CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install install-dev clean

# The demo needs the package alone; the tests also need the dev and video extras, installed
# in one pip command (see pyproject.toml for why).
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,video]"
	touch $@

demo: install
	$(PY) -m isaret train --auto-resume

test: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) checkpoints
