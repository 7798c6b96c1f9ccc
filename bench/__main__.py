"""Run every benchmark, or those named: python -m bench plan memory overhead.

A benchmark's own options follow its name: python -m bench soak --minutes 12. The soak is left out of
a plain `python -m bench` (it runs for minutes); name it to run it.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = ["plan", "memory", "overhead", "daemon", "runmem", "api", "sandbox", "rearm", "ray", "workflows", "events",
           "ui"]
BY_NAME = [*BENCHES, "soak"]


def main() -> None:
    args = sys.argv[1:]
    if not args:
        for name in BENCHES:
            importlib.import_module(f"bench.{name}").main()
        return
    while args:
        name, args = args[0], args[1:]
        if name not in BY_NAME:
            sys.exit(f"no benchmark named {name!r}: choose from {', '.join(BY_NAME)}")
        own = []
        while args and args[0].startswith("-"):
            own.append(args.pop(0))
            if args and not args[0].startswith("-") and args[0] not in BY_NAME:
                own.append(args.pop(0))
        sys.argv = [f"bench {name}", *own]
        importlib.import_module(f"bench.{name}").main()


main()
