"""Read specs at a commit straight from git objects.

Nothing is checked out: the reconciler reads blobs by id through one long-lived ``git cat-file
--batch`` process (GitPython's object database), so a daemon never sees a half-written work tree and
a local repository can be served while someone edits it. A remote source (file://, ssh, https) is
mirrored into ``$AGENT_ORCH_HOME/sources/`` and fetched on each sync; a local path is read in place.

What cannot be read is one of two kinds (``runner.errors``): ``SourceUnavailable`` when trying again
later may work (a clone, fetch or listing failed), with the wait it asks for; ``SourceMissing`` or
``FileTooLarge`` when it will not until the source or the settings change (a ref, a repository, a
folder or a file that is not there; a file over its limit).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import git

from runner.errors import FileTooLarge, FolderMissing, SourceMissing, SourceUnavailable, UsageError
from runner.specs.validating import SpecFile

FETCH_TIMEOUT = 120  # seconds; a hung remote must not hang the reconciler forever
# How long a transient failure asks its caller (the daemon) to wait before the same call again.
FETCH_RETRY = 30.0  # seconds after a failed clone or fetch: a network or remote-host fault outlasts a quick retry
READ_RETRY = 5.0  # seconds after git failed on the repository itself: a gc or another writer holds it a moment
_REMOTE = re.compile(r"^(file|ssh|https?|git)://|^[\w.-]+@[\w.-]+:")


@dataclass(frozen=True)
class Location:
    url: str  # as configured (path or URL)
    ref: str
    path: str  # folder inside the repository, '' for the root

    def describe(self) -> str:
        """Where the specs come from, fit to show and store: a password or token in the URL is masked."""
        return f"{mask_credentials(self.url)}@{self.ref}:{self.path or '.'}"


class GitSource:
    def __init__(self, location: Location, mirror_root: Path) -> None:
        self.location = location
        self.remote = is_remote(location.url)
        self._repo_path = _mirror_path(mirror_root, location.url) if self.remote else Path(location.url)
        self._repo: git.Repo | None = None
        self._files: dict[tuple[str, str], bytes] = {}

    # -- public ---------------------------------------------------------------------------------

    def revision(self, *, fetch: bool = True) -> str:
        """The commit the ref points at now (fetching first for a remote source)."""
        repo = self._open(fetch=fetch)
        if self.remote and fetch:
            self._fetch(repo)
        ref = self.location.ref
        try:
            return str(repo.rev_parse(f"{ref}^{{commit}}").hexsha)
        except (git.BadName, git.BadObject, ValueError, git.GitCommandError):
            raise SourceMissing(f"ref '{ref}' not found in {self.location.url}") from None

    def files(self, revision: str) -> list[SpecFile]:
        """Every file under the source folder at ``revision``, content read lazily by blob id."""
        repo = self._open(fetch=False)
        prefix = _folder(self.location.path)
        try:
            listing = repo.git.ls_tree("-r", "-z", "--full-tree", revision, "--", prefix or ".")
        except git.GitCommandError as exc:
            raise SourceUnavailable(f"cannot list {self.location.describe()} at {revision[:12]}: "
                                    f"{exc.stderr.strip()}", delay=READ_RETRY) from None
        files = []
        for entry in listing.split("\0"):
            if not entry:
                continue
            meta, path = entry.split("\t", 1)
            mode, kind, sha = meta.split()
            if kind != "blob":
                continue  # submodules
            rel = path[len(prefix) + 1:] if prefix else path
            display = path
            if mode == "120000":
                files.append(SpecFile(rel, sha, _symlink_marker, display))
            else:
                files.append(SpecFile(rel, sha, self._reader(repo, sha), display))
        if prefix and not files and not self._has_folder(repo, revision, prefix):
            raise FolderMissing(f"folder '{prefix}' not found in {self.location.url} at {revision[:12]}")
        return files

    def read_file(self, revision: str, path: str, limit: int | None = None) -> bytes:
        """A file at a revision. Cached: a commit never changes, and runs read the same files again.
        With ``limit``, a larger file is refused by its size, unread (FileTooLarge)."""
        key = (revision, path)
        if key in self._files:
            return self._files[key]
        repo = self._open(fetch=False)
        try:
            if limit is not None:
                size = int(repo.git.cat_file("-s", f"{revision}:{path}"))
                if size > limit:
                    raise FileTooLarge(f"{path} is {size} bytes, over the {limit} byte limit of such a file")
            data = bytes(repo.git.show(f"{revision}:{path}", stdout_as_string=False))
        except git.GitCommandError:
            raise SourceMissing(f"{path} not found at {revision[:12]}") from None
        if len(self._files) > 256:
            self._files.clear()
        self._files[key] = data
        return data

    def read_blob(self, blob: str) -> bytes | None:
        """A blob by its id (an ETag the API gave out), or None when the repository has no such blob."""
        if not re.fullmatch(r"[0-9a-f]{40}", blob):
            return None
        try:
            return bytes(self._open(fetch=False).odb.stream(bytes.fromhex(blob)).read())
        except (ValueError, git.BadObject, git.BadName):
            return None

    @property
    def repo_path(self) -> Path:
        return self._repo_path

    # -- internals ------------------------------------------------------------------------------

    def _open(self, *, fetch: bool) -> git.Repo:
        if self._repo is not None:
            return self._repo
        if self.remote:
            if not (self._repo_path / "HEAD").exists():
                self._clone()
        elif not self._repo_path.exists():
            raise SourceMissing(f"spec source {self.location.url} does not exist")
        try:
            self._repo = git.Repo(self._repo_path, search_parent_directories=not self.remote)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise SourceMissing(f"{self.location.url} is not a git repository") from None
        return self._repo

    def _clone(self) -> None:
        tmp = self._repo_path.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a clone that was killed: git refuses a non-empty target
        try:
            git.Repo.clone_from(self.location.url, tmp, mirror=True, kill_after_timeout=FETCH_TIMEOUT)
        except git.GitCommandError as exc:
            raise SourceUnavailable(f"cannot clone {self.location.url}: {_stderr(exc)}", delay=FETCH_RETRY) from None
        os.replace(tmp, self._repo_path)

    def _fetch(self, repo: git.Repo) -> None:
        try:
            repo.git.fetch("--prune", "origin", kill_after_timeout=FETCH_TIMEOUT)
        except git.GitCommandError as exc:
            raise SourceUnavailable(f"cannot fetch {self.location.url}: {_stderr(exc)}", delay=FETCH_RETRY) from None

    @staticmethod
    def _reader(repo: git.Repo, sha: str) -> SpecReader:
        return SpecReader(repo, sha)

    @staticmethod
    def _has_folder(repo: git.Repo, revision: str, prefix: str) -> bool:
        try:
            repo.git.cat_file("-e", f"{revision}:{prefix}")
            return True
        except git.GitCommandError:
            return False

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None


class SpecReader:
    """A blob's content, read when called (through the repository's persistent cat-file process)."""

    __slots__ = ("repo", "sha")

    def __init__(self, repo: git.Repo, sha: str) -> None:
        self.repo, self.sha = repo, sha

    def __call__(self) -> bytes:
        return bytes(self.repo.odb.stream(bytes.fromhex(self.sha)).read())


def _symlink_marker() -> bytes:
    return b"\0symbolic link: specs must be regular files"


def default_source_url(cwd: Path | None = None) -> str:
    """The git repository containing ``cwd`` (the default source: this checkout)."""
    try:
        repo = git.Repo(cwd or Path.cwd(), search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise UsageError("no spec source: run `agentctl apply --source URL_OR_PATH` once (the home remembers it), "
                         "set AGENT_ORCH_SOURCE, or run inside a git repository") from None
    top = repo.working_tree_dir or repo.git_dir
    repo.close()
    return str(top)


def is_remote(url: str) -> bool:
    """Whether ``url`` names a repository to mirror (file://, ssh, https, scp-like) rather than a local path."""
    return bool(_REMOTE.match(url))


def _folder(path: str) -> str:
    """The folder as ls-tree needs it: '' for the root, no '.' or './' (which would list nothing or cut names)."""
    folder = posixpath.normpath(path.strip("/") or ".")
    return "" if folder == "." else folder


def mask_credentials(url: str) -> str:
    return re.sub(r"^([a-z+]+://[^/@:]*):[^/@]*@", r"\1:***@", url)


def _mirror_path(root: Path, url: str) -> Path:
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return root / f"{tail}-{digest}.git"


def _stderr(exc: git.GitCommandError) -> str:
    text = str(exc.stderr or exc).strip()
    return text.removeprefix("stderr:").strip().strip("'").strip() or str(exc)
