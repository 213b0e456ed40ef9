# The two set-up commands of the README. Each makes its own virtual
# environment in .venv and installs the versions pinned in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test bench venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

venv: $(BIN)/python

demo: venv
	$(PIP) -e .
	$(BIN)/gemma4-jax demo

# Two pytest-xdist workers use both cores (one pytest process keeps ~1.25
# busy); tests/conftest.py makes the work units (loadscope's scopes) and
# orders them longest first, which --no-loadscope-reorder keeps.
test: venv
	$(PIP) -e ".[test,hf]"
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

bench: venv
	$(PIP) -e ".[test,hf]"
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks
