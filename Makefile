# Two commands a newcomer needs:  make demo   and   make test
# (make up: the whole stack locally until Ctrl-C, with the export lines for
# `piopiy-voice call/status/control` in another terminal)
# Each creates .venv and installs the project on first use (and again when
# pyproject.toml changes). Needs Python >= 3.11 and a C compiler.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo up test bench venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 needed, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/piopiy-voice demo

up: $(STAMP)
	$(BIN)/piopiy-voice up

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) reports .pytest_cache
