"""Workflow expressions and templates: Jinja2 in its ``SandboxedEnvironment``, never a parser of our own.

``if`` and ``for_each`` are expressions written without braces; ``input`` (and an approval's message) is a
template with them. Both see ``inputs``, ``steps``, ``item``, and from triggers ``event``, ``headers`` and
``payload``. A missing name or key is an error (``StrictUndefined``), not an empty string: a typo in a spec
must fail its step loudly, not feed a model an empty prompt.

Validation reads a text's parse tree for the steps it names (``steps.review`` or ``steps['review']``), so
an unknown step is a spec error with its position, before anything runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, nodes
from jinja2.filters import FILTERS as _builtin_filters
from jinja2.lexer import describe_token
from jinja2.parser import Parser
from jinja2.sandbox import SandboxedEnvironment

from runner.errors import ExpressionError

NAMES = ("inputs", "steps", "item", "event", "headers", "payload")
MAX_RENDERED = 256 * 1024  # characters of one rendered template (a run's input is capped at 1 MiB anyway)


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)  # plain JSON: a prompt is not HTML


def _fromjson(value: Any) -> Any:
    return json.loads(str(value))


MAX_RANGE = 10_000  # items of range()
MAX_POWER = 4096  # bits of a number made with ** or *


class _Bounded(SandboxedEnvironment):
    """The sandbox, and bounds on what one expression may build: a workflow's template runs in the daemon, so
    ``'x' * 10**9``, ``10**10**10`` or ``range(10**9)`` must fail at once rather than take the daemon's memory or
    time (a loop in a loop is refused by validation: ``check``)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int | float) and isinstance(right, int | float):
            bits = abs(left).bit_length() if isinstance(left, int) else 64
            if abs(right) * max(1, bits) > MAX_POWER:
                raise ExpressionError(f"{left} ** {right} is too large a number for an expression")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and _size(seq) * times > MAX_RENDERED:
                    raise ExpressionError(f"'*' would make about {_size(seq) * times} characters, over {MAX_RENDERED}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_POWER:
                raise ExpressionError("'*' makes too large a number for an expression")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict) and attribute in obj:  # steps.x.json.items: the key, not dict.items
            return obj[attribute]
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _sizes((obj,), {})  # '{:>999999999}'.format(1): the sandbox wraps the method, so look here
        return super().getattr(obj, attribute)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # 'x'.center(10**9), 'x'.ljust(...), '{:>999999999}'.format(...), s.replace('x', 'x' * 20000)
        owner = getattr(__obj, "__self__", None)
        _sizes((owner, *args), kwargs)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace":
            _replaced(owner, *args)
        return super().call(__context, __obj, *args, **kwargs)


def _sizes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDERED:
            raise ExpressionError(f"the number {value} is too large an argument (at most {MAX_RENDERED})")
        if isinstance(value, str) and any(c.isdigit() for c in value) and ("{" in value or "%" in value):
            widths = [int(w) for w in re.findall(r"\d{7,}", value)]
            if widths:
                raise ExpressionError(f"a format width of {widths[0]} is too large")


def _size(value: Any, depth: int = 0) -> int:
    """About how many characters ``value`` renders to (stops counting past the bound)."""
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 1
    if isinstance(value, list | tuple):
        total = 2
        for item in value:
            total += _size(item, depth + 1) + 2
            if total > MAX_RENDERED:
                break
        return total
    if isinstance(value, dict):
        return _size(list(value.items())[:MAX_RENDERED], depth + 1)
    return 8


