"""The API takes input the way users type it, and a write keeps the user's file as it was.

A real `agentctl serve` on a free port, a real spec repository, plain HTTP. Bad query parameters are a 400
naming the parameter; body fields an operation does not take are a 422 naming the field, with a
did-you-mean, and nothing happens. A PUT of an edited agent changes that field's line and nothing else of
a commented file; bodies may be YAML. Every wait is a bounded poll.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from api_helpers import Reply, Served, blob, git, head, poll, scripted, serve, write_files

YAML = {"Content-Type": "application/yaml"}

# 27 lines: the schema header, comments of every kind, quotes of both kinds, a flow list, a block text,
# blank lines between sections, and fields left to their defaults (enabled, memory, max_model_calls).
REPORTER = """\
# yaml-language-server: $schema=../schemas/agent-spec.schema.json
# The nightly report: reads the inbox, writes a summary.
name: reporter
description: "Summarises the inbox every night"
instructions: |
  Read every file in the inbox.
  Write one paragraph per file.
model: llama2   # the local default

tools:
  - name: file_reader
    paths: ["{data}/inbox"]   # only the inbox
  - name: file_writer
    paths:
      - {data}/reports

# Runs at 03:00 in Paris, catching up after downtime.
triggers:
  - type: schedule
    cron: "0 3 * * *"
    timezone: Europe/Paris

constraints:
  max_tokens: 8000     # about one small report
  max_runtime: 600
  allowed_domains: ['local']
overlap: queue
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("input")
    data = base / "data"
    (data / "inbox").mkdir(parents=True)
    (data / "reports").mkdir()
    files: dict[str, Any] = {**scripted("quick", [{"content": "done"}], overlap="queue"),
                             "specs/reporter.yaml": REPORTER.format(data=data)}
    served = serve(base, files)
    try:
        yield served
    finally:
        served.stop()


def reporter_text(api: Served) -> str:
    return REPORTER.format(data=api.source.parent / "data")


def file_at_head(api: Served, name: str) -> str:
    return git(api.source, "show", f"refs/heads/main:specs/{name}.yaml") + "\n"  # (git() strips the last newline)


def applied(api: Served, name: str, etag: str) -> dict[str, Any]:
    """GET /agents/NAME once the reconcile has applied the blob ``etag``."""
    def ready() -> dict[str, Any] | None:
        reply = api.api("GET", f"/agents/{name}", role="viewer")
        return reply.json if reply.status == 200 and reply.json["etag"] == etag else None

    found: dict[str, Any] = poll(ready, f"{name} at {etag[:12]} to be applied")
    return found


def runs_of(api: Served, agent: str) -> list[str]:
    reply = api.api("GET", f"/runs?agent={agent}", role="viewer")
    assert reply.status == 200, reply.body
    return [r["run_id"] for r in reply.json["runs"]]


