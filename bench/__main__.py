"""Run every benchmark (or those named: python -m bench plan)."""

from __future__ import annotations

import sys

from bench import plan

BENCHES = {"plan": plan.main}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        BENCHES[name]()


main()
