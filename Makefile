# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# `make test-fast` runs only the tests that start no Ray cluster, service, job or browser and train nothing long
# (pytest markers `cluster` and `slow`, see pyproject.toml): the quick loop while editing.
# Both create .venv in the repo on first use; later runs reuse it (the stamp makes a re-install a no-op).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ecgad-installed
PIP    := $(PY) -m pip install --quiet --constraint constraints.txt
# Where pip looks for the local CPU torch wheel, when this machine has one.
WHEELS := $(wildcard /opt/wheels)
PIP_FIND := $(if $(WHEELS),--find-links $(WHEELS),)
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(PIP_FIND) "setuptools<81" wheel
	$(PIP) $(PIP_FIND) "torch==2.13.0"
	$(PIP) $(PIP_FIND) -e ".[test,export]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -m "not cluster and not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) -m jobs.demo

bench: install
	for b in bench/[a-z]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo_out .pytest_cache
