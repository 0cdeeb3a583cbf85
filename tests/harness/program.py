"""Programming the test bed's node in-process: its Node manifest, pod endpoints, and the compile-plan-apply path.

The same compiler, planner and backend ``kproxy --once`` uses, run inside the
node's network namespace.
"""

from __future__ import annotations

from typing import Any

from kproxy.cluster.convert import build_cluster
from kproxy.nft.backend import NftablesBackend
from kproxy.rules.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, node
from tests.harness.netbed import NetBed, Pod

CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))


def node_manifest(bed: NetBed) -> dict[str, Any]:
    return node(bed.node_name, [bed.node_ip4, bed.node_ip6], zone=bed.zone)


def pod_endpoint(pod: Pod, family: int = 4, **kw: Any) -> dict[str, Any]:
    return endpoint(pod.ip4 if family == 4 else pod.ip6, node=pod.node_name, zone=pod.zone, **kw)


def pod_slice(name: str, pods: list[Pod], family: int = 4, port: int = 8080, protocol: str = "TCP",
              port_name: str = "http", **kw: Any) -> dict[str, Any]:
    return endpoint_slice(
        f"{name}-{family}", name, [pod_endpoint(p, family, **kw) for p in pods],
        ports=[{"name": port_name, "port": port, "protocol": protocol}],
        address_type="IPv4" if family == 4 else "IPv6",
    )


def program(bed: NetBed, objects: list[dict[str, Any]], config: ProxyConfig = CONFIG) -> int:
    """Bring the node's kernel to the ruleset for ``objects``; return the operation count."""
    cluster, problems = build_cluster(objects + [node_manifest(bed)], bed.node_name)
    assert problems == []
    info = NodeInfo(bed.node_name, bed.zone, (bed.node_ip4, bed.node_ip6), (bed.node_ip4, bed.node_ip6))
    desired = compile_ruleset(cluster, info, config)
    with bed.node.entered():
        backend = NftablesBackend()
        tx = plan(backend.read(), desired)
        backend.apply(tx)
    return tx.operations
