"""What the spec layer must know of tools to validate a spec: names and permissions, no code.

The agent layer implements the builtin tools under the same names; custom tools are found in the
source's ``tools/`` folder and described by ``CustomTool`` (their permissions read without importing).
"""

from __future__ import annotations

from dataclasses import dataclass

PERMISSIONS = ("read", "write", "execute", "network")


@dataclass(frozen=True)
class ToolInfo:
    name: str
    summary: str
    allowed: frozenset[str]  # permissions a spec may grant it
    needs: frozenset[str]  # permissions it cannot work without
    file_tool: bool  # touches files: a spec must name its paths
    builtin: bool = True
    error: str | None = None  # a custom tool that cannot be loaded


def _info(name: str, summary: str, allowed: set[str], needs: set[str], file_tool: bool = False) -> ToolInfo:
    return ToolInfo(name, summary, frozenset(allowed), frozenset(needs), file_tool)


BUILTIN_TOOLS: dict[str, ToolInfo] = {
    t.name: t
    for t in (
        _info("file_reader", "Reads a file's text or lists a folder, under its paths.", {"read"}, {"read"}, True),
        _info("file_writer", "Writes a file under its paths.", {"write"}, {"write"}, True),
        _info(
            "data_analyzer",
            "DuckDB SQL, read-only, over CSV, Parquet and JSON files under its paths.",
            {"read", "execute"},
            {"read"},
        ),
        _info("http_get", "Fetches a URL on the spec's allowed_domains.", {"network"}, {"network"}),
        _info("shell", "Runs a command from its allow-list, with a timeout.", {"execute", "read", "write"},
              {"execute"}),
        _info("memory_search", "Searches the agent's memory.", {"read"}, set()),
        _info("memory_save", "Saves a text to the agent's memory.", {"write"}, set()),
    )
}


def custom_tool(name: str, permissions: list[str] | None, error: str | None = None) -> ToolInfo:
    """A custom tool: it may be granted exactly the permissions it declares, and needs them all."""
    perms = frozenset(permissions or [])
    return ToolInfo(name, "custom tool", perms, perms, file_tool=bool(perms & {"read", "write"}),
                    builtin=False, error=error)