def _replaced(text: Any, old: Any = "", new: Any = "", count: Any = -1, *_: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and old:
        times = text.count(old) if not isinstance(count, int) or count < 0 else min(count, text.count(old))
        if len(text) + times * (len(new) - len(old)) > MAX_RENDERED:
            raise ExpressionError(f"replace would make about {len(text) + times * (len(new) - len(old))} characters, "
                                  f"over {MAX_RENDERED}")


def _bounded_filter(name: str) -> Any:
    inner = _builtin_filters[name]

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _sizes(args, kwargs)
        if name == "replace":
            _replaced(*[a for a in args if not hasattr(a, "environment")], **kwargs)
        return inner(*args, **kwargs)

    bounded.__name__ = inner.__name__
    for attr in ("jinja_pass_arg",):
        if hasattr(inner, attr):
            setattr(bounded, attr, getattr(inner, attr))
    return bounded


def _range(*args: int) -> range:
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise ExpressionError(f"range of {len(values)} items, over {MAX_RANGE}")
    return values


_env = _Bounded(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_env.filters["tojson"] = _tojson
_env.filters["fromjson"] = _fromjson
_env.globals["range"] = _range
for _name in ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice", "round", "filesizeformat",
              "replace"):
    _env.filters[_name] = _bounded_filter(_name)


def _parse(text: str, template: bool) -> nodes.Node:
    """The parse tree of a template, or of an expression read as Jinja2's compile_expression reads it."""
    try:
        if template:
            return _env.parse(text)
        parser = Parser(_env, text, state="variable")
        expression = parser.parse_expression()
        if not parser.stream.eos:
            parser.fail(f"unexpected {describe_token(parser.stream.current)} after the expression",
                        parser.stream.current.lineno)
        return expression
    except TemplateError as exc:
        raise ExpressionError(_message(exc)) from None
    except RecursionError:
        raise ExpressionError("it is nested too deeply") from None


@dataclass(frozen=True)
class Names:
    """What an expression or template reads: the steps (``steps.x``, ``steps['x']``), the inputs
    (``inputs.x``, ``inputs['x']``) and its top-level names."""

    steps: frozenset[str]
    inputs: frozenset[str]
    used: frozenset[str]


def check(text: str, *, template: bool) -> Names:
    """Parse ``text`` and say what it reads. Raises ExpressionError when it cannot be parsed."""
    try:
        return _check(text, template)
    except RecursionError:
        raise ExpressionError("it is nested too deeply") from None


MAX_NESTING = 60  # levels of one expression's tree (a.b.c... and f(g(h(...))) alike): Jinja2 compiles deeper
# ones in time that grows faster than their length


def _depth(tree: nodes.Node) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


def _check(text: str, template: bool) -> Names:
    tree = _parse(text, template)
    if _depth(tree) > MAX_NESTING:
        raise ExpressionError(f"it is nested too deeply (over {MAX_NESTING} levels)")
    read: dict[str, set[str]] = {"steps": set(), "inputs": set()}
    for node in _all(tree, (nodes.Getattr, nodes.Getitem)):
        base: Any = getattr(node, "node", None)
        if isinstance(base, nodes.Name) and base.name in read:
            if isinstance(node, nodes.Getattr):
                read[base.name].add(node.attr)
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                    and isinstance(node.arg.value, str):
                read[base.name].add(node.arg.value)
    for kind in (nodes.Macro, nodes.CallBlock):
        if any(True for _ in tree.find_all(kind)):
            raise ExpressionError("macros are not allowed in a workflow's templates")
    for loop in tree.find_all(nodes.For):
        if any(True for _ in loop.find_all(nodes.For)):
            raise ExpressionError("a loop inside a loop is not allowed in a workflow's templates")
    assigned = {n.name for n in _all(tree, nodes.Name) if n.ctx in ("store", "param")}
    used = {n.name for n in _all(tree, nodes.Name) if n.ctx == "load"} - assigned - set(_env.globals) - {"loop"}
    return Names(frozenset(read["steps"]), frozenset(read["inputs"]), frozenset(used))


def parse_json(text: str | None) -> Any:
    """An answer as JSON (inside a ```json fence too), or None when it is not JSON. Linear in its length: an
    answer is data a prompt may have shaped."""
    if not text:
        return None
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and "\n" in body:
        body = body[body.index("\n") + 1:-3]
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


@functools.lru_cache(maxsize=1024)
def names_in(text: str, template: bool) -> Names:
    """``check``, remembered by text (the engine asks it of each step it starts)."""
    return check(text, template=template)


@functools.lru_cache(maxsize=512)
def _expression(text: str) -> Any:
    return _env.compile_expression(text, undefined_to_none=False)


@functools.lru_cache(maxsize=512)
def _template(text: str) -> Any:
    return _env.from_string(text)


def _all(tree: nodes.Node, kind: Any) -> list[Any]:
    """The nodes of ``kind`` in ``tree``, the root included (find_all leaves it out)."""
    return [*([tree] if isinstance(tree, kind) else []), *tree.find_all(kind)]


@contextlib.contextmanager
def _failing_as_expressions() -> Iterator[None]:
    """Whatever evaluating meets is the expression's own failure, said as ExpressionError."""
    try:
        yield
    except TemplateError as exc:
        raise ExpressionError(_message(exc)) from None
    except ExpressionError:
        raise
    except MemoryError:
        raise ExpressionError("it used more memory than an expression may") from None
    except Exception as exc:  # a filter's own error (int('x'), a key of a list): the expression's fault
        raise ExpressionError(f"{type(exc).__name__}: {exc}") from None


def evaluate(text: str, context: dict[str, Any]) -> Any:
    """The value of expression ``text`` (no braces) over ``context``."""
    with _failing_as_expressions():
        value = _expression(text)(**context)
        if isinstance(value, Undefined):  # a missing name or key: its error, now, rather than an empty value
            value._fail_with_undefined_error()
        return value


def render(text: str, context: dict[str, Any]) -> str:
    """Template ``text`` rendered over ``context``."""
    with _failing_as_expressions():
        parts, size = [], 0
        for chunk in _template(text).generate(**context):  # stops as soon as it is too long
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_RENDERED:
                raise ExpressionError(f"it renders more than {MAX_RENDERED} characters: pass a path to the data, "
                                      "not the data")
        return "".join(parts)


def _message(exc: TemplateError) -> str:
    text = (exc.message or type(exc).__name__).replace("end of template", "end of the text")
    return text.replace("'jinja2.runtime.StrictUndefined object'", "an undefined value")
