"""Run every benchmark in turn (``./dev bench``); pass --quick for small sizes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import compile as compile_bench  # noqa: E402
from benchmarks import programming_latency  # noqa: E402

BENCHMARKS = [("compile", compile_bench.main), ("network programming latency", programming_latency.main)]


def main() -> None:
    quick = ["--quick"] if "--quick" in sys.argv[1:] else []
    for name, run in BENCHMARKS:
        print(f"\n## {name}\n")
        run(quick)


if __name__ == "__main__":
    main()
