"""Every benchmark runs in its quick mode, so that none of them can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compile as compile_bench

ROOT = Path(__file__).resolve().parent.parent


def test_compile_benchmark_quick(capsys) -> None:
    """benchmarks/compile.py --quick prints its table with a row per size."""
    rows = compile_bench.main(["--quick"])
    out = capsys.readouterr().out
    table_rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table_rows) == len(rows) + 1  # header and one row per size
    assert all(r["rules"] > 0 and r["total_s"] > 0 for r in rows)


def run_quick(script: str) -> list[str]:
    """Run ``benchmarks/SCRIPT --quick``; return the data rows of the table it prints."""
    result = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| ")), len(lines))
    return [line for line in lines[header + 1 :] if line.startswith("| ")]


@pytest.mark.root
def test_programming_latency_benchmark_quick() -> None:
    """benchmarks/programming_latency.py --quick runs the daemon against the test API server and prints p50/p99."""
    rows = run_quick("programming_latency.py")
    assert len(rows) == 1 and rows[0].startswith("| 100 |"), rows


@pytest.mark.root
def test_datapath_benchmark_quick() -> None:
    """benchmarks/datapath.py --quick measures ClusterIP connection latency at both sizes and prints the table."""
    rows = run_quick("datapath.py")
    cluster_ip = [row for row in rows if "| ClusterIP 10.250.0.1:80 |" in row]
    assert [row.split(" | ")[0] for row in cluster_ip] == ["| 100", "| 1,000"], cluster_ip
    limited = [row.split(" | ") for row in rows if "| limited 10.250.0.2:80 (every limit) |" in row]
    assert [(row[0], row[3]) for row in limited] == [("| 100", "0"), ("| 1,000", "0")], limited


@pytest.mark.root
def test_scrape_benchmark_quick() -> None:
    """benchmarks/scrape.py --quick scrapes a daemon at 200 Services with each --service-metrics setting."""
    rows = run_quick("scrape.py")
    assert [row.split(" | ")[1] for row in rows] == ["none", "annotated", "all"], rows


@pytest.mark.root
@pytest.mark.parametrize("script", ["cold_start.py", "partial_sync.py"])
def test_kernel_benchmarks_quick(script: str) -> None:
    """The cold-start and partial-sync benchmarks run in quick mode and print their tables."""
    assert run_quick(script)


@pytest.mark.root
def test_read_back_benchmark_quick() -> None:
    """benchmarks/read_back.py --quick reads 200 Services' tables both ways (they agree) and restarts over them."""
    rows = [row for row in run_quick("read_back.py") if not row.startswith("| Services")]
    assert [row.split(" | ")[0] for row in rows] == ["| 200", "| 200"], rows  # reading back, then the restart
