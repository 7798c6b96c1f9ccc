"""Custom tools as the validator sees them: read with ``ast``, never imported.

Validation runs in the push hook and the reconciler, on code nobody has reviewed yet, so it must not
execute it. We read ``PERMISSIONS = [...]`` as a literal and check that a LangChain tool named like
the module is defined (``@tool`` on a function, or ``NAME = tool(...)``/``StructuredTool...``).
The agent layer imports the module for real when a run needs it.
"""

from __future__ import annotations

import ast

from runner.specs.catalog import BUILTIN_TOOLS, PERMISSIONS, ToolInfo, custom_tool

MAX_MODULE = 1 << 20  # bytes of a custom tool module: more is not a tool, and parsing it costs gigabytes


def tool_info(name: str, sources: dict[str, str]) -> ToolInfo:
    """A builtin tool's info, or a custom tool's as its module (in ``sources``, by name) declares it."""
    return BUILTIN_TOOLS.get(name) or describe_module(name, sources.get(name, "").encode())


def describe_module(name: str, source: bytes) -> ToolInfo:
    """The ToolInfo of custom tool module ``tools/NAME.py``; ``error`` set when it is unusable."""
    if len(source) > MAX_MODULE:
        return custom_tool(name, None, f"tools/{name}.py is {len(source)} bytes, over the {MAX_MODULE >> 20} MiB "
                                       "limit of a tool module")
    try:
        tree = ast.parse(source, filename=f"tools/{name}.py")
    except SyntaxError as exc:
        return custom_tool(name, None, f"tools/{name}.py:{exc.lineno}: syntax error: {exc.msg}")
    except ValueError as exc:  # NUL bytes and the like
        return custom_tool(name, None, f"tools/{name}.py: {exc}")
    except (MemoryError, RecursionError):  # CPython's parser on absurdly nested expressions
        return custom_tool(name, None, f"tools/{name}.py: code is nested too deep to read")
    permissions: list[str] | None = None
    defines_tool = False
    for node in tree.body:
        targets, value_node = _assignment(node)
        if "PERMISSIONS" in targets and value_node is not None:
            try:
                value = ast.literal_eval(value_node)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # e.g. {[1]}, [-----1]
                return custom_tool(name, None, f"tools/{name}.py:{node.lineno}: PERMISSIONS must be a literal list")
            if not isinstance(value, list | tuple) or not all(v in PERMISSIONS for v in value):
                return custom_tool(name, None, f"tools/{name}.py:{node.lineno}: PERMISSIONS must list some of "
                                   + ", ".join(PERMISSIONS))
            permissions = list(value)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            defines_tool = defines_tool or any(_is_tool_decorator(d) for d in node.decorator_list)
        elif name in targets and value_node is not None:
            defines_tool = True
    if permissions is None:
        return custom_tool(name, None, f"tools/{name}.py defines no PERMISSIONS = [...]")
    if not defines_tool:
        return custom_tool(name, permissions, f"tools/{name}.py defines no tool named '{name}' (use @tool)")
    return custom_tool(name, permissions)


def _assignment(node: ast.stmt) -> tuple[set[str], ast.expr | None]:
    """The names a module-level assignment binds and its value; typed ones (``X: list[str] = ...``) too."""
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}, node.value
    return set(), None


def _is_tool_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "tool") or (
        isinstance(target, ast.Attribute) and target.attr == "tool")
