"""One settings object. Every field is documented here and in docs/configuration.md (a test checks).

Precedence, highest first (``Settings.load``):

1. command-line options (``--source``/``--ref``/``--path`` reach the source through ``SourceOverride``);
2. the client's own section of the settings file ``$AGENT_ORCH_HOME/config/settings.json``;
3. environment variables;
4. the top level of the settings file (keys are the environment variable names);
5. the defaults below.

A client's section beats the environment because it is the more specific of the two: the environment
speaks for every client a daemon serves, so ``AGENT_ORCH_SOURCE`` set for the default client must not
pull client acme into default's repository. When both name a different value, the daemon warns at start
(``shadowed_environment``)::

    {"MAX_AGENTS": 4, "clients": {"acme": {"AGENT_ORCH_SOURCE": "/srv/git/acme-agents.git"}}}

The spec source has two more levels below these (INTERFACE.md): 4. the source recorded in the home by
the last ``agentctl apply --source`` (``remember_source``), and 5. the git checkout the command runs in.
``load`` fills level 4 in: when no level above names a repository, ``source`` and, where no level above
sets them, ``source_ref`` and ``source_path`` come from ``$AGENT_ORCH_HOME/config/sources/CLIENT.json``.
An empty ``source`` after that means the checkout (``runner.source.git.default_source_url``).
``Settings.source_origin`` says which level gave the repository, for ``agentctl status``.

The record is a small JSON file beside the settings file rather than a table in state.sqlite: it is
configuration, read here at the bottom layer by every process that loads settings (the CLI in any
folder, the daemon, the hook), before any database is opened; an operator can read, edit or delete it;
and it is written whole by an atomic rename, one file per client, so two clients never contend.

Settings travel to a run as ``model_dump(mode="json")`` and back through ``model_validate``, which reads
nothing but the data it is given (no environment, no file): what a run gets is what its launcher had,
with every secret masked.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from runner.errors import UsageError

CLIENT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SOURCE_KEYS = ("AGENT_ORCH_SOURCE", "AGENT_ORCH_SOURCE_REF", "AGENT_ORCH_SOURCE_PATH")
SOURCE_FIELDS = {"AGENT_ORCH_SOURCE": "source", "AGENT_ORCH_SOURCE_REF": "source_ref",
                 "AGENT_ORCH_SOURCE_PATH": "source_path"}
# Where the spec source in force came from, highest level first (INTERFACE.md's order; the top level of
# the settings file counts with the environment, whose values it supplies).
ORIGINS = ("flag", "client section", "environment", "home", "checkout")


def _env(name: str, default: Any, description: str, group: str, **kwargs: Any) -> Any:
    """A field read from environment variable ``name`` (the same key in settings.json)."""
    return Field(
        default,
        validation_alias=AliasChoices(name, name.lower()),
        description=description,
        json_schema_extra={"env": name, "group": group},
        **kwargs,
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # -- where things live
    home: Path = _env(
        "AGENT_ORCH_HOME", Path("var"), "State folder: applied state, ledger, memory, logs, tokens.", "state"
    )
    client_id: str = _env(
        "AGENT_ORCH_CLIENT_ID",
        "default",
        "The client (tenant) this process acts for; `--client-id` sets it too. Each client has its own "
        "source, state, memory, logs and tokens, and `${CLIENT_ID}` in a spec expands to it.",
        "state",
        pattern=CLIENT_ID_PATTERN,
    )

    # -- the spec source
    source: str = _env(
        "AGENT_ORCH_SOURCE",
        "",
        "Git repository of agent specs: a local path, file://, ssh or https URL. Empty means the source "
        "the last `agentctl apply --source` recorded in the home, else the git repository that contains the "
        "current directory (so `make run` serves this checkout's specs).",
        "source",
    )
    source_ref: str = _env(
        "AGENT_ORCH_SOURCE_REF", "HEAD", "Branch, tag or commit to follow. HEAD is the default branch.", "source"
    )
    source_path: str = _env(
        "AGENT_ORCH_SOURCE_PATH", "specs", "Folder inside the repository that holds the specs.", "source"
    )
    sync_interval: float = _env(
        "AGENT_ORCH_SYNC_INTERVAL",
        60.0,
        "Seconds between polls of the source (with up to 10% jitter). A push with the hook installed, "
        "or POST /agents/v1/hooks/git, reconciles at once; polling is the safety net.",
        "source",
        gt=0,
    )

    # -- the API
    host: str = _env("AGENT_ORCH_HOST", "127.0.0.1", "Address the API listens on.", "api")
    port: int = _env("AGENT_ORCH_PORT", 3031, "Port for API access.", "api", ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = _env(
        "AGENT_ORCH_LOG_LEVEL", "info", "Logging level: debug, info, warning or error (any case: INFO is info).", "api"
    )

    # -- models
    ollama_host: str = _env(
        "OLLAMA_HOST",
        "http://127.0.0.1:11434",
        "Ollama server for `model: NAME` and `model: ollama:NAME` (the default provider).",
        "models",
    )
    langchain_api_url: str = _env(
        "LANGCHAIN_API_URL",
        "http://127.0.0.1:8080/v1",
        "Base URL of the OpenAI-compatible endpoint (llama.cpp server, vLLM, LM Studio) used by "
        "`model: openai:NAME`. LangChain itself runs in-process; this is where it sends requests.",
        "models",
    )
    openai_api_key: SecretStr = _env(
        "OPENAI_API_KEY",
        SecretStr(""),
        "Key for the OpenAI-compatible endpoint; it never enters a run: the egress proxy adds it to the run's "
        "requests to the model endpoint. Empty means the endpoint needs no key.",
        "models",
    )

    # -- runs
    max_agents: int = _env(
        "MAX_AGENTS", 10, "Maximum number of runs at once across all agents; more wait in a queue.", "runs", ge=1
    )
    default_agent_timeout: float = _env(
        "DEFAULT_AGENT_TIMEOUT",
        300.0,
        "Deadline in seconds for a run whose spec sets no `constraints.max_runtime`.",
        "runs",
        gt=0,
    )
    enable_remote_tools: bool = _env(
        "ENABLE_REMOTE_TOOLS",
        False,
        "Allow tools to reach hosts beyond this machine (still only a spec's `allowed_domains`).",
        "runs",
    )

    remote_secrets: str = _env(
        "AGENT_ORCH_REMOTE_SECRETS",
        "",
        "Comma-separated names of the daemon's environment variables a `remote_agent` tool's `secret_env` may "
        "name: the credentials the daemon may send to remote A2A agents. Empty: none (an ask naming one is "
        "refused). The runner's own secrets (OPENAI_API_KEY, AGENT_ORCH_*, LANGCHAIN_*, RAY_*, any setting's "
        "variable) are refused even when listed.",
        "runs",
    )

    max_tool_depth: int = _env(
        "AGENT_ORCH_MAX_TOOL_DEPTH",
        3,
        "How deep agents may ask agents as tools: a run started otherwise is at depth 0, the agent it asks at 1, "
        "and an ask that would start a run deeper than this is refused (the model is told). Bounds chains the "
        "specs cannot show as cycles.",
        "runs",
        ge=0,
        le=32,
    )

    # -- memory
    vector_db_url: str = _env(
        "VECTOR_DB_URL",
        "",
        "Where agent memory (sqlite-vec files) lives: a folder path or file:// URL. Empty means "
        "`$AGENT_ORCH_HOME/memory/`. A server URL (the seed's http://vector_db:8000) is refused at start: "
        "there is no vector database server.",
        "memory",
    )

    embed_model: str = _env(
        "AGENT_ORCH_EMBED_MODEL",
        "",
        "Ollama embedding model for memory (e.g. nomic-embed-text). Empty means the built-in hashing "
        "embedder, which needs no model. A memory store keeps the embedder it was made with.",
        "memory",
    )
    kill_grace: float = _env(
        "AGENT_ORCH_KILL_GRACE",
        5.0,
        "Seconds between SIGTERM and SIGKILL when a run passes its deadline or is stopped.",
        "runs",
        gt=0,
    )

    sandbox: Literal["strict", "permissive", "off"] = _env(
        "AGENT_ORCH_SANDBOX",
        "strict",
        "strict: a run whose limits this kernel cannot enforce is refused; permissive: such a run goes "
        "unconfined; off: no run is confined (for measuring and debugging). The run's record says which.",
        "sandbox",
    )
    executor: Literal["local", "ray"] = _env(
        "AGENT_ORCH_EXECUTOR", "local",
        "Where runs execute: local (forked on this machine) or ray (on the nodes of a Ray cluster, each "
        "forking sandboxed runs as local does; docs/scale-out.md). The daemon stays the control plane.",
        "cluster",
    )
    ray_address: str = _env(
        "RAY_ADDRESS", "auto",
        "The Ray cluster to use with AGENT_ORCH_EXECUTOR=ray: host:port of its head (GCS), or auto for the "
        "cluster started on this machine.", "cluster",
    )
    ray_insecure: bool = _env(
        "AGENT_ORCH_RAY_INSECURE", False,
        "Use a Ray cluster that does not require token authentication. Anyone who reaches such a cluster's "
        "ports runs code on every node: only for a cluster on a private network you trust.", "cluster",
    )
    max_memory_mb: int = _env("AGENT_ORCH_MAX_MEMORY_MB", 4096,
                              "Address-space limit of a run, MiB: the default, and the most a spec's "
                              "constraints.max_memory_mb may ask.", "sandbox", gt=16)
    max_processes: int = _env("AGENT_ORCH_MAX_PROCESSES", 512,
                              "Process limit of a run (pid_max of its PID namespace on Linux 6.14+, and "
                              "RLIMIT_NPROC): the default, and the most a spec may ask.", "sandbox", gt=0)
    max_scratch_mb: int = _env("AGENT_ORCH_MAX_SCRATCH_MB", 256,
                               "Size of a run's scratch folder (its HOME and TMPDIR), MiB: a tmpfs of its own, "
                               "gone when the run ends, so no run can fill the home's disk through it.",
                               "sandbox", gt=0)
    max_file_mb: int = _env("AGENT_ORCH_MAX_FILE_MB", 1024,
                            "Largest file a run may write, MiB: the default, and the most a spec may ask.",
                            "sandbox", gt=0)
    shutdown_grace: float = _env(
        "AGENT_ORCH_SHUTDOWN_GRACE",
        30.0,
        "Seconds runs in flight may take to finish after the daemon is told to stop (SIGTERM); then they "
        "are stopped.",
        "runs",
        ge=0,
    )
    max_chain_depth: int = _env(
        "AGENT_ORCH_MAX_CHAIN_DEPTH",
        8,
        "Runs a chain of run_completed triggers may add after the run that began it: a run past it is not "
        "started (its delivery is rejected, with the reason).",
        "runs",
        ge=1, le=1000,
    )
    webhook_secret: SecretStr = _env(
        "AGENT_ORCH_WEBHOOK_SECRET",
        SecretStr(""),
        "Secret of the push webhook (POST /agents/v1/hooks/git): GitHub and Gitea sign with it, GitLab sends "
        "it. Empty means the webhook needs an operator's bearer token instead.",
        "api",
    )
    log_dir: str = _env(
        "AGENT_ORCH_LOG_DIR",
        "",
        "Folder of the component log (agent_orchestrator.log) and the per-agent logs (agents/NAME.log). "
        "Empty means `$AGENT_ORCH_HOME/logs`; the systemd unit uses /var/log/agency_stack/components.",
        "api",
    )
    log_format: Literal["text", "json"] = _env(
        "AGENT_ORCH_LOG_FORMAT", "text", "Format of the component log: text, or json (one object per line).", "api"
    )
    flush_interval: float = _env(
        "AGENT_ORCH_FLUSH_INTERVAL",
        1.0,
        "Seconds between moves of new ledger rows into runs.duckdb while the daemon runs.",
        "state",
        gt=0,
    )

    # Which level gave each source setting ("flag", "client section", "environment", "home"), as load()
    # found them; not a setting itself, so it never travels to a run.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("*", mode="before")
    @classmethod
    def _any_case_choice(cls, value: Any, info: ValidationInfo) -> Any:
        """A choice (log level, sandbox mode, log format) in any case: INFO is info, as for most tools."""
        field = cls.model_fields[info.field_name] if info.field_name else None
        if isinstance(value, str) and field is not None and typing.get_origin(field.annotation) is Literal:
            return value.strip().lower()
        return value

    @field_validator("vector_db_url", mode="after")
    @classmethod
    def _memory_folder_only(cls, value: str) -> str:
        """Memory is sqlite-vec files: a folder or file:// URL. A server URL (the seed's own default was
        http://vector_db:8000) would otherwise become a folder named 'http:' wherever the daemon starts."""
        scheme = _URL_SCHEME.match(value)
        if not scheme:
            return value
        problem, kind = "", scheme.group(1).lower()
        if kind in ("http", "https", "grpc", "grpcs", "tcp", "redis", "postgres", "postgresql"):
            problem = "a vector database server is not supported"
        elif kind != "file":
            problem = f"a {kind}:// URL is not supported"
        elif urlsplit(value).netloc not in ("", "localhost"):
            problem = "a file:// URL of another host is not supported"
        if problem:
            raise ValueError(f"{problem}; memory is sqlite-vec files: leave it empty or give a folder path or "
                             "file:// URL")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the caller passes: load() reads the environment and the file itself, in the order the
        # module docstring gives, and a run's model_validate() must not take its values from the environment.
        return (init_settings,)

    # -- derived paths
    @property
    def config_dir(self) -> Path:
        return self.home / "config"

    @property
    def ledger_path(self) -> Path:
        return self.home / "runs.duckdb"

    @property
    def state_path(self) -> Path:
        return self.home / "state.sqlite"

    @property
    def logs_dir(self) -> Path:
        return Path(self.log_dir).expanduser().absolute() if self.log_dir else self.home / "logs"

    @property
    def memory_dir(self) -> Path:
        url = self.vector_db_url
        if not url:
            return self.home / "memory"
        if _URL_SCHEME.match(url):  # file:///srv/memory, file://localhost/srv/memory, %20 for a space
            return Path(unquote(urlsplit(url).path)).absolute()
        return Path(url).expanduser().absolute()

    @property
    def source_origin(self) -> str:
        """Where the spec source in force comes from: "flag", "client section", "environment", "home" (the
        last ``apply --source``) or "checkout" (the git repository the command runs in). ``plan`` and
        ``apply`` given ``--source`` say "flag" themselves: their flags never reach the settings."""
        return self._origins.get("source") or ("environment" if self.source else "checkout")

    def source_origin_of(self, key: str) -> str:
        """The level that gave ``source``, ``source_ref`` or ``source_path`` ("default" when none did)."""
        return self._origins.get(key) or ("checkout" if key == "source" and not self.source else "default")

    @classmethod
    def load(cls, home: str | Path | None = None, client_id: str | None = None, **overrides: Any) -> Settings:
        """Settings for one process and client: defaults < file < environment < client's section < overrides."""
        home_path = Path(home or os.environ.get("AGENT_ORCH_HOME") or "var").expanduser().absolute()
        client = client_id or os.environ.get("AGENT_ORCH_CLIENT_ID") or "default"
        if not re.match(CLIENT_ID_PATTERN, client):
            raise UsageError(f"client id {client!r} must match {CLIENT_ID_PATTERN}")
        top, clients = settings_file(home_path / "config" / "settings.json")
        data: dict[str, Any] = {}
        origins: dict[str, str] = {}
        levels = (("environment", top), ("environment", environment()), ("client section", clients.get(client, {})),
                  ("flag", overrides))
        for level, layer in levels:
            fields = {_field_of(str(k).upper()) or str(k): v for k, v in layer.items() if v is not None}
            data |= fields
            origins |= {name: level for name in SOURCE_FIELDS.values() if name in fields}
        if not data.get("source"):  # level 4: no level above names a repository
            recorded = recorded_source(home_path, client)
            if recorded:
                origins["source"] = "home"
                data["source"] = recorded["source"]
                for name in ("source_ref", "source_path"):
                    if name not in origins and name in recorded:
                        data[name], origins[name] = recorded[name], "home"
        data |= {"home": home_path, "client_id": client}
        try:
            settings = cls.model_validate(data)
        except ValidationError as exc:
            problems = [_problem(e) for e in exc.errors()]
            raise UsageError(problems[0] if len(problems) == 1 else "invalid settings",
                             details=problems if len(problems) > 1 else []) from None
        settings._origins = {k: v for k, v in origins.items() if k != "source" or settings.source}
        return settings

    def public(self) -> dict[str, Any]:
        """Settings as shown to users (`agentctl status`, /healthz): env names, no secrets."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            env = extra.get("env") if isinstance(extra, dict) else None
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "(set)" if value.get_secret_value() else ""
            out[str(env or name)] = str(value) if isinstance(value, Path) else value
        return out


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _problem(error: Any) -> str:
    """One invalid setting, named as users set it: ``VECTOR_DB_URL=http://vector_db:8000: why``."""
    name = str(error["loc"][0]) if error["loc"] else ""
    field = Settings.model_fields.get(name)
    extra = field.json_schema_extra if field is not None else None
    env = str(extra.get("env")) if isinstance(extra, dict) else name
    shown = "(secret)" if field is not None and field.annotation is SecretStr else error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{env}={shown}: {message}" if isinstance(shown, (str, int, float)) else f"{env}: {message}"


