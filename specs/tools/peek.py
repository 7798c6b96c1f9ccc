"""A custom tool: the first lines of a file. Specs use it by name, with its paths, like a builtin."""

from langchain_core.tools import tool

PERMISSIONS = ["read"]


@tool
def peek(path: str, lines: int = 5) -> str:
    """Return the first `lines` lines of the text file at `path`."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readline() for _ in range(max(1, min(lines, 100))))