def refused(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    error = reply.error()
    assert error["code"] == code, error
    return error


# -- query parameters: 400 naming the parameter ----------------------------------------------------------


def test_a_bad_query_parameter_is_a_400_that_names_it(api: Served) -> None:
    for query, param in (("since=yesterday", "since"), ("cursor=zzz", "cursor"), ("since=2025-13-45", "since"),
                         ("agent=Not%20A%20Name", "agent"), ("status=succeded", "status")):
        error = refused(api.api("GET", f"/runs?{query}", role="viewer"), 400, "bad_param")
        assert error["details"] == [param] and f"'{param}'" in error["message"], (query, error)
    assert "did you mean 'succeeded'" in api.api("GET", "/runs?status=succeded", role="viewer").error()["message"]

    typo = refused(api.api("GET", "/runs?stauts=failed", role="viewer"), 400, "unknown_parameter")
    assert typo["details"] == ["stauts"] and "did you mean 'status'" in typo["message"], typo
    assert refused(api.api("GET", "/agents?cursor=ZZ!", role="viewer"), 400, "bad_param")["details"] == ["cursor"]
    assert refused(api.api("GET", "/agents?limt=5", role="viewer"), 400, "unknown_parameter")["details"] == ["limt"]
    assert refused(api.api("GET", "/agents/quick/logs?run=zzz", role="viewer"), 400, "bad_param")["details"] == ["run"]
    assert refused(api.api("GET", "/agents/quick?verbose=1", role="viewer"), 400, "unknown_parameter")

    for good in ("since=2025-01-31", "since=2025-01-31T08:00:00Z", "since=2025-01-31T10:00:00%2B02:00",
                 "since=12h", "since=7d", "cursor=ffffffffffffffffffffffff", "status=succeeded&agent=quick"):
        reply = api.api("GET", f"/runs?{good}", role="viewer")
        assert reply.status == 200, (good, reply.body)


def test_since_takes_a_time_or_an_age(api: Served) -> None:
    run_id = api.api("POST", "/agents/quick/runs", role="operator", body={"input": "dated"}).json["run_id"]
    row = api.wait_run(run_id)
    assert run_id in [r["run_id"] for r in api.api("GET", "/runs?agent=quick&since=1h", role="viewer").json["runs"]]
    started = row["started_at"][:19]  # to the second, as a person types it; with a zone it is the same instant
    assert run_id in [r["run_id"] for r in api.api("GET", f"/runs?agent=quick&since={started}Z",
                                                   role="viewer").json["runs"]]
    assert api.api("GET", "/runs?agent=quick&since=2999-01-01", role="viewer").json["runs"] == []


# -- body fields: 422 naming the field, and nothing done ---------------------------------------------------


def test_an_unknown_body_field_is_a_422_with_a_did_you_mean_and_nothing_runs(api: Served) -> None:
    before = runs_of(api, "quick")
    error = refused(api.api("POST", "/agents/quick/runs", role="operator", body={"inptu": "x"}), 422, "unknown_field")
    assert error["details"] == [{"field": "inptu", "message": "unknown field; did you mean 'input'?"}], error
    assert "'inptu'" in error["message"] and "did you mean 'input'" in error["message"]
    both = refused(api.api("POST", "/agents/quick/runs", role="operator", body={"input": "x", "priority": 1,
                                                                                "inptus": 2}), 422, "unknown_field")
    assert [d["field"] for d in both["details"]] == ["priority", "inptus"]

    for op in ("start", "stop"):
        error = refused(api.api("POST", f"/agents/quick/{op}", role="operator", body={"now": True}), 422,
                        "unknown_field")
        assert error["details"][0]["field"] == "now" and "takes no fields" in error["message"]
    assert api.api("GET", "/agents/quick", role="viewer").json["suspended"] is False, "a refused stop stopped it"
    assert runs_of(api, "quick") == before, "a refused request started a run"


def test_the_wrapped_spec_takes_what_get_shows_and_nothing_else(api: Served) -> None:
    before = head(api.source)
    spec = {"name": "wrapped", "description": "made wrapped", "model": "llama2"}
    error = refused(api.api("POST", "/agents", role="admin", body={"spec": spec, "extra": 1}), 422, "unknown_field")
    assert error["details"][0]["field"] == "extra"
    shown = api.api("GET", "/agents/quick", role="viewer")
    error = refused(api.api("PUT", "/agents/quick", role="admin", body={**shown.json, "etagg": "x"},
                            headers={"If-Match": shown.json["etag"]}), 422, "unknown_field")
    assert "did you mean 'etag'" in error["message"]
    assert head(api.source) == before and blob(api.source, "specs/wrapped.yaml") is None


# -- a PUT keeps the file --------------------------------------------------------------------------------


def test_get_edit_put_changes_the_edited_line_and_nothing_else(api: Served) -> None:
    original = reporter_text(api)
    assert len(original.splitlines()) == 27
    shown = applied(api, "reporter", blob(api.source, "specs/reporter.yaml") or "")
    spec = shown["spec"]
    assert spec["enabled"] is True and spec["constraints"]["max_model_calls"] == 25  # defaults, shown by GET

    spec["constraints"]["max_tokens"] = 4000
    reply = api.api("PUT", "/agents/reporter", role="admin", body=spec, headers={"If-Match": shown["etag"]})
    assert reply.status == 200, reply.body
    expected = original.replace("max_tokens: 8000", "max_tokens: 4000")
    assert file_at_head(api, "reporter") == expected
    assert git(api.source, "diff", "--numstat", f"{reply.json['commit']}^", reply.json["commit"]) == \
        "1\t1\tspecs/reporter.yaml"

    # The whole GET answer, edited and sent back, is a PUT too; an unchanged field stays as it was written
    # (`${...}`-free paths, the flow list, the quotes), a changed one is written in the file's style.
    shown = applied(api, "reporter", reply.json["etag"])
    shown["spec"]["description"] = "Summarises the inbox every morning"
    shown["spec"]["tools"][1]["paths"].append(str(api.source.parent / "data" / "archive"))
    reply = api.api("PUT", "/agents/reporter", role="admin", body=shown, headers={"If-Match": shown["etag"]})
    assert reply.status == 200, reply.body
    expected = expected.replace("every night", "every morning").replace(
        "/reports\n", f"/reports\n      - {api.source.parent / 'data' / 'archive'}\n")
    assert file_at_head(api, "reporter") == expected

    # Removing the first tool removes its lines, not the last tool's.
    shown = applied(api, "reporter", reply.json["etag"])
    del shown["spec"]["tools"][0]
    reply = api.api("PUT", "/agents/reporter", role="admin", body=shown["spec"], headers={"If-Match": shown["etag"]})
    assert reply.status == 200, reply.body
    first_tool = f'  - name: file_reader\n    paths: ["{api.source.parent / "data"}/inbox"]   # only the inbox\n'
    assert first_tool in expected
    assert file_at_head(api, "reporter") == expected.replace(first_tool, "")


def test_yaml_bodies_and_the_file_as_yaml(api: Served) -> None:
    # GET with Accept: application/yaml is the file, byte for byte; PUT it back edited, as YAML.
    etag = blob(api.source, "specs/reporter.yaml") or ""
    applied(api, "reporter", etag)
    got = api.api("GET", "/agents/reporter", role="viewer", headers={"Accept": "application/yaml"})
    assert got.status == 200 and got.headers["Content-Type"].startswith("application/yaml")
    assert got.text == file_at_head(api, "reporter") and got.headers["ETag"].strip('"') == etag
    edited = got.text.replace("max_runtime: 600", "max_runtime: 900")
    assert edited != got.text
    reply = api.api("PUT", "/agents/reporter", role="admin", data=edited.encode(),
                    headers={**YAML, "If-Match": etag})
    assert reply.status == 200, reply.body
    assert file_at_head(api, "reporter") == edited

    # A new agent sent as YAML lands as it was sent, comments and all.
    text = "# made from YAML\nname: yamled   # its name\nmodel: llama2\ndescription: 'sent as YAML'\n"
    reply = api.api("POST", "/agents", role="admin", data=text.encode(), headers=YAML)
    assert reply.status == 201, reply.body
    assert file_at_head(api, "yamled") == text

    # Bad YAML: a 400 with the line; nothing committed.
    before = head(api.source)
    error = refused(api.api("POST", "/agents", role="admin", data=b"name: broken\nmodel: [llama2\n", headers=YAML),
                    400, "bad_yaml")
    assert "line 3" in error["message"] and error["details"][0]["line"] == 3, error
    dupe = refused(api.api("POST", "/agents", role="admin", data=b"name: a\nname: b\nmodel: x\n", headers=YAML),
                   400, "bad_yaml")
    assert "line 2" in dupe["message"] and "duplicate key" in dupe["message"]
    assert refused(api.api("POST", "/agents", role="admin", data=b"- a list\n", headers=YAML), 400, "bad_yaml")
    assert refused(api.api("POST", "/agents", role="admin", data=b"name: x\nmodel: y\nz: " + b"q" * (1 << 20),
                           headers=YAML), 413, "too_large")
    assert head(api.source) == before

    # A run's input as YAML; its fields are checked as JSON's are.
    reply = api.api("POST", "/agents/quick/runs", role="operator", data=b"input: |\n  two\n  lines\n",
                    headers={"Content-Type": "application/x-yaml; charset=utf-8"})
    assert reply.status == 202, reply.body
    assert api.wait_run(reply.json["run_id"])["input"] == "two\nlines\n"
    assert refused(api.api("POST", "/agents/quick/runs", role="operator", data=b"inptu: x\n", headers=YAML),
                   422, "unknown_field")


def test_a_put_of_a_file_edited_by_hand_meanwhile_is_a_409(api: Served) -> None:
    etag = blob(api.source, "specs/reporter.yaml") or ""
    shown = applied(api, "reporter", etag)
    git(api.source, "reset", "-q", "--hard")  # the API moves the branch without a work tree
    write_files(api.source, {"specs/reporter.yaml": file_at_head(api, "reporter").replace("queue", "replace")})
    git(api.source, "commit", "-qam", "by hand")
    shown["spec"]["enabled"] = False
    reply = api.api("PUT", "/agents/reporter", role="admin", body=shown["spec"], headers={"If-Match": etag})
    assert refused(reply, 409, "conflict")
    assert "overlap: replace" in file_at_head(api, "reporter")
