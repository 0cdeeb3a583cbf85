"""Reading kproxy's tables back from the kernel: netlink dumps against libnftables' JSON.

    .venv/bin/python benchmarks/read_back.py [--quick] [--sizes N ...] [--repeats R]

``Backend.read()`` runs at every daemon start on a node that has tables,
at every full resync and at every drift repair. For each size, in a fresh
network namespace (deleted afterwards), the daemon's core (the Proxier,
``benchmarks/synthetic.py``'s N Services x 10 endpoints) programs the
tables; then each way of reading them runs in a fresh process, ``--repeats``
times, alternating:

* netlink: ``NftablesBackend.read()`` (``kproxy.nft.dump``: one dump per
  kind of object and per set, parsed as it comes);
* JSON: ``NftablesBackend.read_json()`` (``nft -j list table`` through
  libnftables, parsed by ``kproxy.nft.readback``): what ``read()`` did before,
  and its fallback.

Each process reports the wall time of the read, its peak RSS (``VmHWM``:
the interpreter and kproxy's modules included) and its peak RSS growth
(``VmHWM`` after the read minus ``VmRSS`` before it, the peak being reset
through ``/proc/self/clear_refs`` first); the median of the repeats is
printed. The two Tables are compared once per size (they must be equal,
the table's comment aside: nft 1.0.6 does not print it).

Then the daemon's restart on a node that has its tables, once per way of
reading: in a fresh process, a Proxier is given the same Services and
EndpointSlices and runs its first full sync (convert, compile, read back,
compare: nothing to send): its wall time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL_SIZES = [1_000, 10_000, 30_000]
QUICK_SIZES = [200]
ENDPOINTS = 10
REPEATS = 3
CLUSTER_CIDRS = ("10.128.0.0/9",)


def _status(field: str) -> float:
    """A /proc/self/status value in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def load(services: int) -> dict[str, Any]:
    """Inside the namespace: program the tables as the daemon would, then check both readings agree."""
    from benchmarks.synthetic import cluster_objects
    from kproxy.daemon.proxier import Proxier
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig

    backend = NftablesBackend()
    proxier = Proxier(backend, "node-0", ProxyConfig(cluster_cidrs=CLUSTER_CIDRS))
    objects = cluster_objects(services, ENDPOINTS)
    for kind in ("Node", "Service", "EndpointSlice"):
        proxier.on_relist(kind, [o for o in objects if o["kind"] == kind])
    del objects
    assert proxier.sync().full
    netlink, listed = backend.read(), backend.read_json()
    assert set(netlink.tables) == set(listed.tables) == {"ip", "ip6"}
    for family, table in netlink.tables.items():
        assert dataclasses.replace(table, comment="") == listed.tables[family], family
    return {
        "elements": sum(t.element_count() for t in netlink.tables.values()),
        "chains": sum(len(t.chains) for t in netlink.tables.values()),
        "rules": sum(c.fingerprint[1] for t in netlink.tables.values() for c in t.chains.values() if c.fingerprint),
    }


def read_once(how: str) -> dict[str, Any]:
    """Inside the namespace, in a fresh process: one read, timed, and this process's peak RSS growth."""
    from kproxy.nft.backend import NftablesBackend

    backend = NftablesBackend()
    read = backend.read if how == "netlink" else backend.read_json
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss = _status("VmRSS")
    t0 = time.perf_counter()
    ruleset = read()
    seconds = time.perf_counter() - t0
    elements = sum(t.element_count() for t in ruleset.tables.values())
    return {"how": how, "seconds": seconds, "peak_growth_mb": _status("VmHWM") - rss, "peak_mb": _status("VmHWM"),
            "elements": elements}


def restart_once(how: str, services: int) -> dict[str, Any]:
    """Inside the namespace, in a fresh process: the daemon's first full sync over the tables a previous run left."""
    from benchmarks.synthetic import cluster_objects
    from kproxy.daemon.proxier import Proxier
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig

    backend = NftablesBackend()
    if how == "json":
        backend.read = backend.read_json  # type: ignore[method-assign]
    t0 = time.perf_counter()
    proxier = Proxier(backend, "node-0", ProxyConfig(cluster_cidrs=CLUSTER_CIDRS))
    objects = cluster_objects(services, ENDPOINTS)
    for kind in ("Node", "Service", "EndpointSlice"):
        proxier.on_relist(kind, [o for o in objects if o["kind"] == kind])
    del objects
    result = proxier.sync()
    seconds = time.perf_counter() - t0
    assert result.full and result.operations == 0, result
    return {"how": how, "seconds": seconds, "peak_mb": _status("VmHWM")}


