"""Partial syncs in a loaded table: one change at a time, through the daemon's core.

    .venv/bin/python benchmarks/partial_sync.py [--quick]

For each size, in a fresh network namespace, the Proxier programs N Services
x 10 endpoints, then measures one sync (compile, plan, libnftables, kernel)
for each kind of change, repeated at least 50 times:

* one endpoint added or removed (alternately) in one Service;
* a Service's last endpoint removed, then its first one added back (0 <-> 1);
* one Service (with its slice) added;
* one Service removed;
* 100 endpoint changes (in 100 Services) batched into one sync.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_SIZES = [10_000, 30_000]
QUICK_SIZES = [300]
KINDS = ["endpoint", "last endpoint", "first endpoint", "service added", "service removed", "100 endpoints"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def scenario(services: int, repetitions: int) -> dict[str, object]:
    from benchmarks.synthetic import (
        NODE_NAME,
        cluster_objects,
        service_manifest,
        slice_manifest,
    )
    from kproxy.daemon.proxier import Proxier
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig

    objects = cluster_objects(services, 10)
    proxier = Proxier(NftablesBackend(), NODE_NAME, ProxyConfig(cluster_cidrs=("10.128.0.0/9",)))
    proxier.on_relist("Node", [o for o in objects if o["kind"] == "Node"])
    proxier.on_relist("Service", [o for o in objects if o["kind"] == "Service"])
    proxier.on_relist("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
    del objects
    proxier.sync()
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ops: dict[str, list[int]] = {kind: [] for kind in KINDS}

    def timed(kind: str) -> None:
        t = time.perf_counter()
        result = proxier.sync()
        times[kind].append(time.perf_counter() - t)
        ops[kind].append(result.operations)
        assert not result.full

    for n in range(repetitions):
        i = (n * 7919) % services
        proxier.on_slice("MODIFIED", slice_manifest(i, 10 + (1 if n % 2 == 0 else -1)))
        timed("endpoint")
        proxier.on_slice("MODIFIED", slice_manifest(i, 10))
        proxier.sync()

        proxier.on_slice("MODIFIED", slice_manifest(i, 1))
        proxier.sync()
        proxier.on_slice("MODIFIED", slice_manifest(i, 0))
        timed("last endpoint")
        proxier.on_slice("MODIFIED", slice_manifest(i, 1))
        timed("first endpoint")
        proxier.on_slice("MODIFIED", slice_manifest(i, 10))
        proxier.sync()

        new = services + n
        proxier.on_service("ADDED", service_manifest(new))
        proxier.on_slice("ADDED", slice_manifest(new, 10))
        timed("service added")
        proxier.on_service("DELETED", service_manifest(new))
        proxier.on_slice("DELETED", slice_manifest(new, 10))
        timed("service removed")

        for j in range(100):
            proxier.on_slice("MODIFIED", slice_manifest((i + 97 * j) % services, 11))
        timed("100 endpoints")
        for j in range(100):
            proxier.on_slice("MODIFIED", slice_manifest((i + 97 * j) % services, 10))
        proxier.sync()
    return {
        "services": services,
        "repetitions": repetitions,
        **{f"{kind}|p50_ms": statistics.median(v) * 1000 for kind, v in times.items()},
        **{f"{kind}|p99_ms": _percentile(v, 0.99) * 1000 for kind, v in times.items()},
        **{f"{kind}|ops": statistics.median(v) for kind, v in ops.items()},
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 Services, 10 repetitions (the test suite runs this)")
    parser.add_argument("--scenario", nargs=2, type=int, metavar=("SERVICES", "REPETITIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario:
        print(json.dumps(scenario(*args.scenario)))
        return []
    from benchmarks.netns import run_in_netns

    rows = [run_in_netns("partial_sync.py", "--scenario", str(size), "10" if args.quick else "50")
            for size in (QUICK_SIZES if args.quick else FULL_SIZES)]
    print("| Services x 10 endpoints | change | operations | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        for kind in KINDS:
            print(f"| {r['services']:,} | {kind} | {r[f'{kind}|ops']:.0f} | {r[f'{kind}|p50_ms']:.1f} | "
                  f"{r[f'{kind}|p99_ms']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
