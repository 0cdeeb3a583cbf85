"""Cold start on an empty node: kproxy against upstream kube-proxy's layout, and against the nft floor.

    .venv/bin/python benchmarks/cold_start.py [--quick]

For each size, in a fresh network namespace and a fresh process, the daemon's
core (the Proxier: conversion, compilation, the libnftables backend) starts
with every Service and EndpointSlice listed, and programs an empty kernel:

* convert: manifests to the typed model (what the watchers' lists cost);
* compile: the model to the ruleset (pure Python, in the sync);
* apply: the ruleset into the kernel through libnftables (in-process);
* total: convert + compile + apply, and the process's peak RSS after each step;
* CPU: the CPU time the process used for all of it (user and system, every
  thread; the kernel's share of loading the table is system time), and the
  share of the machine's time the hypervisor took from this VM meanwhile
  (steal, from /proc/stat): a development VM's wall times vary with it.

Then, each in a fresh namespace with the same kernel and nft:

* floor: ``nft -f`` of kproxy's own generated script, so total / floor shows
  what the Python side adds;
* baseline: ``nft -f`` of the same cluster in upstream kube-proxy's nftables
  layout (one chain per endpoint, an inline numgen vmap per Service), at the
  sizes where it finishes in reasonable time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_SIZES = [(1_000, 10, True), (10_000, 10, True), (30_000, 10, False), (5_000, 50, False)]
QUICK_SIZES = [(200, 10, True), (500, 10, True)]
CONFIG_CIDRS = ("10.128.0.0/9",)
REPEATS = 5
"""Cold starts per row: the median is reported (the VM's speed varies from minute to minute)."""


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _steal_and_total() -> tuple[int, int]:
    """(steal, all) CPU jiffies of the machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7] if len(fields) > 7 else 0, sum(fields[:8])


def scenario(services: int, endpoints: int, script_out: str, upstream_out: str | None) -> dict[str, float]:
    """Runs inside the fresh namespace: one cold start, measured step by step."""
    from benchmarks.synthetic import NODE_NAME, cluster_objects
    from benchmarks.upstream_layout import render_upstream
    from kproxy.daemon.proxier import Proxier
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig, node_info
    from kproxy.rules.plan import create

    config = ProxyConfig(cluster_cidrs=CONFIG_CIDRS)
    objects = cluster_objects(services, endpoints)
    gc.collect()
    rss_start = _rss_mb()
    backend = NftablesBackend()
    spent = [0.0]
    depth = [0]
    apply, apply_in_order = backend.apply, backend.apply_in_order

    def timed(call):  # type: ignore[no-untyped-def]
        def run(*args, **kw):  # type: ignore[no-untyped-def]
            depth[0] += 1
            t = time.perf_counter()
            try:
                return call(*args, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # apply_in_order may call apply itself: count the outermost call only
                    spent[0] += time.perf_counter() - t
        return run

    backend.apply, backend.apply_in_order = timed(apply), timed(apply_in_order)  # type: ignore[method-assign]
    proxier = Proxier(backend, NODE_NAME, config)
    steal0, all0 = _steal_and_total()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    proxier.on_relist("Node", [o for o in objects if o["kind"] == "Node"])
    proxier.on_relist("Service", [o for o in objects if o["kind"] == "Service"])
    proxier.on_relist("EndpointSlice", [o for o in objects if o["kind"] == "EndpointSlice"])
    t1 = time.perf_counter()
    rss_convert = _rss_mb()
    del objects
    result = proxier.sync()
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu0
    steal1, all1 = _steal_and_total()
    rss_sync = _rss_mb()
    assert result.full and result.operations > 0
    committed = proxier.committed()
    script = "".join(str(tx) for family in ("ip", "ip6") for tx in create(committed[family]))
    Path(script_out).write_text(script)
    if upstream_out:
        cluster = proxier.cluster()
        Path(upstream_out).write_text(render_upstream(cluster, node_info(NODE_NAME, cluster.node), config))
    return {
        "services": services,
        "endpoints": endpoints,
        "convert_s": t1 - t0,
        "compile_s": (t2 - t1) - spent[0],
        "apply_s": spent[0],
        "total_s": t2 - t0,
        "cpu_s": cpu,
        "steal_pct": 100 * (steal1 - steal0) / max(1, all1 - all0),
        "rss_start_mb": rss_start,
        "rss_convert_mb": rss_convert,
        "rss_peak_mb": rss_sync,
        "operations": result.operations,
        "script_mb": len(script) / 1e6,
    }


def measure(services: int, endpoints: int, baseline: bool, repeats: int = 1) -> dict[str, float]:
    """One row: the median of ``repeats`` cold starts (each in a fresh namespace and process), and of as many floors.

    The development machine is a VM whose CPU speed varies from minute to
    minute by up to a third, so one run says little; the slow baseline runs once.
    """
    from benchmarks.netns import run_in_netns, timed_nft_load

    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        ours, upstream = os.path.join(tmp, "kproxy.nft"), os.path.join(tmp, "upstream.nft")
        runs, floors = [], []
        for attempt in range(repeats):
            args = ["--scenario", str(services), str(endpoints), "--script-out", ours]
            if baseline and attempt == 0:
                args += ["--upstream-out", upstream]
            runs.append(run_in_netns("cold_start.py", *args))
            floors.append(timed_nft_load(ours))
        row = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
        floor = sorted(floors, key=lambda f: f["seconds"])[len(floors) // 2]
        row["repeats"] = repeats
        row["floor_s"], row["floor_rss_mb"] = floor["seconds"], floor["rss_mb"]
        if baseline:
            base = timed_nft_load(upstream)
            row["baseline_s"], row["baseline_rss_mb"] = base["seconds"], base["rss_mb"]
    return row


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (the test suite runs this)")
    parser.add_argument("--scenario", nargs=2, type=int, metavar=("SERVICES", "ENDPOINTS"), help=argparse.SUPPRESS)
    parser.add_argument("--script-out", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario:
        print(json.dumps(scenario(*args.scenario, args.script_out, args.upstream_out)))
        return []
    rows = [measure(*size, repeats=1 if args.quick else REPEATS) for size in (QUICK_SIZES if args.quick else FULL_SIZES)]
    if not args.quick:
        print(f"Each row is the median of {REPEATS} cold starts (by total) and of {REPEATS} floors; "
              "the upstream layout runs once.\n")
    print("| Services x endpoints | convert s | compile s | apply s | total s | CPU s | steal % | peak RSS MB | "
          "floor (nft -f) s | total / floor | upstream layout s | upstream / total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = f"{r['baseline_s']:.2f}" if "baseline_s" in r else "not run"
        ratio = f"{r['baseline_s'] / r['total_s']:.0f}x" if "baseline_s" in r else "-"
        print(f"| {r['services']:,} x {r['endpoints']} | {r['convert_s']:.2f} | {r['compile_s']:.2f} | "
              f"{r['apply_s']:.2f} | {r['total_s']:.2f} | {r['cpu_s']:.2f} | {r['steal_pct']:.0f} | "
              f"{r['rss_peak_mb']:.0f} | {r['floor_s']:.2f} | "
              f"{r['total_s'] / r['floor_s']:.2f} | {base} | {ratio} |")
    return rows


if __name__ == "__main__":
    main()
