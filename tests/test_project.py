"""The project's own rules: layering, documented settings, example specs."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT, agentctl

from runner.settings import setting_fields

LAYERS = {
    "errors": 0, "settings": 0, "state": 0,
    "specs": 1, "source": 2, "ledger": 2, "reconcile": 3, "agent": 4, "sandbox": 4,
    "supervise": 5, "api": 6, "cli": 6,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "runner" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def test_lower_layers_never_import_upper_ones() -> None:
    bad = []
    for path in (ROOT / "runner").rglob("*.py"):
        module = "runner." + ".".join(path.relative_to(ROOT / "runner").with_suffix("").parts)
        own = _layer(module)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                target = _layer(name)
                if target is not None and target > own:
                    bad.append(f"{module} (layer {own}) imports {name} (layer {target})")
    assert not bad, "\n".join(bad)


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
