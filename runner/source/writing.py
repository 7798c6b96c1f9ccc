"""Write a spec file into the spec repository as one commit, without touching any work tree.

The new tree is built with git plumbing on top of the branch the source follows; the branch moves
with ``update-ref REF NEW OLD``, a compare-and-swap: if it moved since we read it, nothing changes
and the caller gets ConflictError. A remote source is pushed; a rejected push is a conflict too.

An update keeps the user's file (``rewrite_spec``): the current text is loaded with ruamel.yaml's
round-trip loader, only the fields whose meaning the new spec changes are written into it, and it is
dumped with the file's own indentation. Comments, key order, quoting, the ``yaml-language-server``
header and the defaults the file leaves unset stay as the user wrote them.
"""

from __future__ import annotations

import difflib
import io
import itertools
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.error import YAMLError as RuamelError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, LiteralScalarString, SingleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from runner.errors import ConflictError, SourceError, SourceUnavailable
from runner.source.git import GitSource
from runner.specs.loading import load_document
from runner.specs.models import AgentSpec

WRITE_RETRY = 2.0  # seconds a failed git command asks to wait: another writer's lock is held for milliseconds


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


# -- an update that keeps the user's file ------------------------------------------------------------------


def rewrite_spec(current: bytes, spec: dict[str, Any]) -> bytes:
    """The text of ``current``, changed only where ``spec`` means something else.

    Meaning is compared, not text: both sides go through the spec model (defaults filled in), so a
    field the body repeats as the API showed it (a default the file leaves unset, ``timeout: 30`` for
    ``30.0``) is no change and its line, or its absence, stays. A field whose meaning changed is written
    with the body's value: into the mapping or list it belongs to when both sides have one (so the rest
    of it and its comments stay), as a whole otherwise; a field the body leaves out whose meaning
    changed is removed. What comes out must mean exactly ``spec``; when the current file cannot be
    round-tripped (not YAML, not a valid spec) or the result would mean anything else, it is
    ``dump_spec(spec, current)``.

    ruamel.yaml writes again what it read, with three known differences on the lines it does not
    change: one indentation for the whole file (the file's first), one space after a colon, and
    ``true``/``false`` for ``True``/``False``. A file that changes in no meaning is returned as it is.
    """
    wanted = _meaning(spec)
    bom = "\ufeff" if current.startswith(b"\xef\xbb\xbf") else ""
    was = _meaning(_data(current))  # (bounded: the file at the branch may be anything anyone pushed)
    if was is not None and was == wanted:
        return current  # nothing to change: not even ruamel.yaml's own spelling of the rest
    if was is None or wanted is None:
        return dump_spec(spec, current)
    text = current.decode("utf-8-sig")
    rt = _round_trip(text)
    out = io.StringIO()
    try:
        document = rt.load(text)
        if not isinstance(document, CommentedMap):
            return dump_spec(spec, current)
        rest = _take(_end(document, list(document)[-1]))  # the lines that end the file stay at its end
        _merge(document, spec, was, wanted)
        _give(_end(document, list(document)[-1]), rest)
        rt.dump(document, out)
        same = _meaning(_data(out.getvalue().encode())) == wanted
    except (RuamelError, AttributeError, KeyError, IndexError, TypeError, ValueError):  # what ruamel cannot place
        same = False
    if not same:  # never commit a file that means anything but what was asked
        return dump_spec(spec, current)
    return (bom + out.getvalue()).encode()


def _data(raw: bytes) -> Any:
    doc, _problems = load_document(raw, "spec")
    return doc.data if doc is not None else None


def _meaning(data: Any) -> dict[str, Any] | None:
    try:
        return AgentSpec.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return None


def dump_spec(spec: dict[str, Any], like: bytes = b"") -> bytes:
    """``spec`` as a new file: block style, multi-line text as ``|`` blocks, in the indentation of
    ``like`` (the file it replaces) under its leading comment lines (the schema header), if any."""
    text = like.decode("utf-8", "replace")
    header = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header.append(line)
    out = io.StringIO()
    _round_trip(text).dump(_styled(spec, None), out)
    return ("".join(header) + out.getvalue()).encode()


def _round_trip(text: str) -> YAML:
    """A round-trip YAML that writes with the file's own indentation and never folds a long line."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 1 << 16
    mapping, offset = _indentation(text)
    rt.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    rt.explicit_start = any(line.rstrip() == "---" for line in _content_lines(text)[:1])
    return rt


_KEY_LINE = re.compile(r"^(\s*)(- )?[^#\s][^#]*:\s*(#.*)?$")  # `key:` with its value on the lines below


def _indentation(text: str) -> tuple[int, int]:
    """(mapping indent, dash offset of block lists) as the file writes them; 2 and 2 when it does not say."""
    mapping = offset = None
    lines = _content_lines(text)
    for above, line in itertools.pairwise(lines):
        head = _KEY_LINE.match(above)
        if not head:
            continue
        parent = len(head.group(1)) + (2 if head.group(2) else 0)
        indent = len(line) - len(line.lstrip(" "))
        if line.lstrip(" ").startswith("- "):
            offset = indent - parent if offset is None and indent >= parent else offset
        elif indent > parent and mapping is None:
            mapping = indent - parent
    return mapping or 2, 2 if offset is None else offset


def _content_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


_MISSING = object()


def _merge(node: CommentedMap, body: dict[str, Any], was: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Change ``node`` (the file's mapping, meaning ``was``) to mean ``wanted``, which ``body`` asks for."""
    for key in [k for k in node if k not in body and was.get(k, _MISSING) != wanted.get(k, _MISSING)]:
        keys = list(node)
        rest = _take(_end(node, key))
        del node[key]
        if keys.index(key):  # the lines that followed it now follow the key before it
            _give(_end(node, keys[keys.index(key) - 1]), rest)
    previous: Any = None
    for key, value in body.items():
        same = was.get(key, _MISSING) == wanted.get(key, _MISSING)
        if key in node:
            if not same:
                rest = _take(_end(node, key))
                node[key] = _replace(node[key], value, was.get(key), wanted.get(key))
                _give(_end(node, key), rest)
            previous = key
        elif not same:
            keys = list(node)
            at = keys.index(previous) + 1 if previous in keys else len(keys)
            rest = _take(_end(node, keys[at - 1])) if at else ""
            node.insert(at, key, _styled(value, None))
            _give(_end(node, key if at == len(keys) else keys[at - 1]), rest)
            previous = key