def _in_namespace(services: int, repeats: int) -> dict[str, Any]:
    """Runs inside the namespace: load, then the reads in fresh processes."""
    row: dict[str, Any] = {"services": services, **load(services)}
    runs: dict[str, list[dict[str, Any]]] = {"netlink": [], "json": []}
    for _ in range(repeats):
        for how in runs:
            result = subprocess.run([sys.executable, __file__, "--read", how], capture_output=True, text=True,
                                    check=True, cwd=ROOT)
            runs[how].append(json.loads(result.stdout.strip().splitlines()[-1]))
    for how, results in runs.items():
        assert all(r["elements"] == row["elements"] for r in results), results
        row[f"{how}_s"] = statistics.median(r["seconds"] for r in results)
        row[f"{how}_mb"] = statistics.median(r["peak_growth_mb"] for r in results)
        row[f"{how}_peak_mb"] = statistics.median(r["peak_mb"] for r in results)
    for how in runs:
        result = subprocess.run([sys.executable, __file__, "--restart", how, str(services)], capture_output=True,
                                text=True, check=True, cwd=ROOT)
        restart = json.loads(result.stdout.strip().splitlines()[-1])
        row[f"{how}_restart_s"], row[f"{how}_restart_mb"] = restart["seconds"], restart["peak_mb"]
    return row


def measure(services: int, repeats: int) -> dict[str, Any]:
    """One row, in a fresh network namespace of its own (deleted afterwards, also on failure)."""
    name = f"kpt-dump-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--inside", str(services), "--repeats", str(repeats)],
            capture_output=True, text=True, cwd=ROOT, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"read_back.py --inside {services} failed:\n{result.stderr[-3000:]}")
        row: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return row
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small size, one repeat (the test suite runs this)")
    parser.add_argument("--sizes", nargs="+", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--inside", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--read", choices=["netlink", "json"], help=argparse.SUPPRESS)
    parser.add_argument("--restart", nargs=2, metavar=("HOW", "SERVICES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    if args.read:
        print(json.dumps(read_once(args.read)))
        return []
    if args.restart:
        print(json.dumps(restart_once(args.restart[0], int(args.restart[1]))))
        return []
    if args.inside:
        print(json.dumps(_in_namespace(args.inside, repeats)))
        return []
    if os.geteuid() != 0:
        raise SystemExit("read_back.py needs root (network namespaces, nf_tables)")
    rows = [measure(size, repeats) for size in args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)]
    print(f"Reading back: median of {repeats} reads each, every read in a fresh process.\n")
    print("| Services x 10 endpoints | elements | chains | rules | JSON (libnftables) s | JSON peak RSS MB (growth) | "
          "netlink s | netlink peak RSS MB (growth) | time JSON / netlink | growth JSON / netlink |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} | {r['elements']:,} | {r['chains']:,} | {r['rules']:,} | {r['json_s']:.2f} | "
              f"{r['json_peak_mb']:.0f} ({r['json_mb']:.0f}) | {r['netlink_s']:.2f} | "
              f"{r['netlink_peak_mb']:.0f} ({r['netlink_mb']:.0f}) | "
              f"{r['json_s'] / r['netlink_s']:.0f}x | {r['json_mb'] / max(r['netlink_mb'], 0.1):.0f}x |")
    print("\n_The second table: the daemon's restart over its tables (first full sync: convert, compile, read back, "
          "compare), one run each._\n")
    print("| Services x 10 endpoints | reading back through JSON: s | peak RSS MB | over netlink: s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} | {r['json_restart_s']:.2f} | {r['json_restart_mb']:.0f} | "
              f"{r['netlink_restart_s']:.2f} | {r['netlink_restart_mb']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
