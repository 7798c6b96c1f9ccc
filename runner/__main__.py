"""The entry point, `agentctl` and `python -m runner`: the CLI, handed the REST API it serves.

The CLI and the API are siblings that never import each other (the layers in pyproject.toml); this
module, above both, puts them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.cli import main as cli

if TYPE_CHECKING:
    from runner.supervise.metrics import Metrics
    from runner.supervise.runtime import Runtime


def main() -> None:
    cli.main(app_factory=create_app)


def create_app(runtimes: dict[str, Runtime], metrics: Metrics) -> Any:
    """The API's WSGI app, for `agentctl serve`; imported only when a daemon starts its API, not for every
    command."""
    from runner.api.app import create_app

    return create_app(runtimes, metrics)


if __name__ == "__main__":
    main()
