"""Write a spec file into the spec repository as one commit, without touching any work tree.

The new tree is built with git plumbing on top of the branch the source follows; the branch moves
with ``update-ref REF NEW OLD``, a compare-and-swap: if it moved since we read it, nothing changes
and the caller gets ConflictError. A remote source is pushed; a rejected push is a conflict too.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from runner.errors import ConflictError, SourceError
from runner.source.git import GitSource


def commit_file(source: GitSource, rel_path: str, content: bytes | None, *, message: str, author: str,
                expect_blob: str | None = None, expect_absent: bool = False) -> tuple[str, str | None]:
    """Put ``content`` at ``rel_path`` (None deletes it). Returns (commit, new blob id)."""
    repo = source.repo_path
    branch = _branch(source)
    old = _git(repo, "rev-parse", branch).strip()
    path = f"{source.location.path.strip('/')}/{rel_path}".lstrip("/")
    current = _blob_at(repo, old, path)
    if expect_absent and current is not None:
        raise ConflictError(f"{path} already exists at {old[:12]}")
    if expect_blob is not None and current != expect_blob:
        raise ConflictError(f"{path} changed since you read it (now {current or 'deleted'}, you had {expect_blob})")
    worktree = _checked_out(repo, branch)
    if worktree is not None and _git(worktree, "status", "--porcelain", "--", path).strip():
        raise ConflictError(f"{path} has uncommitted changes in the checkout {worktree}: commit or discard them, "
                            "then try again")
    # An index of this call's own (in the git folder): the API writes from several threads at once.
    git_dir = Path(repo) / _git(repo, "rev-parse", "--git-dir").strip()
    env = {**os.environ, "GIT_INDEX_FILE": str(git_dir / f"agentctl-index-{os.getpid()}-{uuid.uuid4().hex}")}
    try:
        _git(repo, "read-tree", old, env=env)
        blob = None
        if content is None:
            _git(repo, "update-index", "--remove", "--force-remove", path, env=env)
        else:
            blob = _git(repo, "hash-object", "-w", "--stdin", input=content).strip()
            _git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = _git(repo, "write-tree", env=env).strip()
    finally:
        Path(env["GIT_INDEX_FILE"]).unlink(missing_ok=True)
    ident = {"GIT_AUTHOR_NAME": author, "GIT_AUTHOR_EMAIL": f"{author}@agent-orchestrator.invalid",
             "GIT_COMMITTER_NAME": "agent-orchestrator", "GIT_COMMITTER_EMAIL": "api@agent-orchestrator.invalid"}
    commit = _git(repo, "commit-tree", tree, "-p", old, "-m", message, env={**os.environ, **ident}).strip()
    try:
        _git(repo, "update-ref", branch, commit, old)
    except SourceError:
        raise ConflictError(f"{branch} moved while writing; read again and retry") from None
    if worktree is not None:
        # Like git's receive.denyCurrentBranch=updateInstead: the checkout follows its branch, so a
        # person's next `git commit -a` does not quietly undo what the API wrote.
        _git(worktree, "read-tree", "-m", "-u", old, commit)
    if source.remote:
        try:
            _git(repo, "push", "origin", f"{commit}:{branch}")
        except SourceError as exc:
            _git(repo, "update-ref", branch, old, commit)
            raise ConflictError(f"the spec repository refused the push: {exc.message}") from None
    return commit, blob


def _checked_out(repo: Path, branch: str) -> Path | None:
    """The work tree where ``branch`` is checked out, if the repository has one."""
    if _git(repo, "rev-parse", "--is-bare-repository").strip() == "true":
        return None
    try:
        head = _git(repo, "symbolic-ref", "-q", "HEAD").strip()
    except SourceError:
        return None
    return Path(_git(repo, "rev-parse", "--show-toplevel").strip()) if head == branch else None


def _branch(source: GitSource) -> str:
    ref = source.location.ref
    repo = source.repo_path
    if ref == "HEAD":
        return _git(repo, "symbolic-ref", "HEAD").strip()
    full = _git(repo, "rev-parse", "--symbolic-full-name", ref).strip()
    if not full.startswith("refs/heads/"):
        raise ConflictError(f"the source follows '{ref}', which is not a branch: the API cannot write to it")
    return full


def _blob_at(repo: Path, commit: str, path: str) -> str | None:
    try:
        return _git(repo, "rev-parse", f"{commit}:{path}").strip()
    except SourceError:
        return None


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, input: bytes | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, env=env, input=input, check=False)
    if done.returncode != 0:
        raise SourceError(f"git {args[0]}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()
