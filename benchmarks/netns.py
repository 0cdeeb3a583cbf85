"""Run a benchmark step in a fresh network namespace, in its own process.

Each scenario gets an empty kernel ruleset and its own process, so timings do
not include earlier scenarios' state and peak RSS is the scenario's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_in_netns(script: str, *args: str, timeout: float = 3600) -> dict[str, Any]:
    """``python SCRIPT ARGS`` inside a new network namespace; its last stdout line is JSON."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        result = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, str(ROOT / "benchmarks" / script), *args],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def timed_nft_load(path: str, timeout: float = 3600) -> dict[str, float]:
    """``nft -f PATH`` in a fresh network namespace: wall seconds and the nft process's peak RSS."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "ip", "netns", "exec", name, "nft", "-f", path],
            capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"nft -f {path} failed: {result.stderr[-2000:]}")
        seconds, kb = result.stderr.strip().splitlines()[-1].split()
        return {"seconds": float(seconds), "rss_mb": int(kb) / 1024}
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def versions() -> dict[str, str]:
    """Machine, kernel and nft versions, for the results' header."""
    import os
    import platform

    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": f"{os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
        "cpu": cpu_model(),
        "speed": f"{python_speed():.2f} s",
        "kernel": platform.release(),
        "nft": nft,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def python_speed(steps: int = 10_000_000, runs: int = 3) -> float:
    """Seconds for a fixed pure-Python loop, the best of ``runs``: how fast this machine runs the interpreter.

    Development VMs differ by up to 2x from one session to the next, and
    kproxy's cold starts are Python-bound, so the tables carry this figure:
    compare runs on machines whose figures agree, or scale by it.
    """
    import time

    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        total = 0
        for i in range(steps):
            total += i
        best = min(best, time.perf_counter() - start)
    return best
