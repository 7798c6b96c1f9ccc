"""Spec validation: the real `agentctl validate` on real files, and the functions behind it.

Starting the CLI costs about half a second, so most cases are files in one of two folders validated
once per module: ``corpus`` (specs with semantic and shape problems, custom tools, support files) and
``hostile`` (files that are not YAML specs at all). Each test then reads its own file's problems.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, agentctl

from runner.specs.catalog import BUILTIN_TOOLS
from runner.specs.checking import Context, check_document, cron_problem, did_you_mean, expand
from runner.specs.custom_tools import describe_module
from runner.specs.loading import MAX_BYTES, MAX_DEPTH, load_document
from runner.specs.problems import Problem, errors_in, field_path
from runner.specs.validating import SpecFile, blob_id, is_spec_path, validate_tree

LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<severity>error|warning): (?P<rest>.+)$")
SUMMARY = re.compile(r"^(\d+) spec file\(s\) checked: ")


@dataclass
class Outcome:
    """One `agentctl validate` run."""

    proc: subprocess.CompletedProcess[str]
    root: Path | None = None

    @property
    def code(self) -> int:
        return self.proc.returncode

    @property
    def doc(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.proc.stdout)
        return data

    def problems(self, rel: str) -> list[dict[str, Any]]:
        """The problems of one file, ``rel`` relative to the validated folder (JSON output)."""
        assert self.root is not None
        wanted = str(self.root / rel)
        return [p for p in self.doc["problems"] if p["file"] == wanted]

    def lines(self, rel: str) -> list[str]:
        """The printed problem lines of one file (text output)."""
        assert self.root is not None
        prefix = f"{self.root / rel}:"
        return [line for line in self.proc.stdout.splitlines() if line.startswith(prefix)]


def validate(*paths: str, root: Path | None = None, json_output: bool = True, opts: tuple[str, ...] = ()) -> Outcome:
    """``agentctl [opts] [--output json] validate PATHS``; never a traceback, whatever the files hold."""
    output = ["--output", "json"] if json_output else []
    proc = agentctl(*opts, *output, "validate", *paths, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    return Outcome(proc, root)


def write(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def brief(problems: list[dict[str, Any]]) -> list[tuple[int, int, str, str, str]]:
    return [(p["line"], p["col"], p["severity"], p["field"], p["message"]) for p in problems]


# -- the corpus: specs with problems, custom tools, support files --------------------------------------

IMPORT_MARKER = "imported.marker"

CORPUS: dict[str, str] = {
    "many-problems.yaml": """
        name: many-problems
        model: llama2
        descripton: "typo in a field name"
        tools:
          - name: file_reader
            paths: ["/srv/data"]
          - name: shell
            permissions: ["exec"]
            commands: ["ls"]
        triggers:
          - type: cronjob
            cron: "0 * * * *"
        constraints:
          max_tokens: "lots"
          max_runtime: -5
        """,
    "unknown-fields.yaml": """
        name: unknown-fields
        model: llama2
        description: x
        tools:
          - name: file_reader
            permisions: [read]
            paths: ["/srv"]
        triggers:
          - type: schedule
            cron: "0 * * * *"
            timezon: UTC
        memory:
          colection: notes
        zzz: 1
        """,
    "missing-required.yaml": """
        description: no name, no model
        tools:
          - description: a tool without a name
        triggers:
          - cron: "0 * * * *"
        """,
    "wrong-types.yaml": """
        name: wrong-types
        model: llama2
        description: 5
        enabled: "maybe"
        tools: file_reader
        triggers: {}
        constraints: [1]
        memory:
          recall: many
        """,
    "bad-trigger.yaml": """
        name: bad-trigger
        model: llama2
        description: x
        triggers:
          - type: schedul
            cron: "0 * * * *"
          - type: webhook
          - schedule
        """,
    "unsafe-name.yaml": """
        description: x
        model: llama2
        name: "../etc/passwd"
        """,
    "cron-ok.yaml": """
        name: cron-ok
        model: llama2
        description: x
        triggers:
          - type: schedule
            cron: "0 * * * *"
          - type: schedule
            cron: "*/10 * * * * *"
          - type: schedule
            cron: "@hourly"
          - type: schedule
            cron: "30 8 * * 1-5"
            timezone: America/New_York
        """,
    "cron-bad.yaml": """
        name: cron-bad
        model: llama2
        description: x
        triggers:
          - type: schedule
            cron: "0 0 * * * * *"
          - type: schedule
            cron: "61 * * * *"
          - type: schedule
            cron: "* * *"
        """,
    "tz-bad.yaml": """
        name: tz-bad
        model: llama2
        description: x
        triggers:
          - type: schedule
            cron: "0 * * * *"
            timezone: Europe/Berln
        """,
    "twin-a.yaml": """
        name: twin
        model: llama2
        description: first twin
        """,
    "teams/twin-b.yaml": """
        name: twin
        model: llama2
        description: second twin
        """,
    "paths-ok.yaml": """
        name: paths-ok
        model: llama2
        description: x
        tools:
          - name: file_reader
            paths:
              - "/srv/${CLIENT_ID}/in/"
              - "${AGENT_ORCH_HOME}/data/${CLIENT_ID}/${AGENT_NAME}"
          - name: file_writer
            paths: ["/tmp/out"]
        triggers:
          - type: file_change
            path: "${AGENT_ORCH_HOME}/data/${CLIENT_ID}/inbox/${AGENT_NAME}"
            patterns: ["*.csv"]
            debounce: 0.5
        """,
    "paths-bad.yaml": """
        name: paths-bad
        model: llama2
        description: x
        tools:
          - name: file_reader
            paths: ["data/", "${NOPE}/x", "${CLIENT_ID}/in"]
        triggers:
          - type: file_change
            path: relative/dir
        """,
    "file-tools-no-paths.yaml": """
        name: file-tools-no-paths
        model: llama2
        description: x
        tools:
          - name: file_reader
          - name: file_writer
          - name: data_analyzer
        """,
    "unknown-tool.yaml": """
        name: unknown-tool
        model: llama2
        description: x
        tools:
          - name: file_readr
            paths: ["/srv"]
          - name: summarizer
        """,
    "perm-mismatch.yaml": """
        name: perm-mismatch
        model: llama2
        description: x
        tools:
          - name: file_reader
            permissions: [read, write]
            paths: ["/srv"]
          - name: memory_search
            permissions: [network]
        """,
    "shell-no-commands.yaml": """
        name: shell-no-commands
        model: llama2
        description: x
        tools:
          - name: shell
          - name: file_reader
            paths: ["/srv"]
            commands: [ls]
        """,
    "tools/broken.py": """
        from langchain_core.tools import tool
        PERMISSIONS = ["read"]
        def broken(:
            pass
        """,
    "tools/noperms.py": """
        from langchain_core.tools import tool

        @tool
        def noperms(text: str) -> str:
            "Echo."
            return text
        """,
    "tools/good.py": f"""
        from pathlib import Path

        from langchain_core.tools import tool

        Path(__file__).parent.with_name("{IMPORT_MARKER}").write_text("validation imported me")
        PERMISSIONS = ["read"]


        @tool
        def good(path: str) -> str:
            "Read a file."
            return Path(path).read_text()
        """,
    "uses-broken.yaml": """
        name: uses-broken
        model: llama2
        description: x
        tools:
          - name: broken
            paths: ["/srv"]
        """,
    "uses-noperms.yaml": """
        name: uses-noperms
        model: llama2
        description: x
        tools:
          - name: noperms
        """,
    "uses-good.yaml": """
        name: uses-good
        model: llama2
        description: x
        tools:
          - name: good
            permissions: [read]
            paths: ["/srv/${CLIENT_ID}"]
        """,
    "good-granted-write.yaml": """
        name: good-granted-write
        model: llama2
        description: x
        tools:
          - name: good
            permissions: [read, write]
            paths: ["/srv"]
        """,
    "scripted-ok.yaml": """
        name: scripted-ok
        model: scripted:_scripts/turns.yaml
        description: x
        """,
    "scripted-missing.yaml": """
        name: scripted-missing
        model: scripted:_scripts/missing.yaml
        description: x
        """,
    "scripted-outside.yaml": """
        name: scripted-outside
        model: scripted:../outside.yaml
        description: x
        """,
    # Support files and other things that are not specs (they would fail if they were read as specs).
    "_scripts/turns.yaml": """
        turns:
          - content: "done"
        """,
    "_drafts/nested/broken.yaml": "name: [unclosed\n",
    ".hidden.yaml": "name: [unclosed\n",
    ".config/settings.yaml": "name: [unclosed\n",
    "tools/config.yaml": "name: [unclosed\n",
    "README.md": "# not a spec\n",
}
CORPUS_SPECS = sorted(rel for rel in CORPUS if is_spec_path(rel))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "specs"
    for rel, text in CORPUS.items():
        write(root, rel, text)
    return root


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    home = tmp_path_factory.mktemp("home")
    return validate(str(corpus_dir), root=corpus_dir, opts=("--home", str(home), "--client-id", "default"))


@pytest.fixture(scope="module")
def corpus_text(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    home = tmp_path_factory.mktemp("home")
    return validate(str(corpus_dir), root=corpus_dir, json_output=False,
                    opts=("--home", str(home), "--client-id", "default"))


def test_corpus_exit_code_and_json_document(corpus: Outcome) -> None:
    assert corpus.code == 1, corpus.proc.stderr
    doc = corpus.doc
    assert set(doc) >= {"files", "valid", "problems"}
    assert doc["valid"] is False
    assert doc["files"] == len(CORPUS_SPECS)
    for p in doc["problems"]:
        assert set(p) == {"file", "line", "col", "field", "message", "severity"}
        assert p["severity"] in ("error", "warning")
        assert isinstance(p["line"], int) and p["line"] >= 1 and isinstance(p["col"], int) and p["col"] >= 1
        assert "\n" not in p["message"]


def test_text_output_one_problem_a_line(corpus: Outcome, corpus_text: Outcome) -> None:
    assert corpus_text.code == 1
    lines = corpus_text.proc.stdout.splitlines()
    assert len(lines) == len(corpus.doc["problems"])
    for line in lines:
        assert LINE.match(line), line
    errors = sum(1 for p in corpus.doc["problems"] if p["severity"] == "error")
    summary = corpus_text.proc.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{len(CORPUS_SPECS)} spec file(s) checked: {errors} error(s)"), summary


def test_text_line_names_file_line_col_field_and_message(corpus_text: Outcome, corpus_dir: Path) -> None:
    assert (f"{corpus_dir}/many-problems.yaml:8:19: error: tools[1].permissions[0]: 'exec' is not one of "
            "read, write, execute, network; did you mean 'execute'?") in corpus_text.lines("many-problems.yaml")


def test_every_problem_of_a_file_with_position(corpus: Outcome) -> None:
    assert brief(corpus.problems("many-problems.yaml")) == [
        (1, 1, "warning", "", "no 'instructions' or 'description': the model gets no task"),
        (3, 1, "error", "descripton", "unknown field 'descripton'; did you mean 'description'?"),
        (8, 18, "error", "tools[1].permissions", "shell needs 'execute' to work"),
        (8, 19, "error", "tools[1].permissions[0]",
         "'exec' is not one of read, write, execute, network; did you mean 'execute'?"),
        (11, 11, "error", "triggers[0].type", "'cronjob' is not one of schedule, file_change, webhook, run_completed"),
        (14, 15, "error", "constraints.max_tokens",
         "input should be a valid integer, unable to parse string as an integer, not str 'lots'"),
        (15, 16, "error", "constraints.max_runtime", "input should be greater than 0"),
    ]


def test_unknown_fields_get_did_you_mean_at_their_key(corpus: Outcome) -> None:
    found = brief(corpus.problems("unknown-fields.yaml"))
    assert found[:3] == [
        (6, 5, "error", "tools[0].permisions", "unknown field 'permisions'; did you mean 'permissions'?"),
        (11, 5, "error", "triggers[0].timezon", "unknown field 'timezon'; did you mean 'timezone'?"),
        (13, 3, "error", "memory.colection", "unknown field 'colection'; did you mean 'collection'?"),
    ]
    line, col, severity, path, message = found[3]
    assert (line, col, severity, path) == (14, 1, "error", "zzz")
    assert message.startswith("unknown field 'zzz' (known: a2a, constraints, description, enabled, instructions,")
    assert len(found) == 4


def test_missing_required_fields(corpus: Outcome) -> None:
    assert brief(corpus.problems("missing-required.yaml")) == [
        (1, 1, "error", "name", "required field 'name' is missing"),
        (1, 1, "error", "model", "required field 'model' is missing"),
        (3, 5, "error", "tools[0].name", "required field 'name' is missing"),
        (5, 5, "error", "triggers[0].type",
         "required field 'type' is missing (one of schedule, file_change, webhook, run_completed)"),
    ]


def test_wrong_types(corpus: Outcome) -> None:
    assert brief(corpus.problems("wrong-types.yaml")) == [
        (3, 14, "error", "description", "input should be a valid string, not int 5"),
        (4, 10, "error", "enabled", "input should be a valid boolean, unable to interpret input, not str 'maybe'"),
        (5, 8, "error", "tools", "input should be a valid list, not str 'file_reader'"),
        (6, 11, "error", "triggers", "input should be a valid list, not a mapping"),
        (7, 14, "error", "constraints", "input should be a mapping of fields, not a list"),
        (9, 11, "error", "memory.recall",
         "input should be a valid integer, unable to parse string as an integer, not str 'many'"),
    ]


def test_bad_trigger_type(corpus: Outcome) -> None:
    assert brief(corpus.problems("bad-trigger.yaml")) == [
        (5, 11, "error", "triggers[0].type",
         "'schedul' is not one of schedule, file_change, webhook, run_completed; did you mean 'schedule'?"),
        (7, 5, "error", "triggers[1]", "a webhook needs its secret: name secret_env or secret_file (one of them)"),
        (8, 5, "error", "triggers[2]", "input should be a mapping of fields, not str 'schedule'"),
    ]


def test_name_unsafe_as_file_name(corpus: Outcome) -> None:
    assert brief(corpus.problems("unsafe-name.yaml")) == [
        (3, 7, "error", "name", "'../etc/passwd' is not valid: use lowercase letters, digits, '-' and '_' "
         "(at most 63, starting with a letter or digit)"),
    ]


def test_cron_five_six_fields_and_aliases_pass(corpus: Outcome) -> None:
    assert corpus.problems("cron-ok.yaml") == []


def test_cron_problems(corpus: Outcome) -> None:
    found = brief(corpus.problems("cron-bad.yaml"))
    assert [f[:4] for f in found] == [
        (6, 11, "error", "triggers[0].cron"),
        (8, 11, "error", "triggers[1].cron"),
        (10, 11, "error", "triggers[2].cron"),
    ]
    assert found[0][4].startswith("cron expression '0 0 * * * * *' has 7 fields; write five")
    assert found[1][4] == "'61 * * * *' is not a valid cron expression"
    assert found[2][4].startswith("cron expression '* * *' has 3 fields")


def test_unknown_time_zone_with_did_you_mean(corpus: Outcome) -> None:
    assert brief(corpus.problems("tz-bad.yaml")) == [
        (7, 15, "error", "triggers[0].timezone",
         "unknown time zone 'Europe/Berln'; did you mean 'Europe/Berlin'? (use an IANA name such as Europe/Berlin)"),
    ]


def test_duplicate_agent_names_flag_both_files(corpus: Outcome) -> None:
    first = corpus.problems("twin-a.yaml")
    second = corpus.problems("teams/twin-b.yaml")
    assert [(p["field"], p["severity"], p["message"]) for p in first] == [
        ("name", "error", "agent 'twin' is also defined in teams/twin-b.yaml")]
    assert [(p["field"], p["severity"], p["message"]) for p in second] == [
        ("name", "error", "agent 'twin' is also defined in twin-a.yaml")]


def test_paths_with_variables_pass(corpus: Outcome) -> None:
    assert corpus.problems("paths-ok.yaml") == []


def test_relative_paths_and_unknown_variables(corpus: Outcome) -> None:
    assert brief(corpus.problems("paths-bad.yaml")) == [
        (6, 13, "error", "tools[0].paths[0]", "'data/' is not an absolute path"),
        (6, 22, "error", "tools[0].paths[1]",
         "unknown variable ${NOPE} (known: ${CLIENT_ID}, ${AGENT_NAME}, ${AGENT_ORCH_HOME})"),
        # ${CLIENT_ID} expands to the default client before the check.
        (6, 35, "error", "tools[0].paths[2]", "'default/in' is not an absolute path"),
        (9, 11, "error", "triggers[0].path", "'relative/dir' is not an absolute path"),
    ]


def test_file_tools_need_paths_data_analyzer_only_warns(corpus: Outcome) -> None:
    assert brief(corpus.problems("file-tools-no-paths.yaml")) == [
        (5, 5, "error", "tools[0]", "file_reader touches files: name the folders it may use in 'paths'"),
        (6, 5, "error", "tools[1]", "file_writer touches files: name the folders it may use in 'paths'"),
        (7, 5, "warning", "tools[2]", "data_analyzer has no 'paths': its queries can read no files"),
    ]


def test_unknown_tool_with_did_you_mean(corpus: Outcome) -> None:
    found = brief(corpus.problems("unknown-tool.yaml"))
    assert [f[:4] for f in found] == [(5, 11, "error", "tools[0].name"), (7, 11, "error", "tools[1].name")]
    assert found[0][4].startswith("unknown tool 'file_readr'; did you mean 'file_reader'? (builtins: file_reader,")
    assert found[1][4].startswith("unknown tool 'summarizer' (builtins: ")
    assert "custom tools live in tools/NAME.py" in found[1][4]


def test_permissions_must_fit_the_tool(corpus: Outcome) -> None:
    assert brief(corpus.problems("perm-mismatch.yaml")) == [
        (6, 25, "error", "tools[0].permissions[1]", "file_reader cannot be granted 'write' (it may have: read)"),
        (9, 19, "error", "tools[1].permissions[0]", "memory_search cannot be granted 'network' (it may have: read)"),
    ]


def test_shell_needs_commands_and_only_shell_takes_them(corpus: Outcome) -> None:
    assert brief(corpus.problems("shell-no-commands.yaml")) == [
        (5, 5, "error", "tools[0]", "shell runs only listed programs: name them in 'commands'"),
        (8, 15, "error", "tools[1].commands", "only the shell tool takes 'commands'"),
    ]


def test_custom_tool_with_syntax_error_breaks_only_its_users(corpus: Outcome) -> None:
    assert brief(corpus.problems("uses-broken.yaml")) == [
        (5, 11, "error", "tools[0].name", "custom tool 'broken' cannot be loaded: tools/broken.py:3: syntax error: "
         "invalid syntax"),
    ]


def test_custom_tool_without_permissions_breaks_only_its_users(corpus: Outcome) -> None:
    assert brief(corpus.problems("uses-noperms.yaml")) == [
        (5, 11, "error", "tools[0].name",
         "custom tool 'noperms' cannot be loaded: tools/noperms.py defines no PERMISSIONS = [...]"),
    ]


def test_specs_not_using_broken_tools_stay_valid(corpus: Outcome) -> None:
    invalid = {Path(p["file"]).relative_to(corpus.root or Path()).as_posix()
               for p in corpus.doc["problems"] if p["severity"] == "error"}
    for rel in ("cron-ok.yaml", "paths-ok.yaml", "uses-good.yaml", "scripted-ok.yaml"):
        assert rel not in invalid


def test_valid_custom_tool_is_usable_and_never_imported(corpus: Outcome, corpus_dir: Path) -> None:
    assert corpus.problems("uses-good.yaml") == []
    assert not (corpus_dir / IMPORT_MARKER).exists()
    assert not (corpus_dir / "tools" / "__pycache__").exists()


def test_custom_tool_cannot_be_granted_more_than_it_declares(corpus: Outcome) -> None:
    assert brief(corpus.problems("good-granted-write.yaml")) == [
        (6, 25, "error", "tools[0].permissions[1]", "good cannot be granted 'write' (it may have: read)"),
    ]


def test_scripted_model_file_must_exist_inside_the_source(corpus: Outcome) -> None:
    assert corpus.problems("scripted-ok.yaml") == []
    assert brief(corpus.problems("scripted-missing.yaml")) == [
        (2, 8, "error", "model", "scripted model file '_scripts/missing.yaml' not found in the spec source"),
    ]
    assert brief(corpus.problems("scripted-outside.yaml")) == [
        (2, 8, "error", "model", "a scripted model file must be inside the spec source folder"),
    ]


def test_underscore_dot_and_tools_files_are_not_specs(corpus: Outcome, corpus_dir: Path) -> None:
    files = {p["file"] for p in corpus.doc["problems"]}
    for rel in ("_scripts/turns.yaml", "_drafts/nested/broken.yaml", ".hidden.yaml", ".config/settings.yaml",
                "tools/config.yaml", "README.md"):
        assert str(corpus_dir / rel) not in files
    assert corpus.doc["files"] == len(CORPUS_SPECS)


# -- hostile files: not specs, not even YAML ---------------------------------------------------------


def _bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    prev = "a"
    for label in "bcdefghi":
        lines.append(f"{label}: &{label} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = label
    return "\n".join(["name: bomb", "model: llama2", *lines]) + "\n"


HOSTILE: dict[str, bytes] = {
    "syntax.yaml": b"name: syntax\nmodel: [unclosed\ndescription: x\n",
    "duplicate-key.yaml": b"name: dup-key\nmodel: llama2\ndescription: x\nname: other\n",
    "list.yaml": b"- name: a\n- model: b\n",
    "scalar.yaml": b"just a sentence\n",
    "empty.yaml": b"",
    "comments-only.yaml": b"# nothing here\n# at all\n",
    "big.yaml": b"name: big\nmodel: llama2\ndescription: \"" + b"x" * (5 * 1024 * 1024) + b"\"\n",
    "binary.yaml": b"name: bin\nmo\x00\x01\x02del: x\n",
    "latin1.yaml": b"name: cafe\ndescription: caf\xe9\nmodel: llama2\n",
    "two-documents.yaml": b"name: one\nmodel: llama2\n---\nname: two\nmodel: llama2\n",
    "bomb.yaml": _bomb().encode(),
    "recursive-alias.yaml": b"name: rec\nmodel: llama2\ndescription: &a [*a]\n",
    "control-char.yaml": b"name: ctl\nmodel: llama2\ndescription: bell\x07here\n",
    "bad-date.yaml": b"name: when\nmodel: llama2\ndescription: 2024-13-45\n",
    "bad-tag.yaml": b"name: tag\nmodel: !!python/object:os.system echo\n",
}

# file -> (line, col, start of the message); every one is the file's only problem. None: wherever the
# node count runs out.
HOSTILE_EXPECTED: dict[str, tuple[int | None, int | None, str]] = {
    "syntax.yaml": (3, 12, "YAML syntax: did not find expected ',' or ']'"),
    "duplicate-key.yaml": (4, 1, "name: duplicate key 'name' (first at line 1)"),
    "list.yaml": (1, 1, "file holds a list; a spec is a mapping"),
    "scalar.yaml": (1, 1, "file holds a single value; a spec is a mapping"),
    "empty.yaml": (1, 1, "file is empty"),
    "comments-only.yaml": (1, 1, "file is empty"),
    "big.yaml": (1, 1, "file is too large (5.2 MB; a spec may be at most 1 MiB)"),
    "binary.yaml": (2, 3, "file is binary (it holds a NUL byte), not YAML text"),
    "latin1.yaml": (2, 17, "file is not UTF-8 text (byte 0xe9 cannot be decoded)"),
    "two-documents.yaml": (3, 1, "YAML syntax: but found another document"),
    "bomb.yaml": (None, None, "document is too large or expands too far through aliases"),
    "recursive-alias.yaml": (3, 14, "document is nested too deep"),
    "control-char.yaml": (3, 18, "YAML syntax: control characters are not allowed (character #x0007)"),
    "bad-date.yaml": (3, 14, "description: cannot read '2024-13-45' as timestamp"),
    "bad-tag.yaml": (2, 8, "model: cannot read value: could not determine a constructor"),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "specs"
    for rel, data in HOSTILE.items():
        write(root, rel, data)
    os.symlink(root / "no-such-target.yaml", root / "dangling.yaml")
    return root


@pytest.fixture(scope="module")
def hostile(hostile_dir: Path) -> Outcome:
    return Outcome(agentctl("validate", str(hostile_dir), timeout=120), hostile_dir)


def test_hostile_files_exit_1_and_every_line_is_a_problem(hostile: Outcome) -> None:
    assert "Traceback" not in hostile.proc.stderr, hostile.proc.stderr
    assert "internal error" not in hostile.proc.stderr, hostile.proc.stderr
    assert hostile.code == 1, hostile.proc.stderr
    for line in hostile.proc.stdout.splitlines():
        assert LINE.match(line), line
    summary = hostile.proc.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{len(HOSTILE) + 1} spec file(s) checked: {len(HOSTILE) + 1} error(s)"), summary


@pytest.mark.parametrize("rel", sorted(HOSTILE_EXPECTED))
def test_hostile_file_gets_one_clear_line(hostile: Outcome, rel: str) -> None:
    lines = hostile.lines(rel)
    assert len(lines) == 1, hostile.proc.stdout
    line, col, message = HOSTILE_EXPECTED[rel]
    found = LINE.match(lines[0])
    assert found is not None, lines[0]
    assert found["file"] == f"{hostile.root}/{rel}" and found["severity"] == "error"
    assert (int(found["line"]), int(found["col"])) == (line or int(found["line"]), col or int(found["col"]))
    assert found["rest"].startswith(message), lines[0]


def test_dangling_symlink_says_it_cannot_be_read(hostile: Outcome) -> None:
    lines = hostile.lines("dangling.yaml")
    assert len(lines) == 1
    assert lines[0].startswith(f"{hostile.root}/dangling.yaml:1:1: error: file cannot be used: unreadable:"), lines


# Deep enough to overflow the C stack of a recursive composer (a segfault, not an exception), yet under 1 MiB.
DEEP: dict[str, tuple[bytes, int, int]] = {
    "deep-flow.yaml": (b"description: " + b"[" * 200_000 + b"]" * 200_000 + b"\n", 3, 14 + MAX_DEPTH),
    "deep-block.yaml": (b"description:\n  " + b"- " * 200_000 + b"x\n", 4, 3 + 2 * MAX_DEPTH),
    "deep-mapping.yaml": (b"description: " + b"{a: " * 100_000 + b"x" + b"}" * 100_000, 3, 14 + 4 * MAX_DEPTH),
}


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    root = tmp_path_factory.mktemp("deep") / "specs"
    for rel, (body, _, _) in DEEP.items():
        write(root, rel, b"name: deep-" + rel.split("-")[1].split(".")[0].encode() + b"\nmodel: llama2\n" + body)
    return Outcome(agentctl("validate", str(root), timeout=120), root)


def test_deep_nesting_does_not_crash(deep: Outcome) -> None:
    assert deep.code == 1, f"exit {deep.code} (negative: killed by a signal): {deep.proc.stderr}"
    assert "Traceback" not in deep.proc.stderr and "internal error" not in deep.proc.stderr


@pytest.mark.parametrize("rel", sorted(DEEP))
def test_deep_nesting_gets_one_clear_line(deep: Outcome, rel: str) -> None:
    _, line, col = DEEP[rel]
    assert deep.lines(rel) == [
        f"{deep.root}/{rel}:{line}:{col}: error: document is nested too deep (over {MAX_DEPTH} levels)"]


# -- the project's own specs, single files, options ----------------------------------------------------


def test_seed_example_validates_alone() -> None:
    out = validate("specs/data-processor.yaml", root=Path())
    assert out.code == 0, out.proc.stdout
    assert out.doc["valid"] is True and out.doc["files"] == 1
    # Valid, with the one warning the docs mention: its data_analyzer has no paths.
    assert brief(out.problems("specs/data-processor.yaml")) == [
        (9, 5, "warning", "tools[1]", "data_analyzer has no 'paths': its queries can read no files"),
    ]


def test_seed_example_text_output_exit_0_with_warning() -> None:
    out = validate("specs/data-processor.yaml", json_output=False)
    assert out.code == 0
    assert out.proc.stdout.splitlines() == [
        "specs/data-processor.yaml:9:5: warning: tools[1]: data_analyzer has no 'paths': its queries can read no files"
    ]
    assert "1 spec file(s) checked: all valid, 1 warning(s)" in out.proc.stderr


def test_seed_example_is_verbatim_and_parses_to_its_fields() -> None:
    raw = (ROOT / "specs" / "data-processor.yaml").read_bytes()
    doc, problems = load_document(raw, "specs/data-processor.yaml")
    assert doc is not None and problems == []
    spec, problems = check_document(doc, Context(), "data-processor.yaml")
    assert spec is not None and errors_in(problems) == []
    assert spec.name == "data-processor" and spec.model == "llama2"
    assert [t.name for t in spec.tools] == ["file_reader", "data_analyzer"]
    assert spec.memory is not None and spec.memory.collection == "data_processor_memory"
    assert [t.type for t in spec.triggers] == ["file_change", "schedule"]
    assert spec.constraints.allowed_domains == ["local"]


def test_every_project_spec_validates_as_a_folder_and_one_by_one() -> None:
    folder = validate("specs", root=ROOT)
    assert folder.code == 0, folder.proc.stdout
    spec_files = sorted(p.relative_to(ROOT / "specs").as_posix() for p in (ROOT / "specs").rglob("*")
                        if p.is_file() and is_spec_path(p.relative_to(ROOT / "specs").as_posix()))
    assert "data-processor.yaml" in spec_files
    assert folder.doc["files"] == len(spec_files)
    assert errors_in([Problem.from_json(p) for p in folder.doc["problems"]]) == []
    one_by_one = validate(*(f"specs/{rel}" for rel in spec_files), root=ROOT)
    assert one_by_one.code == 0, one_by_one.proc.stdout
    assert one_by_one.doc["files"] == len(spec_files)


def test_single_file_vs_folder(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    write(root, "tools/good.py", CORPUS["tools/good.py"])
    write(root, "_scripts/turns.yaml", CORPUS["_scripts/turns.yaml"])
    write(root, "one.yaml", """
        name: one
        model: scripted:_scripts/turns.yaml
        description: uses a custom tool and a scripted model
        tools:
          - name: good
            paths: ["/srv"]
        """)
    write(root, "other.yaml", "name: other\nmodel: llama2\ndescription: x\nnope: 1\n")
    alone = validate(str(root / "one.yaml"), root=root)
    assert alone.code == 0, alone.proc.stdout
    assert alone.doc == {"files": 1, "valid": True, "problems": []}
    folder = validate(str(root), root=root)
    assert folder.code == 1
    assert folder.doc["files"] == 2
    assert folder.problems("one.yaml") == []
    assert [p["field"] for p in folder.problems("other.yaml")] == ["nope"]


def test_nonexistent_path_is_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    out = agentctl("validate", str(missing))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and str(missing) in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_nonexistent_path_among_good_ones_is_usage_error(tmp_path: Path) -> None:
    out = agentctl("validate", "specs/data-processor.yaml", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr


def test_no_path_is_usage_error() -> None:
    out = agentctl("validate")
    assert out.returncode == 2
    assert "Missing argument" in out.stderr
    assert "Traceback" not in out.stderr


def test_client_id_changes_client_id_expansion(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    write(root, "acme.yaml", """
        name: acme-reader
        model: llama2
        description: x
        tools:
          - name: file_reader
            paths: ["/opt/agency_stack/clients/${CLIENT_ID}/data/", "${CLIENT_ID}/relative"]
        triggers:
          - type: file_change
            path: "/opt/agency_stack/clients/${CLIENT_ID}/data/incoming/"
        """)
    out = validate(str(root), root=root, opts=("--client-id", "acme"))
    assert out.code == 1
    # The absolute path still passes; the relative one shows ${CLIENT_ID} expanded to the chosen client.
    assert brief(out.problems("acme.yaml")) == [
        (6, 61, "error", "tools[0].paths[1]", "'acme/relative' is not an absolute path"),
    ]


def test_client_id_keeps_the_seed_valid() -> None:
    out = validate("specs/data-processor.yaml", root=ROOT, opts=("--client-id", "acme"))
    assert out.code == 0
    assert out.doc["valid"] is True


def test_warnings_only_exit_0(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    write(root, "warn.yaml", """
        name: warn
        model: llama2
        tools:
          - name: data_analyzer
          - name: http_get
        """)
    out = validate(str(root), root=root)
    assert out.code == 0, out.proc.stdout
    assert out.doc["valid"] is True
    assert {(p["field"], p["severity"]) for p in out.problems("warn.yaml")} == {
        ("", "warning"), ("tools[0]", "warning"), ("constraints", "warning")}


# -- the functions behind the command ------------------------------------------------------------------


def _check(text: str, ctx: Context | None = None, rel: str = "x.yaml") -> list[Problem]:
    doc, problems = load_document(textwrap.dedent(text).lstrip("\n").encode(), rel)
    if doc is None:
        return problems
    _, problems = check_document(doc, ctx or Context(), rel)
    return problems


def test_problem_string_and_json() -> None:
    p = Problem("specs/a.yaml", 3, 7, "tools[1].permissions[0]", "bad")
    assert str(p) == "specs/a.yaml:3:7: error: tools[1].permissions[0]: bad"
    assert str(Problem("a.yaml", 1, 1, "", "file is empty")) == "a.yaml:1:1: error: file is empty"
    assert str(Problem("a.yaml", 2, 1, "x", "m", "warning")) == "a.yaml:2:1: warning: x: m"
    assert Problem.from_json(json.loads(json.dumps(p.as_json()))) == p
    assert errors_in([p, Problem("a", 1, 1, "", "w", "warning")]) == [p]


def test_field_path() -> None:
    assert field_path(("tools", 1, "permissions", 0)) == "tools[1].permissions[0]"
    assert field_path(("constraints", "max_tokens")) == "constraints.max_tokens"
    assert field_path(()) == ""


def test_positions_of_keys_and_values() -> None:
    doc, problems = load_document(b"name: a\ntools:\n  - name: shell\n    commands: [ls, cat]\n", "f")
    assert doc is not None and problems == []
    assert doc.position(("name",)) == (1, 7)
    assert doc.position(("name",), key=True) == (1, 1)
    assert doc.position(("tools", 0, "commands", 1)) == (4, 20)
    assert doc.position(("tools", 0, "commands"), key=True) == (4, 5)
    # A missing field is placed at its nearest ancestor.
    assert doc.position(("tools", 0, "paths")) == (3, 5)
    assert doc.position(("nothing", "here")) == (1, 1)


def test_yaml_keys_like_on_and_yes_stay_names() -> None:
    problems = _check("name: a\nmodel: m\ndescription: x\non: 1\n")
    assert [(p.field, p.message.split(" (")[0]) for p in problems] == [("on", "unknown field 'on'")]


def test_merge_keys_and_anchors_work() -> None:
    problems = _check("""
        name: merged
        model: llama2
        description: x
        tools:
          - &reader {name: file_reader, paths: ["/srv"]}
          - <<: *reader
            name: file_writer
        """)
    assert problems == []


def test_bom_is_ignored() -> None:
    doc, problems = load_document("\ufeffname: a\nmodel: m\n".encode(), "f")
    assert doc is not None and problems == [] and doc.position(("name",)) == (1, 7)


def test_crlf_line_ends_keep_positions() -> None:
    problems = _check("name: a\r\nmodel: m\r\ndescription: x\r\nzzz: 1\r\n")
    assert [(p.line, p.col, p.field) for p in problems] == [(4, 1, "zzz")]


@pytest.mark.parametrize("raw", [
    b"a: !!bool maybe\n", b"a: !!int x\n", b"a: !!timestamp x\n", b"a: !!float x\n", b"a: 2024-02-30\n",
    b"a: !!python/name:os.system ''\n",
])
def test_unreadable_scalars_are_problems(raw: bytes) -> None:
    doc, problems = load_document(raw, "f")
    assert doc is None
    assert [(p.line, p.col, p.field) for p in problems] == [(1, 4, "a")]
    assert problems[0].message.startswith("cannot read")


def test_depth_limit() -> None:
    shallow = b"a: " + b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2) + b"\n"
    assert load_document(shallow, "f")[0] is not None
    deep = b"a: " + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"\n"
    doc, problems = load_document(deep, "f")
    assert doc is None and "nested too deep" in problems[0].message


def test_size_limit() -> None:
    text = b"name: a\nmodel: m\ndescription: \"" + b"x" * MAX_BYTES + b"\"\n"
    doc, problems = load_document(text, "f")
    assert doc is None and problems[0].message.startswith("file is too large")


@pytest.mark.parametrize("expr", [
    "0 * * * *", "*/5 * * * *", "30 8 * * 1-5", "0 0 1 1 *", "*/10 * * * * *", "0 30 8 * * mon-fri",
    "@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually", "@midnight", " 0 * * * * ",
])
def test_cron_accepted(expr: str) -> None:
    assert cron_problem(expr) is None


@pytest.mark.parametrize(("expr", "fields"), [
    ("0 0 * * * * *", 7), ("* * * *", 4), ("", 0), ("@every5m", 1), ("hourly", 1),
])
def test_cron_wrong_field_count(expr: str, fields: int) -> None:
    problem = cron_problem(expr)
    assert problem is not None and f"has {fields} fields" in problem


@pytest.mark.parametrize("expr", ["61 * * * *", "* 25 * * *", "* * 32 * *", "* * * 13 *", "99 * * * * *",
                                  "a b c d e"])
def test_cron_invalid_values(expr: str) -> None:
    assert cron_problem(expr) == f"'{expr}' is not a valid cron expression"


@pytest.mark.parametrize("name", ["a", "0abc", "data-processor", "x_1", "a" * 63])
def test_safe_names(name: str) -> None:
    assert _check(f"name: '{name}'\nmodel: m\ndescription: x\n") == []


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "Upper", "has space", "-leading", "_leading", ".hidden",
                                  "", "a" * 64, "tab\\there", "a.yaml", "a\\\\b", "nul\\0"])
def test_unsafe_names(name: str) -> None:
    problems = _check(f'name: "{name}"\nmodel: m\ndescription: x\n')
    assert [(p.line, p.col, p.field) for p in problems] == [(1, 7, "name")]
    assert "is not valid: use lowercase letters" in problems[0].message


@pytest.mark.parametrize("model", ["llama2", "ollama:llama3.1:8b", "openai:qwen2.5-7b", "scripted:_s/x.yaml"])
def test_model_strings_accepted(model: str) -> None:
    assert _check(f"name: a\nmodel: '{model}'\ndescription: x\n") == []


@pytest.mark.parametrize("model", ["", "bad model", ":x", "ollama: x", "scripted: x"])
def test_model_strings_rejected(model: str) -> None:
    problems = _check(f"name: a\nmodel: '{model}'\ndescription: x\n")
    assert [(p.field, p.message.split(" is not valid")[1]) for p in problems] == [
        ("model", ": write NAME, ollama:NAME, openai:NAME or scripted:PATH")]


def test_scripted_model_is_relative_to_the_spec_file() -> None:
    ctx = Context(file_exists={"team/_scripts/t.yaml"}.__contains__)
    text = "name: a\nmodel: scripted:_scripts/t.yaml\ndescription: x\n"
    assert _check(text, ctx, "team/a.yaml") == []
    problems = _check(text, ctx, "a.yaml")
    assert [p.message for p in problems] == ["scripted model file '_scripts/t.yaml' not found in the spec source"]


def test_home_variable_expands_to_the_context_home() -> None:
    ctx = Context(home="relative-home")
    problems = _check("""
        name: a
        model: m
        description: x
        tools:
          - name: file_reader
            paths: ["${AGENT_ORCH_HOME}/in"]
        """, ctx)
    assert [p.message for p in problems] == ["'relative-home/in' is not an absolute path"]


def test_expand() -> None:
    variables = {"CLIENT_ID": "acme", "AGENT_NAME": "bot", "AGENT_ORCH_HOME": "/h"}
    assert expand("${AGENT_ORCH_HOME}/${CLIENT_ID}/${AGENT_NAME}", variables) == "/h/acme/bot"
    assert expand("$CLIENT_ID/plain", variables) == "$CLIENT_ID/plain"
    with pytest.raises(KeyError):
        expand("/x/${HOME}", variables)


def test_did_you_mean() -> None:
    assert did_you_mean("exec", ["read", "write", "execute", "network"]) == "; did you mean 'execute'?"
    assert did_you_mean("zzz", ["read"]) == ""


def test_weird_values_in_tools_are_problems_not_crashes() -> None:
    problems = _check("""
        name: weird
        model: m
        description: x
        constraints:
          allowed_domains: [{a: 1}, "http://x.example", "ok.example", "*.ok.example", local]
        tools:
          - name: file_reader
            permissions: [[read], {a: 1}]
            paths: [{a: 1}, 5]
          - name: [http_get]
          - 7
          - {name: {a: 1}}
        """)
    assert errors_in(problems)
    fields = {p.field for p in problems}
    assert {"tools[0].permissions[0]", "tools[0].permissions[1]", "tools[0].paths[0]", "tools[1].name", "tools[2]",
            "tools[3].name", "constraints.allowed_domains[0]", "constraints.allowed_domains[1]"} <= fields
    assert "constraints.allowed_domains[2]" not in fields


def test_duplicate_tool_entries() -> None:
    problems = _check("""
        name: a
        model: m
        description: x
        tools:
          - name: memory_save
          - name: memory_save
        """)
    assert [(p.line, p.col, p.field, p.message) for p in problems] == [
        (6, 11, "tools[1].name", "tool 'memory_save' is listed twice (first as tools[0])")]


def test_catalog_names_match_the_interface() -> None:
    assert set(BUILTIN_TOOLS) == {"file_reader", "file_writer", "data_analyzer", "http_get", "shell",
                                  "memory_search", "memory_save"}


# -- custom tools, read with ast ----------------------------------------------------------------------

TOOL_HEAD = "from langchain_core.tools import tool\n"


@pytest.mark.parametrize(("source", "allowed"), [
    (TOOL_HEAD + "PERMISSIONS = ['read']\n@tool\ndef peek(path: str) -> str:\n    return path\n", {"read"}),
    (TOOL_HEAD + "PERMISSIONS = ('read', 'network')\n@tool('peek')\nasync def peek(x: str) -> str:\n    return x\n",
     {"read", "network"}),
    (TOOL_HEAD + "PERMISSIONS: list[str] = ['write']\n@tool\ndef peek(x: str) -> str:\n    return x\n", {"write"}),
    ("import langchain_core.tools as t\nPERMISSIONS = []\n@t.tool\ndef peek(x: str) -> str:\n    return x\n",
     set()),
    (TOOL_HEAD + "PERMISSIONS = ['execute']\npeek = tool(len)\n", {"execute"}),
])
def test_custom_tool_read_without_import(source: str, allowed: set[str]) -> None:
    info = describe_module("peek", (source + "raise SystemExit('imported')\n").encode())
    assert info.error is None
    assert info.allowed == frozenset(allowed) and info.needs == frozenset(allowed)
    assert info.builtin is False
    assert info.file_tool == bool(allowed & {"read", "write"})


@pytest.mark.parametrize(("source", "error"), [
    (b"def peek(:\n", "tools/peek.py:1: syntax error"),
    (b"PERMISSIONS = ['read']\x00\n", "tools/peek.py:"),
    (b"\xff\xfe garbage", "tools/peek.py:"),
    (TOOL_HEAD.encode() + b"@tool\ndef peek(x: str) -> str:\n    return x\n", "defines no PERMISSIONS"),
    (b"PERMISSIONS = ['read']\ndef peek(x: str) -> str:\n    return x\n", "defines no tool named 'peek'"),
    (b"PERMISSIONS = ['read']\n", "defines no tool named 'peek'"),
    (b"PERMISSIONS = make()\npeek = 1\n", "tools/peek.py:1: PERMISSIONS must be a literal list"),
    (b"PERMISSIONS = {[1]}\npeek = 1\n", "tools/peek.py:1: PERMISSIONS must be a literal list"),
    (b"PERMISSIONS = [" + b"-" * 5000 + b"1]\npeek = 1\n", "tools/peek.py:"),
    (b"x = " + b"-" * 100_000 + b"1\n", "tools/peek.py:"),
    (b"PERMISSIONS = ['root']\npeek = 1\n", "tools/peek.py:1: PERMISSIONS must list some of read, write"),
    (b"PERMISSIONS = 'read'\npeek = 1\n", "PERMISSIONS must list some of"),
])
def test_broken_custom_tools(source: bytes, error: str) -> None:
    info = describe_module("peek", source)
    assert info.error is not None and error in info.error


def _tree(files: dict[str, str]) -> list[SpecFile]:
    out = []
    for rel, text in files.items():
        data = textwrap.dedent(text).encode()
        out.append(SpecFile(rel, blob_id(data), lambda data=data: data))
    return out


def test_validate_tree_custom_tool_errors_stay_with_their_users() -> None:
    files = _tree({
        "tools/broken.py": "PERMISSIONS = ['read'\n",
        "tools/fine.py": "PERMISSIONS = ['read']\nfine = object()\n",
        "a.yaml": "name: a\nmodel: m\ndescription: x\ntools:\n  - name: broken\n    paths: [/srv]\n",
        "b.yaml": "name: b\nmodel: m\ndescription: x\ntools:\n  - name: fine\n    paths: [/srv]\n",
        "c.yaml": "name: c\nmodel: m\ndescription: x\n",
    })
    results, _ = validate_tree(files, client_id="default", home="/h")
    by_path = {r.rel_path: r for r in results}
    assert sorted(by_path) == ["a.yaml", "b.yaml", "c.yaml"]
    assert not by_path["a.yaml"].valid
    assert by_path["b.yaml"].valid and by_path["c.yaml"].valid
    assert by_path["b.yaml"].spec is not None and by_path["b.yaml"].spec.tools[0].name == "fine"


def test_validate_tree_duplicate_names_invalidate_both() -> None:
    files = _tree({"a.yaml": "name: same\nmodel: m\n", "sub/b.yaml": "name: same\nmodel: m\n",
                   "c.yaml": "name: other\nmodel: m\n"})
    results, _ = validate_tree(files, client_id="default", home="/h")
    valid = {r.rel_path: r.valid for r in results}
    assert valid == {"a.yaml": False, "sub/b.yaml": False, "c.yaml": True}


def test_validate_tree_names_invalid_specs_when_it_can() -> None:
    files = _tree({"a.yaml": "name: known\nmodel: m\nzzz: 1\n", "b.yaml": "- not a mapping\n"})
    results, _ = validate_tree(files, client_id="default", home="/h")
    assert {r.rel_path: r.name for r in results} == {"a.yaml": "known", "b.yaml": None}
    assert all(not r.valid for r in results)


@pytest.mark.parametrize(("rel", "is_spec"), [
    ("a.yaml", True), ("a.yml", True), ("team/a.yaml", True), ("a.json", False), ("a.yaml.bak", False),
    ("_scripts/a.yaml", False), ("team/_drafts/a.yaml", False), ("_a.yaml", False), (".a.yaml", False),
    (".git/a.yaml", False), ("tools/a.yaml", False), ("team/tools/a.yaml", True),
])
def test_is_spec_path(rel: str, is_spec: bool) -> None:
    assert is_spec_path(rel) is is_spec


@pytest.mark.parametrize("amount", [".nan", ".inf", "1e999", "0", "-1", "2000000"])
def test_a_placement_resource_is_a_finite_amount_above_zero(tmp_path: Path, amount: str) -> None:
    """Found by the attack on the Ray executor: NaN and infinity passed, were stored as null, and the
    applied spec could no longer be read (the dispatcher died on it)."""
    write(tmp_path, "specs/a.yaml", f"""
        name: a
        model: llama2
        placement: {{resources: {{CPU: {amount}}}}}
        """)
    out = validate(str(tmp_path / "specs"), root=tmp_path)
    assert out.proc.returncode == 1, out.proc.stdout
    assert "resource 'CPU'" in out.proc.stdout and "placement" in out.proc.stdout, out.proc.stdout


def test_placement_by_rays_own_labels_is_refused(tmp_path: Path) -> None:
    """Ray labels every node with its id (ray.io/node-id): a spec may not pin itself to a node the
    operator did not label for it."""
    write(tmp_path, "specs/a.yaml", """
        name: a
        model: llama2
        placement: {labels: {"ray.io/node-id": "abc"}}
        """)
    out = validate(str(tmp_path / "specs"), root=tmp_path)
    assert out.proc.returncode == 1 and "ray.io/" in out.proc.stdout, out.proc.stdout


def test_a_placement_that_fits_is_valid(tmp_path: Path) -> None:
    write(tmp_path, "specs/a.yaml", """
        name: a
        model: llama2
        placement: {labels: {zone: lab}, resources: {CPU: 1, GPU: 0.5}}
        """)
    out = validate(str(tmp_path / "specs"), root=tmp_path)
    assert out.proc.returncode == 0, out.proc.stdout


@pytest.mark.parametrize("labels", ['{zone: "\\e]0;PWNED\\a[bold]x"}', '{"zo ne": a}', '{zone: "' + "v" * 64 + '"}',
                                    '{"RAY.IO/node-id": x}'])
def test_placement_labels_are_rays_label_syntax(tmp_path: Path, labels: str) -> None:
    """Ray round 2, F6: a label went to operators' terminals in the waiting reason, escape codes and markup
    included. Labels are Ray's syntax: letters, digits, '.', '_', '-' (and one '/' in a key)."""
    write(tmp_path, "specs/a.yaml", f"""
        name: a
        model: llama2
        placement: {{labels: {labels}}}
        """)
    out = validate(str(tmp_path / "specs"), root=tmp_path)
    assert out.proc.returncode == 1 and "label" in out.proc.stdout, out.proc.stdout


def test_a_remote_agent_may_not_be_sent_the_runners_own_secrets() -> None:
    problems = _check("""
        name: a
        model: m
        description: x
        constraints: {allowed_domains: [local]}
        tools:
          - {name: leak, remote_agent: "http://localhost:9/a", secret_env: OPENAI_API_KEY}
          - {name: leak2, remote_agent: "http://localhost:9/a", secret_env: AGENT_ORCH_WEBHOOK_SECRET}
          - {name: ok, remote_agent: "http://localhost:9/a", secret_env: PARTNER_TOKEN}
        """)
    assert [(p.field, p.severity) for p in problems] == [("tools[0].secret_env", "error"),
                                                         ("tools[1].secret_env", "error")]
    assert "AGENT_ORCH_REMOTE_SECRETS" in problems[0].message


def test_a_remote_agents_url_carries_no_credential() -> None:
    problems = _check("""
        name: a
        model: m
        description: x
        constraints: {allowed_domains: [local, partner.example.com]}
        tools:
          - {name: a1, remote_agent: "http://user:pw@localhost:9/a"}
          - {name: a2, remote_agent: "https://partner.example.com/a?token=abc"}
          - {name: a3, remote_agent: "https://partner.example.com/a#x"}
          - {name: a4, remote_agent: "http://partner.example．com/a"}
          - {name: ok, remote_agent: "https://partner.example.com/a"}
        """)
    assert [(p.field, p.severity) for p in problems] == [(f"tools[{i}].remote_agent", "error") for i in range(4)]
    assert "no user, password, query" in problems[0].message
