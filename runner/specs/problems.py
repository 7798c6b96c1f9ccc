"""A problem found in a spec, with where it is. One shape for the CLI, the API and the push hook."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    col: int
    field: str  # dotted path such as tools[1].permissions[0]; empty for the file as a whole
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}: {self.severity}: "
        return where + (f"{self.field}: {self.message}" if self.field else self.message)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Problem:
        return cls(**data)


def field_path(loc: tuple[str | int, ...]) -> str:
    """('tools', 1, 'permissions', 0) -> 'tools[1].permissions[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def errors_in(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]
