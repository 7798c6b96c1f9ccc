"""The dashboard in a real browser: Debian's headless Chromium (selenium, chromium-driver) against a real daemon
with scripted agents. Every wait is a bounded poll of the page; nothing sleeps for a fixed time.

`make screenshots` runs this file's ``test_screenshots_of_each_page_at_both_widths`` with SCREENSHOTS=1: the
PNGs of each page at 1280 and 390 pixels go to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Served, make_repo, poll, scripted
from browser_helpers import browser

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (1280, 390)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("ui-browser")
    files: dict[str, Any] = {
        **scripted("echo", [{"content": "the answer is ${INPUT}", "usage": {"input_tokens": 12, "output_tokens": 3}}],
                   overlap="queue"),
        **scripted("slow", [{"sleep": 3, "content": "slowly done"}], overlap="queue"),
        "specs/pipeline.yaml": {"kind": "workflow", "name": "pipeline", "description": "a workflow with a gate",
                                "steps": [{"id": "first", "agent": "echo", "input": "first"},
                                          {"id": "gate", "needs": ["first"], "approval": {"timeout": 3600}},
                                          {"id": "last", "needs": ["gate"], "agent": "echo", "input": "last"}]},
    }
    repo = make_repo(base / "repo", files)
    home = base / "home"
    home.mkdir()
    served = Served(home, repo, base / "daemon.log").start()
    try:
        served.tokens = {role: served.token(role, f"{role}-ui") for role in ("viewer", "operator")}
        yield served
    finally:
        served.stop()


def wait(driver: Any, what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    return poll(check, what, timeout, every=0.1)


def transcript(driver: Any) -> tuple[str, str] | None:
    """The transcript's status and text, read in one step in the page: htmx swaps the element while the run goes
    on, so a handle to it can go stale between two reads."""
    found = driver.execute_script("const e = document.getElementById('transcript');"
                                  "return e ? [e.dataset.status || '', e.innerText] : null")
    return (str(found[0]), str(found[1])) if found else None


def log_in(driver: Any, served: Served, role: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{served.port}/ui/login")
    driver.find_element(By.ID, "token").send_keys(served.tokens[role])
    driver.find_element(By.ID, "login-button").click()
    wait(driver, "the agents page after logging in", lambda: driver.find_elements(By.CSS_SELECTOR, "tr.agent-row"))


def test_an_operator_logs_in_sees_the_agents_and_watches_a_run_fill_in(served: Served) -> None:
    from selenium.webdriver.common.by import By

    with browser() as driver:
        log_in(driver, served, "operator")
        rows = {r.get_attribute("data-agent"): r.get_attribute("data-state")
                for r in driver.find_elements(By.CSS_SELECTOR, "tr.agent-row")}
        assert rows.get("echo") == "Ready" and "slow" in rows, rows
        driver.get(f"http://127.0.0.1:{served.port}/ui/agents/slow")
        driver.find_element(By.ID, "run-input").send_keys("watch me")
        driver.find_element(By.ID, "run-agent-button").click()
        status, text = wait(driver, "the run's page", lambda: transcript(driver))
        assert "watch me" in text  # the input, at once
        # Live: the page shows the run in flight, polls its transcript, and fills in the answer once it ended.
        assert status in ("queued", "running") and "slowly done" not in text, (status, text)
        status, text = wait(driver, "the run to end on the page", lambda: (found := transcript(driver)) and
                            found[0] == "succeeded" and found, timeout=60)
        assert "slowly done" in text
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors  # no script blocked by the CSP, no asset missing


def test_an_operator_approves_a_waiting_step_in_the_browser(served: Served) -> None:
    from selenium.webdriver.common.by import By

    started = served.api("POST", "/workflows/pipeline/runs", role="operator")
    assert started.status == 202, started.body
    wf_id = started.json["workflow_run_id"]
    with browser() as driver:
        log_in(driver, served, "operator")

        def waiting_form() -> Any:
            driver.get(f"http://127.0.0.1:{served.port}/ui/approvals")
            return [f for f in driver.find_elements(By.CSS_SELECTOR, ".approve-form")
                    if f.get_attribute("data-workflow-run-id") == wf_id]

        (form,) = wait(driver, "the step to wait for its approval", waiting_form)
        form.find_element(By.NAME, "comment").send_keys("looks right")
        form.find_element(By.CSS_SELECTOR, "button[data-action=approve]").click()
        # The click submits the form and the browser follows the answer's redirect: wait for that page (a new
        # navigation now would abort the POST), where the step waits no more.
        wait(driver, "the approval to be posted", lambda: not driver.execute_script(
            "return document.querySelector('.approve-form[data-workflow-run-id=\"' + arguments[0] + '\"]')", wf_id))
        driver.get(f"http://127.0.0.1:{served.port}/ui/workflow-runs/{wf_id}")
        wait(driver, "the workflow run to succeed on its page", lambda: ["last", "succeeded"] in driver.execute_script(
            "return Array.from(document.querySelectorAll('#dag g[data-step]'))"
            ".map(g => [g.dataset.step, g.dataset.status])"))  # read in one step: htmx swaps the DAG as it goes
    approvals = served.api("GET", f"/workflow-runs/{wf_id}", role="viewer").json["approvals"]
    assert approvals and approvals[0]["by"] == "ui:operator-ui" and approvals[0]["comment"] == "looks right"


def test_a_viewer_sees_no_buttons_and_a_forged_post_is_refused(served: Served) -> None:
    from selenium.webdriver.common.by import By

    with browser() as driver:
        log_in(driver, served, "viewer")
        for path in ("/ui/agents/echo", "/ui/workflows", "/ui/approvals"):
            driver.get(f"http://127.0.0.1:{served.port}{path}")
            assert not driver.find_elements(By.CSS_SELECTOR, "button[data-action]"), path
        # A POST from this session's page, without the CSRF token (a forged form): refused, nothing runs.
        before = served.api("GET", "/runs?agent=echo", role="viewer").json["runs"]
        status = driver.execute_script(
            "return fetch('/ui/agents/echo/run', {method: 'POST', credentials: 'same-origin', headers: "
            "{'Content-Type': 'application/x-www-form-urlencoded'}, body: 'input=forged'}).then(r => r.status)")
        assert status == 403
    log_in_as_operator_forged = served.api("GET", "/runs?agent=echo", role="viewer").json["runs"]
    assert len(log_in_as_operator_forged) == len(before)


def test_screenshots_of_each_page_at_both_widths(served: Served) -> None:
    """Each page at 1280 and 390 pixels: it fits (no page-wide horizontal scroll) and can be reached by the
    keyboard (its first link takes the focus). With SCREENSHOTS=1 (`make screenshots`) the PNGs are saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run = served.api("POST", "/agents/echo/runs", role="operator", body={"input": "for the pictures"}).json
    served.wait_run(run["run_id"])
    wf = served.api("POST", "/workflows/pipeline/runs", role="operator").json["workflow_run_id"]
    poll(lambda: served.api("GET", f"/workflow-runs/{wf}", role="viewer").json["status"] in ("running", "waiting")
         and any(s["status"] == "waiting" for s in served.api("GET", f"/workflow-runs/{wf}", role="viewer")
                 .json["steps"]), "the workflow to wait for its approval", 30)
    pages = {"agents": "/ui/", "agent": "/ui/agents/echo", "runs": "/ui/runs", "run": f"/ui/runs/{run['run_id']}",
             "workflows": "/ui/workflows", "workflow-run": f"/ui/workflow-runs/{wf}", "approvals": "/ui/approvals",
             "activity": "/ui/activity", "health": "/ui/health"}
    out = ROOT / "docs" / "screenshots"
    save = os.environ.get("SCREENSHOTS") == "1"
    for width in WIDTHS:
        with browser(width, 900) as driver:
            log_in(driver, served, "operator")
            for name, path in pages.items():
                driver.get(f"http://127.0.0.1:{served.port}{path}")
                wide = driver.execute_script("return document.documentElement.scrollWidth")
                assert wide <= width + 1, f"{path} at {width}px is {wide}px wide"
                if save:
                    out.mkdir(parents=True, exist_ok=True)
                    height = driver.execute_script("return document.documentElement.scrollHeight")
                    size = {"width": width, "height": min(max(height, 600), 4000), "deviceScaleFactor": 1,
                            "mobile": width < 500}
                    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
                    driver.save_screenshot(str(out / f"{name}-{width}.png"))
                    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**size, "height": 900})
                driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
                focused = driver.switch_to.active_element
                assert focused.tag_name in ("a", "button", "input", "select", "textarea"), (path, focused.tag_name)
    if save:
        print(json.dumps(sorted(p.name for p in out.glob("*.png"))))
