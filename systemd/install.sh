#!/bin/sh
# Install agent-orchestrator as a systemd service: `make agent-orchestrator` (as root).
# Usage: systemd/install.sh [PREFIX]   (default /opt/agent-orchestrator)
set -eu
PREFIX=${1:-/opt/agent-orchestrator}
SRC=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then echo "install.sh: run as root (sudo make agent-orchestrator)" >&2; exit 2; fi
command -v systemctl >/dev/null || { echo "install.sh: systemd is needed; use 'make run' instead" >&2; exit 2; }
getent passwd agent-orchestrator >/dev/null || \
  useradd --system --home-dir /var/lib/agent-orchestrator --shell /usr/sbin/nologin agent-orchestrator
mkdir -p "$PREFIX" /etc/agent-orchestrator
# The code, with its git history: the default spec source is this repository.
if [ "$SRC" != "$PREFIX" ]; then
  git clone --quiet "$SRC" "$PREFIX.new" && rm -rf "$PREFIX" && mv "$PREFIX.new" "$PREFIX"
fi
make -C "$PREFIX" install
[ -f /etc/agent-orchestrator/env ] || printf 'AGENT_ORCH_SOURCE=%s\n' "$PREFIX" > /etc/agent-orchestrator/env
chown -R agent-orchestrator:agent-orchestrator "$PREFIX"
for unit in agent-orchestrator.service agent-orchestrator-run@.service agent-orchestrator-run@.timer; do
  sed "s#/opt/agent-orchestrator#$PREFIX#g" "$SRC/systemd/$unit" > "/etc/systemd/system/$unit"
done
systemctl daemon-reload
systemctl enable --now agent-orchestrator.service
echo "agent-orchestrator is running: systemctl status agent-orchestrator; make agent-orchestrator-logs"