# -- the source recorded in the home (level 4) -----------------------------------------------------------


def source_record_path(home: Path, client_id: str) -> Path:
    return Path(home) / "config" / "sources" / f"{client_id}.json"


def recorded_source(home: Path, client_id: str) -> dict[str, str]:
    """The source the last ``apply --source`` recorded for the client: ``source``, ``source_ref``,
    ``source_path``; empty when none was (or the record is unreadable: the checkout is used then)."""
    path = source_record_path(home, client_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("source"), str) or not data["source"]:
        return {}
    return {k: v for k in ("source", "source_ref", "source_path") if isinstance(v := data.get(k), str)}


def remember_source(home: Path, client_id: str, source: str, ref: str, path: str) -> Path:
    """Record the client's source in the home, written whole (a reader sees the old file or the new one).
    ``source`` should be absolute when it is a local path: the record is used from any folder."""
    target = source_record_path(home, client_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {"source": source, "source_ref": ref, "source_path": path,
              "recorded_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
              "recorded_by": "agentctl apply --source"}
    with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=f".{client_id}.", delete=False,
                                     encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, target)
    return target


def environment() -> dict[str, Any]:
    """The settings the environment sets, by their variable names (exactly as documented: ``HOME`` is not
    ``AGENT_ORCH_HOME``, however a case-insensitive match would see it)."""
    return EnvSettingsSource(Settings, case_sensitive=True)()


