# make demo : create .venv if missing, install comflp, run the whole pipeline on the embedded default
# make test : create .venv if missing, install comflp with its test extra, run the test suite
PYTHON ?= python3
VENV ?= .venv
# The locally served CPU wheel; any other version would pull CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.comflp-installed

.PHONY: install demo test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m comflp demo

# one worker per core (at most 4), one torch thread each (tests/conftest.py), each test file on one worker
test: install
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

clean-venv:
	rm -rf $(VENV)
