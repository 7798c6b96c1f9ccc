"""The push gate: real pushes into a real bare repository with the hooks agentctl installs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import agentctl, git

VALID = "name: x\nmodel: llama2\ndescription: pushed agent\n"
INVALID = "name: x\nmodel: llama2\ndescription: pushed agent\nbogus: 1\n"  # unknown field at 4:1


class Gate:
    """A bare repository with the push gate installed, and a clone to push from."""

    def __init__(self, root: Path, home: Path) -> None:
        self.bare = root / "central.git"
        self.work = root / "work"
        self.home = home
        git(root, "init", "-q", "--bare", "-b", "main", str(self.bare))
        done = agentctl("hook", "install", str(self.bare), home=home)
        assert done.returncode == 0, done.stdout + done.stderr
        git(root, "clone", "-q", str(self.bare), str(self.work))

    def commit(self, rel: str, text: str) -> str:
        target = self.work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", f"write {rel}")
        return git(self.work, "rev-parse", "HEAD")

    def push(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "push", "origin", *args], cwd=self.work, capture_output=True, text=True,
                              check=False, timeout=60)

    def tip(self, branch: str) -> str:
        return git(self.bare, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)

    @property
    def request(self) -> Path:
        return self.home / "run" / "default.reconcile"


@pytest.fixture
def gate(tmp_path: Path, home: Path) -> Gate:
    return Gate(tmp_path, home)


def test_install_writes_executable_hooks_bound_to_the_home(gate: Gate) -> None:
    for name in ("pre-receive", "post-receive"):
        hook = gate.bare / "hooks" / name
        assert hook.stat().st_mode & 0o111, f"{hook} is not executable"
        assert f"--home {gate.home}" in hook.read_text()
    assert not gate.request.exists()


def test_valid_push_is_accepted_and_an_invalid_one_rejected(gate: Gate) -> None:
    good = gate.commit("specs/x.yaml", VALID)
    done = gate.push("main")
    assert done.returncode == 0, done.stderr
    assert "agent-orchestrator: refs/heads/main: 1 spec(s) valid" in done.stderr
    assert gate.tip("main") == good
    assert gate.request.read_text().split() == ["0" * 40, good, "refs/heads/main"]  # written by post-receive

    gate.commit("specs/x.yaml", INVALID)
    done = gate.push("main")
    assert done.returncode != 0
    assert "remote: specs/x.yaml:4:1: error: bogus: unknown field 'bogus'" in done.stderr, done.stderr
    assert "agent-orchestrator: refs/heads/main rejected: 1 error(s) in 1 spec file(s)" in done.stderr
    assert "pre-receive hook declined" in done.stderr
    assert gate.tip("main") == good
    assert gate.request.read_text().split()[1] == good  # post-receive did not run


def test_branches_one_bad_ref_rejects_the_push_no_specs_and_deletion_pass(gate: Gate) -> None:
    base = gate.commit("specs/x.yaml", VALID)
    assert gate.push("main").returncode == 0
    git(gate.work, "checkout", "-q", "-b", "good")
    gate.commit("specs/y.yaml", VALID.replace("name: x", "name: y"))
    git(gate.work, "checkout", "-q", "-b", "bad", "main")
    gate.commit("specs/z.yaml", INVALID.replace("name: x", "name: z"))
    done = gate.push("good", "bad")
    assert done.returncode != 0
    assert "refs/heads/good: 2 spec(s) valid" in done.stderr, done.stderr
    assert "remote: specs/z.yaml:4:1: error: " in done.stderr and "refs/heads/bad rejected" in done.stderr
    assert (gate.tip("good"), gate.tip("bad"), gate.tip("main")) == ("", "", base)

    git(gate.work, "checkout", "-q", "--orphan", "docs")
    git(gate.work, "rm", "-q", "-r", "-f", ".")
    head = gate.commit("README.md", "no specs here\n")
    done = gate.push("docs")
    assert done.returncode == 0, done.stderr
    assert "refs/heads/docs: no 'specs' folder, nothing to validate" in done.stderr
    assert gate.tip("docs") == head

    deleted = gate.push("--delete", "docs")
    assert deleted.returncode == 0, deleted.stderr
    assert gate.tip("docs") == ""
    assert gate.request.read_text().split() == [head, "0" * 40, "refs/heads/docs"]
