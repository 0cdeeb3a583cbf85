"""New-connection latency through a ClusterIP with 100 vs 10k Services loaded, with and without limits.

    sudo .venv/bin/python benchmarks/datapath.py [--quick]

For each size (100 and 10,000 Services x 10 endpoints; --quick: 100 and 1,000)
a fresh network-namespace test bed (tests/harness/netbed.py) gets the synthetic cluster
(benchmarks/synthetic.py; its endpoints, 10.128.x.y, never see a packet) plus
one real Service, ``ns-54/echo`` at 10.250.0.1:80 (outside the synthetic
ClusterIPs 10.96-10.97.x.y), whose only endpoint is a local pod serving TCP
8080. A second real Service, ``ns-54/echo-limited`` at 10.250.0.2:80, has the
same endpoint and every limit of issue 19 (``kproxy.io/rate-limit``,
``-total``, ``limit-connections``, ``bandwidth-limit``), set far above what the
benchmark sends, so that it measures what the limits cost on the path of a
connection that passes them: the limit rules in the Service's chain, and the
per-packet bandwidth hook (which, once some Service has a bandwidth limit, every
packet crossing the node's prerouting and output hooks looks up, the unlimited
Service's and the pod-IP baseline's included). The node's kernel is programmed
by the daemon's core (the Proxier's cold start through libnftables), as a real
node would be.

``ns-54/echo`` sorts in the middle of the Services (exactly the median key at
every size): the order in which kproxy compiles Services and adds their
elements to the ``service-ips`` dispatch map. For a hash map this should not
matter; it is stated so that nobody suspects a lucky first or last position.

Another local pod then opens many sequential TCP connections (parallel 1, a
fresh source port each) to the ClusterIP, and, as a baseline, to the server
pod's IP directly (no Service). Each attempt's time runs from connect() to the
server's reply line, so it includes the first packet's trip through the nat
hooks, which is where the ruleset's size could cost. Both beds exist at once
and the measurements run in interleaved rounds (the order rotating each
round), so that noise on a 2-core machine lands on every series alike; a
warm-up precedes the rounds and Python's garbage collector is off during them.

Columns: connections measured, failed attempts, p50 / p99 / mean in
microseconds, and the ratio of p50 and of mean to the same target at the
smallest size (for the ClusterIP row of the largest size: the 10k/100 ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import (  # noqa: E402
    NODE_NAME,
    node_manifest,
    service_manifest,
    slice_manifest,
)

FULL_SIZES = [100, 10_000]
QUICK_SIZES = [100, 1_000]
ENDPOINTS = 10
REAL_NAMESPACE, REAL_NAME = "ns-54", "echo"
REAL_CLUSTER_IP, REAL_PORT, SERVER_PORT = "10.250.0.1", 80, 8080
LIMITED_NAME, LIMITED_CLUSTER_IP = "echo-limited", "10.250.0.2"
LIMITS = {"kproxy.io/rate-limit": "100000/second", "kproxy.io/rate-limit-total": "100000/second",
          "kproxy.io/limit-connections": "100000", "kproxy.io/bandwidth-limit": "100 mbytes/second"}
"""Every limit, far above what the benchmark sends: what they cost a connection that passes them."""
CONFIG_CIDRS = ("10.128.0.0/9",)  # the synthetic endpoints and the bed's pods (10.244.0.0/16)


def real_service() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": REAL_NAMESPACE, "annotations": annotations},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": REAL_PORT, "protocol": "TCP"}]},
        }
        for name, ip, annotations in ((REAL_NAME, REAL_CLUSTER_IP, {}), (LIMITED_NAME, LIMITED_CLUSTER_IP, LIMITS))
    ]


def real_slices(pod_ip: str) -> list[dict[str, Any]]:
    return [real_slice(pod_ip, REAL_NAME), real_slice(pod_ip, LIMITED_NAME)]


def real_slice(pod_ip: str, name: str = REAL_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-abcde", "namespace": REAL_NAMESPACE,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": SERVER_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [pod_ip], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
    }


@dataclass
class Series:
    services: int
    target: str
    dst: str
    port: int
    client: Any  # tests.harness.netbed.Netns
    server: str
    elapsed: list[float] = field(default_factory=list)
    failed: int = 0

    def run(self, count: int, record: bool = True) -> None:
        results = self.client.connect_many(self.dst, self.port, count, parallel=1, timeout=1.0)
        for r in results:
            if r.ok and r.server == self.server:
                if record:
                    self.elapsed.append(r.elapsed)
            elif record:
                self.failed += 1


@dataclass
class Bed:
    services: int
    bed: Any  # tests.harness.netbed.NetBed
    program_s: float = 0.0
    dispatch_elements: int = 0
    rank: int = 0
    series: list[Series] = field(default_factory=list)


def open_bed(stack: contextlib.ExitStack, services: int) -> Bed:
    from tests.harness.netbed import build_netbed

    bed = stack.enter_context(build_netbed(local_pods=2, remote_pods=1))
    bed.node.ip("route", "add", "default", "via", bed.router_ip4)
    server, client = bed.local_pods
    bed.start_servers(tcp_ports=[SERVER_PORT], udp_ports=[], pods=[server])
    result = Bed(services, bed)
    result.series = [
        Series(services, f"ClusterIP {REAL_CLUSTER_IP}:{REAL_PORT}", REAL_CLUSTER_IP, REAL_PORT, client.netns, server.name),
        Series(services, f"limited {LIMITED_CLUSTER_IP}:{REAL_PORT} (every limit)", LIMITED_CLUSTER_IP, REAL_PORT,
               client.netns, server.name),
        Series(services, f"pod IP {server.ip4}:{SERVER_PORT} (no Service)", server.ip4, SERVER_PORT, client.netns, server.name),
    ]
    return result


def program(b: Bed) -> None:
    """The daemon core's cold start: relist Node, Services and EndpointSlices, then one full sync."""
    from kproxy.daemon.proxier import Proxier
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig

    services = [service_manifest(i) for i in range(b.services)] + real_service()
    slices = [slice_manifest(i, ENDPOINTS) for i in range(b.services)] + real_slices(b.bed.local_pods[0].ip4)
    keys = sorted(f"{s['metadata']['namespace']}/{s['metadata']['name']}" for s in services)
    b.rank = keys.index(f"{REAL_NAMESPACE}/{REAL_NAME}")
    t0 = time.perf_counter()
    with b.bed.node.entered():
        proxier = Proxier(NftablesBackend(), NODE_NAME, ProxyConfig(cluster_cidrs=CONFIG_CIDRS))
        proxier.on_relist("Node", [node_manifest()])
        proxier.on_relist("Service", services)
        proxier.on_relist("EndpointSlice", slices)
        proxier.sync()
    b.program_s = time.perf_counter() - t0
    b.dispatch_elements = len(proxier.committed()["ip"].elements.get("service-ips", {}))


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def measure(sizes: list[int], connections: int, rounds: int, warmup: int) -> list[dict[str, Any]]:
    per_round = connections // rounds
    with contextlib.ExitStack() as stack:  # every bed is torn down, also on failure
        beds = [open_bed(stack, n) for n in sizes]
        for b in beds:
            program(b)
        gc.collect()
        series = [s for b in beds for s in b.series]
        for s in series:
            check = s.client.connect_many(s.dst, s.port, 5, parallel=1, timeout=1.0)
            if not check.all_ok or check.servers != {s.server}:
                raise RuntimeError(f"{s.services} Services, {s.target}: {check.summary()}\n{beds[0].bed.diagnostics()[:4000]}")
        for s in series:
            s.run(warmup, record=False)
        gc.disable()
        try:
            for r in range(rounds):
                order = series[r % len(series):] + series[:r % len(series)]
                for s in (order if r % 2 == 0 else order[::-1]):
                    s.run(per_round)
        finally:
            gc.enable()
    base = {s.target.split()[0]: s for s in beds[0].series}
    rows = []
    for b in beds:
        for s in b.series:
            ordered = sorted(s.elapsed)
            ref = sorted(base[s.target.split()[0]].elapsed)
            row = {
                "services": s.services,
                "target": s.target,
                "connections": len(ordered),
                "failed": s.failed,
                "p50_us": statistics.median(ordered) * 1e6,
                "p99_us": percentile(ordered, 0.99) * 1e6,
                "mean_us": statistics.fmean(ordered) * 1e6,
                "p50_ratio": statistics.median(ordered) / statistics.median(ref),
                "mean_ratio": statistics.fmean(ordered) / statistics.fmean(ref),
                "program_s": b.program_s,
                "dispatch_elements": b.dispatch_elements,
                "real_service_rank": b.rank,
            }
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 Services, 300 connections (the test suite runs this)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/datapath.py needs root (network namespaces, nftables)")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    rows = measure(sizes, connections=300 if args.quick else 2000, rounds=10 if args.quick else 20, warmup=100)
    small = sizes[0]
    print(f"| Services x {ENDPOINTS} endpoints | target | connections | failed | p50 us | p99 us | mean us | "
          f"p50 vs {small:,} | mean vs {small:,} | service-ips elements | programmed in s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['services']:,} | {r['target']} | {r['connections']:,} | {r['failed']} | {r['p50_us']:.0f} | "
              f"{r['p99_us']:.0f} | {r['mean_us']:.0f} | {r['p50_ratio']:.2f} | {r['mean_ratio']:.2f} | "
              f"{r['dispatch_elements']:,} | {r['program_s']:.2f} |")
    ranks = ", ".join(f"{r['real_service_rank']:,} of {r['services'] + 1:,}" for r in rows if r["target"].startswith("ClusterIP"))
    print(f"\nThe real Service {REAL_NAMESPACE}/{REAL_NAME} sorts at position {ranks} (0-based) among the Services.")
    return rows


if __name__ == "__main__":
    main()