def own_variable(name: str) -> bool:
    """Whether an environment variable is one of the runner's own (a setting's, or under its prefixes):
    never a credential a spec may have the daemon send elsewhere (``remote_agent``'s ``secret_env``)."""
    upper = name.upper()
    settings = {str((f.json_schema_extra or {}).get("env", "")).upper()  # type: ignore[union-attr]
                for f in Settings.model_fields.values()}
    return upper in settings or upper.startswith(("AGENT_ORCH_", "LANGCHAIN_", "OPENAI_", "RAY_"))


def remote_secret_refusal(name: str, settings: Settings) -> str | None:
    """Why ``secret_env`` ``name`` may not be sent to a remote agent, or None: it must be listed in
    AGENT_ORCH_REMOTE_SECRETS (the operator's allow-list) and not be one of the runner's own variables."""
    if own_variable(name):
        return (f"secret_env {name} names one of the runner's own variables (OPENAI_API_KEY, AGENT_ORCH_*, "
                "LANGCHAIN_*, RAY_*, a setting's): it is never sent to a remote agent")
    allowed = {n.strip() for n in settings.remote_secrets.split(",") if n.strip()}
    if name not in allowed:
        return (f"secret_env {name} is not in AGENT_ORCH_REMOTE_SECRETS (the variables the daemon may send to "
                "remote agents; an operator lists them there)")
    return None


