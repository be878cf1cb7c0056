"""``python -m jobs.bench NAME [args]``: benchmarks that compare us against an anchor in the same run.

Each benchmark is a module ``jobs/benchmarks/NAME.py`` with ``main(argv) -> int``; it prints the device, the timings and
the ratio against its anchor.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import jobs.benchmarks as benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m jobs.bench {{{','.join(names)}}} [args]  (each takes --help)")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"jobs.benchmarks.{name}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
