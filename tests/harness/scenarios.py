"""The golden scenarios: one small cluster per datapath case, with the node and the configuration they compile for.

``tests/test_golden.py`` compares what they compile to with the golden files;
``tests/test_nfnetlink.py`` sends the same shapes over netlink.
"""

from __future__ import annotations

from typing import Any

from kproxy.rules.compiler import NodeInfo, ProxyConfig
from tests.harness.builders import endpoint, endpoint_slice, service

NODE = NodeInfo("node-a", "zone-a", ("192.168.50.1", "fd00:50::1"), ("192.168.50.1", "fd00:50::1"))
CIDRS = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))


def _two_endpoints(name: str, **kw: Any) -> dict[str, Any]:
    return endpoint_slice(
        f"{name}-1", name, [endpoint("10.244.1.10"), endpoint("10.244.2.10", node="node-b")], **kw
    )


SCENARIOS: dict[str, tuple[list[dict[str, Any]], ProxyConfig]] = {
    "clusterip": ([service("web", "shop", "10.96.0.10"), _two_endpoints("web", namespace="shop")], CIDRS),
    "clusterip-no-cluster-cidr": ([service("web", "shop", "10.96.0.10"), _two_endpoints("web", namespace="shop")], ProxyConfig()),
    "masquerade-all": (
        [service("web", "shop", "10.96.0.10"), _two_endpoints("web", namespace="shop")],
        ProxyConfig(cluster_cidrs=("10.244.0.0/16",), masquerade_all=True),
    ),
    "nodeport-cluster-policy": (
        [
            service("web", "shop", "10.96.0.10", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
            _two_endpoints("web", namespace="shop"),
        ],
        CIDRS,
    ),
    "loadbalancer-local-policy": (
        [
            service(
                "lb",
                "shop",
                "10.96.0.20",
                type="LoadBalancer",
                externalTrafficPolicy="Local",
                healthCheckNodePort=32000,
                loadBalancerSourceRanges=["203.0.113.0/24"],
                ports=[{"name": "https", "port": 443, "nodePort": 30443}],
                status={"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}},
            ),
            endpoint_slice(
                "lb-1",
                "lb",
                [endpoint("10.244.1.20"), endpoint("10.244.2.20", node="node-b")],
                namespace="shop",
                ports=[{"name": "https", "port": 8443}],
            ),
        ],
        CIDRS,
    ),
    "local-policy-without-local-endpoint": (
        [
            service("lb", "shop", "10.96.0.20", type="NodePort", externalTrafficPolicy="Local",
                    internalTrafficPolicy="Local", ports=[{"name": "http", "port": 80, "nodePort": 30081}]),
            endpoint_slice("lb-1", "lb", [endpoint("10.244.2.20", node="node-b")], namespace="shop"),
        ],
        CIDRS,
    ),
    "no-endpoints": (
        [
            service("idle", "jobs", "10.96.0.30", externalIPs=["198.51.100.30"], type="NodePort",
                    ports=[{"name": "http", "port": 80, "nodePort": 30082}]),
            endpoint_slice("idle-1", "idle", [endpoint("10.244.1.30", ready=False)], namespace="jobs"),
        ],
        CIDRS,
    ),
    "session-affinity": (
        [
            service("sticky", "shop", "10.96.0.40", sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            _two_endpoints("sticky", namespace="shop"),
        ],
        CIDRS,
    ),
    "rate-limit": (
        [
            service("api", "shop", "10.96.0.50",
                    annotations={"kproxy.io/rate-limit": "20/minute", "kproxy.io/rate-limit-burst": "5"}),
            _two_endpoints("api", namespace="shop"),
        ],
        CIDRS,
    ),
    # Every limit at once, an allowlist in both families, TCP and UDP ports, ClusterIP and NodePort frontends.
    "limits": (
        [
            service("api", "shop", ["10.96.0.70", "fd00:96::70"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                    annotations={"kproxy.io/rate-limit": "20/minute", "kproxy.io/rate-limit-total": "50/second",
                                 "kproxy.io/limit-connections": "3", "kproxy.io/bandwidth-limit": "1 mbytes/second",
                                 "kproxy.io/bandwidth-limit-burst": "128 kbytes",
                                 "kproxy.io/limit-allowlist": "192.168.50.101/32, 10.244.0.0/16, fd00:50::101/128"},
                    ports=[{"name": "http", "port": 80, "nodePort": 30070},
                           {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30071}]),
            endpoint_slice("api-1", "api", [endpoint("10.244.1.70"), endpoint("10.244.2.70", node="node-b")],
                           namespace="shop", ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                                    {"name": "dns", "port": 5353, "protocol": "UDP"}]),
        ],
        CIDRS,
    ),
    # Limits without an allowlist, under externalTrafficPolicy Local (svc- and local- chains share the total's meter).
    "limits-local-policy": (
        [
            service("up", "shop", ["10.96.0.71", "fd00:96::71"], ipFamilies=["IPv4", "IPv6"], type="NodePort",
                    externalTrafficPolicy="Local",
                    annotations={"kproxy.io/rate-limit-total": "600/minute", "kproxy.io/rate-limit-total-burst": "20",
                                 "kproxy.io/limit-connections": "100", "kproxy.io/bandwidth-limit": "1500 kbytes/second"},
                    ports=[{"name": "http", "port": 80, "nodePort": 30072}]),
            _two_endpoints("up", namespace="shop"),
            endpoint_slice("up-6", "up", [endpoint("fd00:244:1::71")], namespace="shop", address_type="IPv6"),
        ],
        CIDRS,
    ),
    "dual-stack": (
        [
            service("web", "shop", ["10.96.0.60", "fd00:96::60"], ipFamilies=["IPv4", "IPv6"]),
            _two_endpoints("web", namespace="shop"),
            endpoint_slice("web-6", "web", [endpoint("fd00:244:1::10")], namespace="shop", address_type="IPv6"),
        ],
        CIDRS,
    ),
    "udp-sctp-external-ip": (
        [
            service("sig", "telco", "10.96.0.70", externalIPs=["198.51.100.70"],
                    ports=[{"name": "sip", "port": 5060, "protocol": "SCTP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            endpoint_slice("sig-1", "sig", [endpoint("10.244.2.70", node="node-b")], namespace="telco",
                           ports=[{"name": "sip", "port": 5060, "protocol": "SCTP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
        ],
        CIDRS,
    ),
    "prefer-close": (
        [
            service("cat", "shop", "10.96.0.80", trafficDistribution="PreferClose"),
            endpoint_slice("cat-1", "cat", [endpoint("10.244.1.80", zone="zone-a", for_zones=["zone-a"]),
                                            endpoint("10.244.2.80", node="node-b", zone="zone-b", for_zones=["zone-b"])],
                           namespace="shop"),
        ],
        CIDRS,
    ),
    # A Service annotated for per-Service series counts its new connections in chains of its own; its
    # neighbour, not annotated, is elements only (the shared chains).
    "metrics-annotated": (
        [
            service("lb", "shop", "10.96.0.90", type="LoadBalancer", externalTrafficPolicy="Local",
                    annotations={"kproxy.io/metrics": "true"}, ports=[{"name": "https", "port": 443, "nodePort": 30090}],
                    status={"loadBalancer": {"ingress": [{"ip": "192.0.2.90"}]}}),
            _two_endpoints("lb", namespace="shop", ports=[{"name": "https", "port": 8443}]),
            service("plain", "shop", "10.96.0.91", type="NodePort", externalTrafficPolicy="Local",
                    ports=[{"name": "http", "port": 80, "nodePort": 30091}]),
            _two_endpoints("plain", namespace="shop"),
        ],
        CIDRS,
    ),
    # --service-metrics=all: every port counts, in chains of its own.
    "service-metrics-all": (
        [
            service("web", "shop", "10.96.0.10", type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
            _two_endpoints("web", namespace="shop"),
        ],
        ProxyConfig(cluster_cidrs=CIDRS.cluster_cidrs, service_metrics="all"),
    ),
}