def shadowed_environment(settings: Settings) -> list[str]:
    """One line per variable that the client's own section of the settings file sets to another value
    than the environment does. Both were set on purpose and they disagree: the daemon says so at start,
    since whoever exported ``AGENT_ORCH_SOURCE`` may well expect it to win."""
    path = settings.config_dir / "settings.json"
    _top, clients = settings_file(path)
    env = {str(k).upper(): v for k, v in environment().items()}
    lines = []
    for key, value in clients.get(settings.client_id, {}).items():
        name = _field_of(key.upper())
        if name in ("", "home", "client_id") or key.upper() not in env:  # (load() ignores those two here)
            continue
        kind: TypeAdapter[Any] = TypeAdapter(Settings.model_fields[name].annotation or Any)
        try:
            if kind.validate_python(value) == kind.validate_python(env[key.upper()]):
                continue
        except ValidationError:
            pass  # one of them is not even valid: they differ
        where = f"client {settings.client_id}: clients.{settings.client_id} in {path} sets {key.upper()}"
        if Settings.model_fields[name].annotation is SecretStr:
            lines.append(f"{where}, and the environment sets it to another value; the settings file wins")
        else:
            lines.append(f"{where} to {value!r}, and the environment to {env[key.upper()]!r}; the settings "
                         "file wins")
    return lines


def _field_of(env: str) -> str:
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("env") == env:
            return name
    return ""


def settings_file(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings file as (top-level keys, client id -> section); empty when there is no file."""
    if not path.exists():
        return {}, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read settings: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: settings must be a JSON object")
    clients = data.pop("clients", {}) or {}
    if not isinstance(clients, dict):
        raise UsageError(f"{path}: 'clients' must be an object of client id to settings")
    for client_id, section in clients.items():
        if not isinstance(section, dict):
            raise UsageError(f"{path}: clients.{client_id} must be an object")
    return data, clients


def setting_fields() -> list[tuple[str, str, str, str]]:
    """(env name, default, group, description) for every setting: the docs table comes from this."""
    rows = []
    for field in Settings.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = field.default
        rows.append((str(extra["env"]), "" if default is None else str(default), str(extra["group"]),
                     field.description or ""))
    return rows


def client_ids(home: Path) -> list[str]:
    """Clients named in the settings file's ``clients`` section (the daemon serves them all)."""
    _top, clients = settings_file(Path(home) / "config" / "settings.json")
    return sorted(c for c in clients if re.match(CLIENT_ID_PATTERN, c))