def _replace(old: Any, value: Any, was: Any, wanted: Any) -> Any:
    """The file's ``old`` value changed to ``value``: edited in place where both are mappings or lists,
    so what did not change keeps its text and comments; otherwise ``value`` in ``old``'s style."""
    if isinstance(old, CommentedMap) and isinstance(value, dict) and value and isinstance(was, dict) \
            and isinstance(wanted, dict):
        _merge(old, value, was, wanted)
        return old
    if isinstance(old, CommentedSeq) and isinstance(value, list) and value and isinstance(was, list) \
            and isinstance(wanted, list) and len(old) == len(was) and len(value) == len(wanted):
        _edit_list(old, value, was, wanted)
        return old
    return _styled(value, old)


def _edit_list(old: CommentedSeq, value: list[Any], was: list[Any], wanted: list[Any]) -> None:
    """Items are matched by meaning (a diff of the two lists), so removing the first tool removes that
    tool's lines, not the last tool's; a changed item is edited in place."""
    ops = difflib.SequenceMatcher(None, [json.dumps(x, sort_keys=True) for x in was],
                                  [json.dumps(x, sort_keys=True) for x in wanted], autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in reversed(ops):  # from the end, so the indices still to come hold
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1)
        for k in range(paired):
            rest = _take(_end(old, i1 + k))
            old[i1 + k] = _replace(old[i1 + k], value[j1 + k], was[i1 + k], wanted[j1 + k])
            _give(_end(old, i1 + k), rest)
        for i in reversed(range(i1 + paired, i2)):
            rest = _take(_end(old, i))
            del old[i]
            if i:
                _give(_end(old, i - 1), rest)
        for k in range(paired, j2 - j1):
            rest = _take(_end(old, i1 + k - 1)) if i1 + k else ""
            old.insert(i1 + k, _styled(value[j1 + k], None))
            _give(_end(old, i1 + k), rest)


# ruamel.yaml keeps the blank lines and comments that follow a value with the last scalar before them
# (an entry of its parent's ``ca.items``). When that value is replaced, removed or no longer last, they
# move with the end of what now comes before them, so a section keeps its blank line and its comment.
Slot = tuple[Any, Any, int]  # (mapping or list, key or index, place in its ca.items entry)


def _end(node: CommentedMap | CommentedSeq, key: Any) -> Slot:
    """Where the lines after ``node[key]`` are kept: with the last value inside it, or with the key."""
    value = node[key]
    if isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style():
        return _end(value, list(value)[-1] if isinstance(value, CommentedMap) else len(value) - 1)
    return node, key, 2 if isinstance(node, CommentedMap) else 0


def _take(slot: Slot) -> str:
    """Detach the lines after the slot's own line; its end-of-line comment stays."""
    node, key, place = slot
    entry = node.ca.items.get(key)
    token = entry[place] if entry else None
    if token is None or "\n" not in token.value:
        return ""
    head, rest = str(token.value).split("\n", 1)
    if head.strip():
        token.value = head + "\n"
    else:
        entry[place] = None
    return rest


def _give(slot: Slot, rest: str) -> None:
    if not rest:
        return
    node, key, place = slot
    entry = node.ca.items.setdefault(key, [None, None, None, None])
    if entry[place] is None:
        entry[place] = CommentToken("\n" + rest, CommentMark(0))
    else:
        entry[place].value = str(entry[place].value).rstrip("\n") + "\n" + rest


def _styled(value: Any, like: Any) -> Any:
    """``value`` to write, in the style of the value it replaces (quotes, flow lists) where it has one."""
    if isinstance(value, str):
        if "\n" in value:
            return LiteralScalarString(value)
        if isinstance(like, (DoubleQuotedScalarString, SingleQuotedScalarString)):
            return type(like)(value)
        # Read back as YAML 1.1 (as specs are read), `yes`, `on` or `1.0` would not be strings: quote them.
        plain = yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
        return value if plain == "tag:yaml.org,2002:str" else DoubleQuotedScalarString(value)
    if isinstance(value, list):
        seq = CommentedSeq(_styled(v, None) for v in value)
        if isinstance(like, CommentedSeq) and like.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        return CommentedMap((k, _styled(v, None)) for k, v in value.items())
    return value


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
    """Run git in ``repo``; its output, or SourceUnavailable. Transient: the callers above turn the
    failures that mean something (a moved ref, a refused push, no such path) into their own answers,
    and what is left is git failing on a repository someone else holds (a ref or index lock, a gc)."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, env=env, input=input, check=False)
    if done.returncode != 0:
        raise SourceUnavailable(f"git {args[0]}: {done.stderr.decode(errors='replace').strip()}", delay=WRITE_RETRY)
    return done.stdout.decode()
