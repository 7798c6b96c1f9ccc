"""Run every benchmark, or those named: python -m bench plan memory overhead."""

from __future__ import annotations

import sys

from bench import api, daemon, memory, overhead, plan, rearm, sandbox

BENCHES = {"plan": plan.main, "memory": memory.main, "overhead": overhead.main, "daemon": daemon.main,
           "api": api.main, "sandbox": sandbox.main, "rearm": rearm.main}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        BENCHES[name]()


main()
