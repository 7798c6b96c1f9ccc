"""YAML to plain data, keeping the line and column of every key and value.

PyYAML's own loaders drop positions and accept duplicate keys silently. We let libyaml (when present)
compose the node graph, then build the data ourselves: that gives each field a position for error
messages, refuses duplicate keys, and bounds alias expansion (a "billion laughs" document would
otherwise expand exponentially while we walk the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

from runner.specs.problems import Problem

try:  # libyaml's parser is ~10x faster than the pure-Python one; both give node positions.
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

MAX_BYTES = 1024 * 1024
MAX_NODES = 50_000
MAX_DEPTH = 40
# libyaml composes nodes recursively in C: a document nested some 50,000 levels deep (it fits in
# 1 MiB) overflows the C stack and kills the process. Each level of nesting needs one of these
# characters, so a text with few of them cannot be deep; others are first walked event by event
# (the parser does not recurse) and refused when too deep.
NESTING_MARKS = "[{-:?"
DEEP_SCAN_MARKS = 1000

Loc = tuple[str | int, ...]


@dataclass
class Document:
    file: str
    data: Any
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)  # value positions
    key_positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)  # where a key is written

    def position(self, loc: Loc, *, key: bool = False) -> tuple[int, int]:
        """The position of ``loc``, or of its nearest ancestor that exists (for missing fields)."""
        table = self.key_positions if key else self.positions
        if loc in table:
            return table[loc]
        while loc:
            loc = loc[:-1]
            if loc in self.positions:
                return self.positions[loc]
        return (1, 1)


class _TooComplex(Exception):
    def __init__(self, message: str, node: yaml.Node) -> None:
        super().__init__(message)
        self.message = message
        self.where = (node.start_mark.line + 1, node.start_mark.column + 1)


def load_document(raw: bytes, file: str) -> tuple[Document | None, list[Problem]]:
    """Parse one spec file. Returns the document, or None and the problems that stopped it."""

    def fail(message: str, line: int = 1, col: int = 1) -> tuple[None, list[Problem]]:
        return None, [Problem(file, line, col, "", message)]

    if raw.startswith(b"\0") and len(raw) < 256 and b"\0" not in raw[1:] and raw[1:].isascii():
        # A source hands over a file it cannot read (a symlink, an I/O error) as NUL and the reason.
        return fail(f"file cannot be used: {raw[1:].decode()}")
    if len(raw) > MAX_BYTES:
        return fail(f"file is too large ({len(raw) / 1e6:.1f} MB; a spec may be at most 1 MiB)")
    if b"\x00" in raw:
        line, col = _line_col(raw, raw.index(b"\x00"))
        return fail("file is binary (it holds a NUL byte), not YAML text", line, col)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw, exc.start)
        return fail(f"file is not UTF-8 text (byte 0x{raw[exc.start]:02x} cannot be decoded)", line, col)
    try:
        if sum(map(text.count, NESTING_MARKS)) > DEEP_SCAN_MARKS and (deep := _too_deep(text)):
            return fail(f"document is nested too deep (over {MAX_DEPTH} levels)", *deep)
        node = yaml.compose(text, Loader=_Loader)
    except RecursionError:  # the pure-Python composer, where libyaml is missing
        return fail(f"document is nested too deep (over {MAX_DEPTH} levels)")
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; its offset is not a line
        found = yaml.reader.Reader.NON_PRINTABLE.search(text)
        line, col = _line_col(text.encode(), len(text[:found.start()].encode())) if found else (1, 1)
        return fail(f"YAML syntax: {exc.reason} (character #x{exc.character:04x})", line, col)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"YAML syntax: {exc.problem or exc.context}"
        if exc.context and exc.problem:
            message = f"YAML syntax: {exc.problem} ({exc.context})"
        return fail(message, mark.line + 1 if mark else 1, mark.column + 1 if mark else 1)
    except yaml.YAMLError as exc:
        return fail(f"YAML syntax: {exc}")
    if node is None:
        return fail("file is empty; a spec is a mapping with at least 'name' and 'model'")
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        return fail(f"file holds {kind}; a spec is a mapping of fields (name: ..., model: ...)", line, col)
    builder = _Builder(file)
    try:
        data = builder.build(node, ())
    except _TooComplex as exc:
        return fail(exc.message, *exc.where)
    if builder.problems:
        return None, builder.problems
    return Document(file, data, builder.positions, builder.key_positions), []


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.constructor = SafeConstructor()
        self.positions: dict[Loc, tuple[int, int]] = {}
        self.key_positions: dict[Loc, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.count = 0
        self.merged: dict[int, set[int]] = {}  # mapping node -> its key nodes that came from merge keys

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooComplex(f"document is too large or expands too far through aliases (over {MAX_NODES} "
                              "values)", node)
        if len(loc) > MAX_DEPTH:
            raise _TooComplex(f"document is nested too deep (over {MAX_DEPTH} levels)", node)
        self.positions[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        try:
            return self.constructor.construct_object(node)
        except ConstructorError as exc:
            self._problem(node, loc, f"cannot read value: {exc.problem}")
        except Exception:  # the safe constructors leak their parsers' errors:
            # ValueError for `2024-13-45`, KeyError for `!!bool maybe`, AttributeError for `!!timestamp x`.
            self._problem(node, loc, f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}")
        return None

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        if id(node) not in self.merged:  # an aliased mapping is built again, but flattened once
            own = {id(k) for k, _ in node.value}
            try:
                self.constructor.flatten_mapping(node)  # YAML merge keys (<<: *base), merged pairs first
            except ConstructorError as exc:
                self._problem(node, loc, f"cannot merge: {exc.problem}")
            self.merged[id(node)] = {id(k) for k, _ in node.value if id(k) not in own}
        merged = self.merged[id(node)]
        result: dict[str, Any] = {}
        from_merge: set[str] = set()  # keys a later pair may override, as YAML merges allow
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, loc, "keys must be plain names, not lists or mappings")
                continue
            # The raw text, not the resolved value: a key written `on` or `yes` stays a name.
            key = str(key_node.value)
            key_loc = (*loc, key)
            here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result and key not in from_merge:
                first = self.key_positions[key_loc]
                self.problems.append(Problem(self.file, *here, _dotted(key_loc),
                                             f"duplicate key '{key}' (first at line {first[0]})"))
                continue
            if id(key_node) in merged:
                from_merge.add(key)
            else:
                from_merge.discard(key)
            self.key_positions[key_loc] = here
            result[key] = self.build(value_node, key_loc)
        return result

    def _problem(self, node: yaml.Node, loc: Loc, message: str) -> None:
        self.problems.append(
            Problem(self.file, node.start_mark.line + 1, node.start_mark.column + 1, _dotted(loc), message)
        )


def _too_deep(text: str) -> tuple[int, int] | None:
    """Where ``text`` first nests collections deeper than MAX_DEPTH, or None.

    The pure-Python parser on purpose: it yields events one at a time and has no limit of its own,
    while libyaml reads ahead and, from PyYAML 6.0.4, stops at its own nesting limit first - with
    another message at another place, depending on the version installed."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH + 1:  # the root mapping is depth 1 here; MAX_DEPTH counts levels below it
                mark = event.start_mark
                return (mark.line + 1, mark.column + 1) if mark else (1, 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _dotted(loc: Loc) -> str:
    from runner.specs.problems import field_path

    return field_path(loc)


def _line_col(raw: bytes, offset: int) -> tuple[int, int]:
    line = raw.count(b"\n", 0, offset) + 1
    col = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return line, col
