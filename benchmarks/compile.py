"""Compile time and script size at 1k, 10k and 30k Services x 10 endpoints.

    .venv/bin/python benchmarks/compile.py [--quick]

Times are wall seconds of the pure core only (manifests -> model -> ruleset ->
script); nothing touches the kernel. The target: under 1 s at 10k Services.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import NODE_NAME, cluster_objects
from kproxy.cluster.convert import build_cluster
from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
from kproxy.rules.plan import render_ruleset

FULL_SIZES = [(1_000, 10), (10_000, 10), (30_000, 10), (5_000, 50)]
QUICK_SIZES = [(100, 10), (300, 10)]


def measure(services: int, endpoints: int) -> dict[str, float]:
    objects = cluster_objects(services, endpoints)
    gc.collect()
    t0 = time.perf_counter()
    cluster, problems = build_cluster(objects, NODE_NAME)
    t1 = time.perf_counter()
    ruleset = compile_ruleset(cluster, node_info(NODE_NAME, cluster.node), ProxyConfig(cluster_cidrs=("10.128.0.0/9",)))
    t2 = time.perf_counter()
    script = render_ruleset(ruleset)
    t3 = time.perf_counter()
    assert not problems
    return {
        "services": services,
        "endpoints": endpoints,
        "convert_s": t1 - t0,
        "compile_s": t2 - t1,
        "render_s": t3 - t2,
        "total_s": t3 - t0,
        "rules": ruleset.table("ip").rule_count(),
        "elements": ruleset.table("ip").element_count(),
        "script_mb": len(script.encode()) / 1e6,
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (the test suite runs this)")
    args = parser.parse_args(argv)
    rows = [measure(s, e) for s, e in (QUICK_SIZES if args.quick else FULL_SIZES)]
    print("| Services x endpoints | convert s | compile s | render s | total s | rules | elements | script MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} x {r['endpoints']} | {r['convert_s']:.2f} | {r['compile_s']:.2f} | "
              f"{r['render_s']:.2f} | {r['total_s']:.2f} | {r['rules']:,} | {r['elements']:,} | {r['script_mb']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
