"""The systemd units pass `systemd-analyze verify` (with ExecStart pointed at this venv's agentctl)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

UNITS = ROOT / "systemd"


def _copy_units(tmp_path: Path) -> Path:
    venv = Path(sys.executable).parent
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/opt/agent-orchestrator/.venv/bin/agentctl", str(venv / "agentctl"))
        text = text.replace("/opt/agent-orchestrator/.venv/bin/ray", str(venv / "ray"))
        (tmp_path / unit.name).write_text(text)
    for unit in UNITS.glob("*.timer"):
        shutil.copy(unit, tmp_path / unit.name)
    for template in ("agent-orchestrator-run@.service", "agent-orchestrator-run@.timer"):
        shutil.copy(tmp_path / template, tmp_path / template.replace("@.", "@hello."))
    return tmp_path


def verify(folder: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", *units], cwd=folder, capture_output=True, text=True,
                          check=False)


def test_units_verify(tmp_path: Path) -> None:
    folder = _copy_units(tmp_path)
    done = verify(folder, "agent-orchestrator.service", "agent-orchestrator-run@hello.service",
                  "agent-orchestrator-run@hello.timer", "agent-orchestrator-ray-head.service",
                  "agent-orchestrator-ray-worker.service")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr  # not even a warning


def test_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    """The check above means something: a misspelt hardening key is reported."""
    folder = _copy_units(tmp_path)
    unit = folder / "agent-orchestrator.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    done = verify(folder, "agent-orchestrator.service")
    assert "Unknown key 'NoNewPrivilege'" in done.stderr


def test_service_is_hardened() -> None:
    text = (UNITS / "agent-orchestrator.service").read_text()
    for line in ("ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure",
                 "StateDirectory=agent-orchestrator", "AGENT_ORCH_LOG_DIR=/var/log/agency_stack/components"):
        assert line in text
    assert "Persistent=true" in (UNITS / "agent-orchestrator-run@.timer").read_text()
    assert "agentctl run %i" in (UNITS / "agent-orchestrator-run@.service").read_text()
