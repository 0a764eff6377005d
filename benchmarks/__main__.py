"""Run the benchmarks: `python -m benchmarks [NAME ...]` (default: all `bench_*` modules).

Each module has `main(argv: list[str]) -> int` and prints its figures as side-by-side
ratios measured in the same run; results are recorded by hand in docs/BENCHMARKS.md with
the date, the machine and the command.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    available = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    chosen = argv or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    machine = platform.processor() or platform.machine()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()} ({machine})")
    failed = 0
    for name in chosen:
        print(f"\n## {name}", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rc = int(module.main([]) or 0)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
