"""The plan of one run: everything the run process needs, prepared by its supervisor.

It is what crosses the executor interface into the run (``to_json``, on the channel), so it holds no
live objects, and this module imports no LangChain: the daemon builds plans without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.settings import Settings
from runner.specs.models import AgentSpec


@dataclass
class RunPlan:
    """Everything a run needs, prepared by the launcher before the run process starts."""

    run_id: str
    client_id: str
    agent: str
    revision: str | None
    spec: AgentSpec
    settings: Settings
    trigger: str = "manual"
    input: str | None = None
    script: str | None = None  # scripted model turns, read from the source at the revision
    custom_sources: dict[str, str] = field(default_factory=dict)
    # The runner's own folders that overlap a runtime path (usually none), which the run leaves out of
    # what it may read; worked out by the supervisor, which may read the settings file (the run may not).
    private: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "client_id": self.client_id, "agent": self.agent,
                "revision": self.revision, "spec": self.spec.model_dump(mode="json"),
                "settings": self.settings.model_dump(mode="json"), "trigger": self.trigger, "input": self.input,
                "script": self.script, "custom_sources": self.custom_sources,
                "private": self.private}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        return cls(run_id=data["run_id"], client_id=data["client_id"], agent=data["agent"],
                   revision=data["revision"], spec=AgentSpec.model_validate(data["spec"]),
                   settings=Settings.model_validate(data["settings"]), trigger=data["trigger"],
                   input=data["input"], script=data["script"], custom_sources=data["custom_sources"],
                   private=[(str(w), str(p)) for w, p in data.get("private", [])])

    @property
    def variables(self) -> dict[str, str]:
        return {"CLIENT_ID": self.client_id, "AGENT_NAME": self.agent, "AGENT_ORCH_HOME": str(self.settings.home)}

    @property
    def deadline_seconds(self) -> float:
        return float(self.spec.constraints.max_runtime or self.settings.default_agent_timeout)

    @property
    def scratch(self) -> Path:
        return self.settings.home / "scratch" / self.client_id / self.run_id


def store_path(memory_dir: Path, client_id: str, agent: str, collection: str | None) -> Path:
    """The sqlite-vec file of an agent's memory collection."""
    return memory_dir / client_id / agent / f"{collection or agent}.sqlite"
