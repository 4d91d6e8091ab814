# Two commands for a fresh machine: `make demo` trains on the embedded demo data,
# `make test` runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a multi-gigabyte CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) -m isaret train --auto-resume

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) checkpoints
