"""Every benchmark runs in its quick mode, so that none of them can rot."""

from __future__ import annotations

from benchmarks import compile as compile_bench


def test_compile_benchmark_quick(capsys) -> None:
    """benchmarks/compile.py --quick prints its table with a row per size."""
    rows = compile_bench.main(["--quick"])
    out = capsys.readouterr().out
    table_rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table_rows) == len(rows) + 1  # header and one row per size
    assert all(r["rules"] > 0 and r["total_s"] > 0 for r in rows)
