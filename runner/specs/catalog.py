"""What the spec layer must know of tools to validate a spec: names and permissions, no code.

The agent layer implements the builtin tools under the same names; custom tools are found in the
source's ``tools/`` folder and described by ``CustomTool`` (their permissions read without importing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PERMISSIONS = ("read", "write", "execute", "network")
PATH_PERMISSIONS = ("read", "write", "execute")  # the permissions a tool's paths are granted for


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


def uses_paths(info: ToolInfo) -> bool:
    """Whether a tool's ``paths`` mean anything: the file tools, data_analyzer, shell and custom tools. The
    others (http_get, the memory tools) are given no file access for paths a spec lists (validation warns
    that they are ignored, and they are: by the sandbox and by narrowing)."""
    return info.file_tool or not info.builtin or info.name in ("data_analyzer", "shell")


def effective_permissions(info: ToolInfo, granted: Iterable[str] | None) -> frozenset[str]:
    """The permissions a tool holds: what its spec grants (``granted``), else what it needs (a custom
    tool: the PERMISSIONS its module declares). The one reading of an omitted ``permissions``: the
    sandbox, narrowing and the network's rules all ask here."""
    return frozenset(granted) if granted is not None else info.needs


def path_access(info: ToolInfo, granted: Iterable[str] | None) -> frozenset[str]:
    """What a tool's paths give the run (Landlock): its read, write and execute permissions (a custom tool's
    paths are read at least); nothing for a tool that does not use paths."""
    if not uses_paths(info):
        return frozenset()
    access = effective_permissions(info, granted) & frozenset(PATH_PERMISSIONS)
    return access if info.builtin else access | {"read"}
