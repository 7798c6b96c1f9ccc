"""A custom tool that cannot be imported makes the agents that use it Invalid, and nothing else."""

from __future__ import annotations

import json

from conftest import SpecRepo

BROKEN = '''
from langchain_core.tools import tool
import a_package_that_is_not_installed

PERMISSIONS = ["read"]


@tool
def peek(path: str) -> str:
    """Peek."""
    return ""
'''


def test_import_failure_marks_only_its_users_invalid(repo: SpecRepo, cli) -> None:
    repo.write("specs/tools/peek.py", BROKEN)
    repo.spec("user", extra="tools:\n  - name: peek\n    paths: [/srv/peek]\n")
    repo.spec("bystander")
    repo.commit()
    done = cli("apply")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "create bystander" in done.stdout
    assert "invalid user:" in done.stdout and "a_package_that_is_not_installed" in done.stdout
    status = json.loads(cli("--output", "json", "status").stdout)
    states = {a["name"]: a["state"] for a in status["agents"]}
    assert states == {"bystander": "Ready", "user": "Invalid"}

    repo.write("specs/tools/peek.py", BROKEN.replace("import a_package_that_is_not_installed\n", ""))
    repo.commit("fix the tool")
    fixed = cli("apply")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "create user" in fixed.stdout
