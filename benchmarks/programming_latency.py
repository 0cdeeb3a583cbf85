"""Network programming latency through the daemon and the test API server.

    .venv/bin/python benchmarks/programming_latency.py [--quick]

For each size, in a fresh network namespace: the test API server holds N
Services x 10 endpoints, the daemon (in-process, the real watchers, sync loop
and libnftables backend) programs them, and then a steady churn changes one
EndpointSlice every 50 ms, stamping ``endpoints.kubernetes.io/last-change-trigger-time``
as the API server does. The latency is upstream's SLI: from that trigger time
to the moment the sync carrying the change was committed by the kernel.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL_SIZES = [1_000, 10_000]
QUICK_SIZES = [100]


def _inside_netns(argv: list[str]) -> int:
    """Re-run this script in a fresh network namespace, then delete it."""
    name = f"kpt-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        env = dict(os.environ, KPROXY_BENCH_NETNS=name)
        result = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, *argv], env=env,
                                stdout=subprocess.PIPE, text=True)
        sys.stdout.write(result.stdout)  # through this process's stdout, so callers can capture it
        return result.returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def measure(services: int, changes: int, interval: float) -> dict[str, float]:
    from kubernetes import client

    from benchmarks.synthetic import (
        NODE_NAME,
        node_manifest,
        service_manifest,
        slice_manifest,
    )
    from kproxy.daemon.config import DaemonConfig
    from kproxy.daemon.proxier import NullObserver
    from kproxy.daemon.run import Daemon
    from tests.harness.fakeapi import FakeKubeAPI, client_config

    latencies: list[float] = []
    done = threading.Condition()

    class Recorder(NullObserver):
        def programming_latency(self, seconds: float) -> None:
            with done:
                latencies.append(seconds)
                done.notify_all()

    api = FakeKubeAPI(bookmark_interval=5).start()
    api.create(node_manifest())
    for i in range(services):
        api.create(service_manifest(i))
        api.create(slice_manifest(i, 10))
    config = DaemonConfig(node_name=NODE_NAME, cluster_cidrs=("10.128.0.0/9",), min_sync_period=0.0)
    daemon = Daemon(config, client.ApiClient(client_config(api)), observer=Recorder())
    t0 = time.perf_counter()
    daemon.start()
    with daemon.proxier.lock:
        daemon.proxier.changed.wait_for(lambda: daemon.proxier.sync_count > 0, timeout=600)
    cold = time.perf_counter() - t0
    rng = random.Random(1)
    try:
        for n in range(changes):
            i = rng.randrange(services)
            eps = slice_manifest(i, 10, generation=n + 1)
            stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            eps["metadata"]["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": stamp}
            api.update(eps)
            time.sleep(interval)  # the churn's pace, not synchronisation
        with done:
            done.wait_for(lambda: len(latencies) >= changes, timeout=60)
    finally:
        daemon.stop()
        api.stop()
    ordered = sorted(latencies)
    return {
        "services": services,
        "cold_start_s": cold,
        "changes": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 Services, 30 changes (the test suite runs this)")
    args = parser.parse_args(argv)
    if "KPROXY_BENCH_NETNS" not in os.environ:
        code = _inside_netns(argv)
        if code:
            raise SystemExit(code)
        return []
    rows = [measure(s, 30 if args.quick else 200, 0.05) for s in (QUICK_SIZES if args.quick else FULL_SIZES)]
    print("| Services x 10 endpoints | daemon cold start s | changes | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} | {r['cold_start_s']:.2f} | {r['changes']} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['max_ms']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
