"""The project's own rules: layering, documented settings, example specs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT, agentctl

from runner.settings import setting_fields


def test_lower_layers_never_import_upper_ones() -> None:
    """The layers are import-linter contracts (pyproject.toml, docs/architecture.md); `make lint` checks them
    too, and this checks them for a bare `pytest`."""
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_layer_imported_after_the_first_connect_gets_its_tables_with_the_next(tmp_path: Path) -> None:
    """Each layer registers its own tables in the state database when it is imported (runner.state.register): a
    process that connected before importing one gets that layer's tables with its next connection."""
    code = ("import sys; from pathlib import Path; from runner.state import connect; import runner.ledger.schema\n"
            "connect(Path(sys.argv[1])).close()\n"
            "import runner.tokens\n"
            "conn = connect(Path(sys.argv[1]))\n"
            "print(sorted(r[0] for r in conn.execute(\"SELECT name FROM sqlite_master WHERE type = 'table'\")))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.sqlite")], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["journal", "run_progress", "sqlite_sequence", "tokens"])


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [env for env, *_ in setting_fields() if f"`{env}`" not in text]
    assert not missing, f"settings missing from docs/configuration.md (run `make schema`): {missing}"


def test_example_specs_validate() -> None:
    done = agentctl("validate", str(ROOT / "specs"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_and_ci_use_make_test() -> None:
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_no_module_is_too_long() -> None:
    long = [str(p) for p in Path(ROOT / "runner").rglob("*.py") if len(p.read_text().splitlines()) > 600]
    assert not long, f"modules over 600 lines: {long}"
