"""The generated artifacts stay in step with the models: the JSON Schema file and the docs' field table."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT

from runner.specs import schema
from runner.specs.loading import load_document
from runner.specs.models import AgentSpec, WorkflowSpec
from runner.specs.validating import is_spec_path

SEED = ROOT / "specs" / "data-processor.yaml"
STALE = "is stale: run `make schema` (python -m runner.specs.schema --write) and commit the result"


def test_schema_files_are_current() -> None:
    assert schema.SCHEMA_PATH == ROOT / "schemas" / "agent-spec.schema.json"
    assert schema.SCHEMA_PATH.read_text() == schema.schema_text(), f"{schema.SCHEMA_PATH.relative_to(ROOT)} {STALE}"
    assert schema.WORKFLOW_SCHEMA_PATH.read_text() == schema.schema_text(WorkflowSpec), \
        f"{schema.WORKFLOW_SCHEMA_PATH.relative_to(ROOT)} {STALE}"


def test_schema_is_a_draft_2020_12_document_that_forbids_unknown_fields() -> None:
    data = json.loads(schema.SCHEMA_PATH.read_text())
    assert data["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert data["$id"].endswith("/agent-spec.schema.json")
    assert data["type"] == "object"
    assert set(data["required"]) == {"name", "model"}
    assert data["additionalProperties"] is False
    assert set(data["properties"]) == set(AgentSpec.model_fields)
    for name, definition in data.get("$defs", {}).items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name


def test_schema_module_prints_the_schema() -> None:
    done = subprocess.run([sys.executable, "-m", "runner.specs.schema"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == schema.schema_text()


def test_docs_field_table_is_current() -> None:
    docs = schema.DOCS_PATH
    assert docs == ROOT / "docs" / "specs.md"
    assert docs.exists(), "docs/specs.md is missing: it documents the spec and holds the generated field table"
    text = docs.read_text()
    assert text.count(schema.BEGIN) == 1 and text.count(schema.END) == 1, (
        f"docs/specs.md needs exactly one pair of markers {schema.BEGIN!r} ... {schema.END!r}")
    between = text.split(schema.BEGIN, 1)[1].split(schema.END, 1)[0]
    assert between.strip("\n") == schema.field_table(), f"the field table in docs/specs.md {STALE}"
    assert schema.docs_text(text) == text, f"docs/specs.md {STALE}"


def test_field_table_lists_every_field_of_every_model() -> None:
    table = schema.field_table()
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE))
    expected = {"name", "model", "tools[].name", "tools[].permissions", "tools[].paths", "tools[].commands",
                "memory.type", "memory.collection", "triggers[].type", "triggers[].cron", "triggers[].timezone",
                "triggers[].path", "triggers[].patterns", "triggers[].debounce", "constraints.max_runtime",
                "constraints.max_tokens", "constraints.allowed_domains"}
    assert expected <= documented
    for line in table.splitlines()[2:]:
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"field without a description: {line}"


def _validator(path: Path) -> Any:
    """jsonschema's validator for a schema file when the package is installed, else None."""
    try:
        jsonschema = importlib.import_module("jsonschema")
    except ImportError:
        return None
    data = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(data)


def _schema_errors(document: Any) -> list[str]:
    """Problems of ``document`` by its kind's JSON schema, or by the pydantic model it is generated from."""
    workflow = isinstance(document, dict) and document.get("kind") == "workflow"
    validator = _validator(schema.WORKFLOW_SCHEMA_PATH if workflow else schema.SCHEMA_PATH)
    if validator is not None:
        return [error.message for error in validator.iter_errors(document)]
    from pydantic import ValidationError

    try:
        (WorkflowSpec if workflow else AgentSpec).model_validate(document)
    except ValidationError as exc:
        return [str(error["msg"]) for error in exc.errors()]
    return []


def test_seed_example_validates_against_the_schema() -> None:
    document = yaml.safe_load(SEED.read_text())
    assert _schema_errors(document) == []


def test_project_specs_validate_against_the_schema() -> None:
    folder = ROOT / "specs"
    specs = [p for p in sorted(folder.rglob("*")) if p.is_file() and is_spec_path(p.relative_to(folder).as_posix())]
    assert SEED in specs
    for path in specs:  # read as the runner reads them: a key written `on` is a name (YAML 1.2), not True
        doc, problems = load_document(path.read_bytes(), str(path))
        assert doc is not None, problems
        assert _schema_errors(doc.data) == [], path


def test_schema_rejects_what_the_models_reject() -> None:
    seed = yaml.safe_load(SEED.read_text())
    assert _schema_errors({**seed, "descripton": "typo"})
    assert _schema_errors({k: v for k, v in seed.items() if k != "model"})
    assert _schema_errors({**seed, "triggers": [{"type": "cronjob", "cron": "* * * * *"}]})
    assert _schema_errors({**seed, "tools": [{"name": "file_reader", "permissions": ["exec"]}]})
    assert _schema_errors({**seed, "name": "../etc/passwd"})


def test_specs_point_editors_at_a_schema_that_exists() -> None:
    folder = ROOT / "specs"
    for path in sorted(folder.rglob("*.yaml")):
        for match in re.finditer(r"#\s*yaml-language-server:\s*\$schema=(\S+)", path.read_text()):
            target = (path.parent / match.group(1)).resolve()
            wanted = schema.WORKFLOW_SCHEMA_PATH if "\nkind: workflow" in path.read_text() else schema.SCHEMA_PATH
            assert target == Path(wanted).resolve(), f"{path}: $schema points at {match.group(1)}"
