"""The push gate: git hooks that keep bad specs out of the repository and wake the daemon.

pre-receive runs inside the bare repository before any ref moves, with the pushed objects visible
through git's quarantine environment; it validates the specs at every pushed ref and rejects the whole
push, printing the problems to the pusher's terminal, when any is invalid. post-receive touches the
client's reconcile-request file; a running daemon watches it and reconciles at once (without a daemon
the touch is harmless).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TextIO

from runner.errors import FolderMissing
from runner.settings import Settings
from runner.source.git import GitSource, Location
from runner.specs.validating import validate_tree

ZERO = "0" * 40


def install(bare_repo: Path, *, settings: Settings, spec_path: str) -> list[Path]:
    hooks = bare_repo / "hooks"
    hooks.mkdir(exist_ok=True)
    agentctl = Path(sys.argv[0]).absolute() if Path(sys.argv[0]).name == "agentctl" else None
    command = shlex.quote(str(agentctl)) if agentctl and agentctl.exists() else \
        f"{shlex.quote(sys.executable)} -m runner"
    base = f"{command} --home {shlex.quote(str(settings.home))} --client-id {shlex.quote(settings.client_id)}"
    scripts = {
        "pre-receive": f"{base} hook pre-receive --path {shlex.quote(spec_path.strip('/'))}",
        "post-receive": f"{base} hook post-receive",
    }
    written = []
    for name, line in scripts.items():
        target = hooks / name
        target.write_text(f"#!/bin/sh\n# installed by agentctl hook install\nexec {line}\n")
        target.chmod(0o755)
        written.append(target)
    return written


def pre_receive(updates: TextIO, out: TextIO, *, spec_path: str, client_id: str, home: str) -> int:
    """Validate the specs of each pushed ref; 1 (reject the push) when any ref holds an invalid spec."""
    rejected = False
    for line in updates:
        parts = line.split()
        if len(parts) != 3:
            continue
        _old, new, ref = parts
        if new == ZERO:
            continue  # a deleted ref has no specs to check
        source = GitSource(Location(os.getcwd(), new, spec_path), Path(home) / "sources")
        try:
            files = source.files(new)
        except FolderMissing:  # any other failure to read what was pushed rejects the push: the gate fails closed
            out.write(f"agent-orchestrator: {ref}: no '{spec_path}' folder, nothing to validate\n")
            continue
        finally:
            source.close()
        results, _ = validate_tree(files, client_id=client_id, home=home)
        problems = [p for r in results for p in r.problems]
        errors = [p for p in problems if p.severity == "error"]
        for p in problems:
            out.write(f"{p}\n")
        if errors:
            rejected = True
            out.write(f"agent-orchestrator: {ref} rejected: {len(errors)} error(s) in "
                      f"{sum(1 for r in results if not r.valid)} spec file(s); fix them and push again\n")
        else:
            out.write(f"agent-orchestrator: {ref}: {len(results)} spec(s) valid\n")
    out.flush()
    return 1 if rejected else 0


def post_receive(settings: Settings, updates: str, out: TextIO) -> None:
    request = reconcile_request_path(settings)
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(updates)
    out.write("agent-orchestrator: reconcile requested\n")


def reconcile_request_path(settings: Settings) -> Path:
    """The file a daemon watches for 'reconcile now' (written by post-receive and the API webhook)."""
    return settings.home / "run" / f"{settings.client_id}.reconcile"
