"""Manifest conversion: what is read, what is skipped, and why."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from kproxy.convert import (
    InvalidObject,
    NotProxied,
    build_cluster,
    node_from_manifest,
    service_from_manifest,
    slice_from_manifest,
)
from kproxy.manifests import ManifestError, parse_manifests
from kproxy.model import RateLimit
from tests.builders import endpoint, endpoint_slice, node, service


def test_service_fields() -> None:
    """Every field the compiler uses is read from a full LoadBalancer manifest."""
    svc = service_from_manifest(
        service(
            "web",
            "shop",
            cluster_ip=["10.96.0.5", "fd00::5"],
            ipFamilies=["IPv4", "IPv6"],
            type="LoadBalancer",
            ports=[{"name": "http", "port": 80, "nodePort": 30080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            externalIPs=["198.51.100.1"],
            loadBalancerSourceRanges=["203.0.113.7/24"],
            externalTrafficPolicy="Local",
            internalTrafficPolicy="Local",
            healthCheckNodePort=31000,
            sessionAffinity="ClientIP",
            trafficDistribution="PreferClose",
            annotations={"kproxy.io/rate-limit": "10/second", "kproxy.io/rate-limit-burst": "20"},
            status={"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}, {"hostname": "lb.example"}]}},
        )
    )
    assert svc.key == "shop/web"
    assert svc.cluster_ips == ("10.96.0.5", "fd00::5")
    assert [(p.name, p.protocol, p.port, p.node_port) for p in svc.ports] == [
        ("http", "tcp", 80, 30080),
        ("dns", "udp", 53, None),
    ]
    assert svc.external_ips == ("198.51.100.1",)
    assert svc.load_balancer_ips == ("192.0.2.1",)
    assert svc.load_balancer_source_ranges == ("203.0.113.0/24",)
    assert svc.external_policy_local and svc.internal_policy_local
    assert svc.health_check_node_port == 31000
    assert svc.affinity_timeout == 10800
    assert svc.traffic_distribution == "PreferClose"
    assert svc.rate_limit == RateLimit(10, "second", 20)


def test_load_balancer_ip_mode_proxy_is_not_programmed() -> None:
    """An ingress IP with ipMode Proxy is left to the load balancer; VIP (the default) is programmed."""
    svc = service_from_manifest(service("lb", type="LoadBalancer", status={"loadBalancer": {"ingress": [
        {"ip": "192.0.2.1", "ipMode": "Proxy"}, {"ip": "192.0.2.2", "ipMode": "VIP"}, {"ip": "192.0.2.3"}]}}))
    assert svc.load_balancer_ips == ("192.0.2.2", "192.0.2.3")


def test_addresses_canonicalised() -> None:
    """IPv6 addresses are written the one way nft prints them."""
    svc = service_from_manifest(service("web", cluster_ip="FD00:0:0::0001"))
    assert svc.cluster_ips == ("fd00::1",)


@pytest.mark.parametrize(
    "labels, spec",
    [
        pytest.param({}, {"clusterIP": "None", "clusterIPs": ["None"]}, id="headless"),
        pytest.param({"service.kubernetes.io/service-proxy-name": "other"}, {}, id="other-proxy"),
        pytest.param({"service.kubernetes.io/headless": ""}, {}, id="headless-label"),
        pytest.param({}, {"type": "ExternalName", "clusterIP": "", "clusterIPs": []}, id="external-name"),
    ],
)
def test_not_proxied(labels: dict[str, str], spec: dict[str, Any]) -> None:
    """Services kproxy must leave alone are skipped, not reported as invalid."""
    manifest = service("web", labels=labels)
    manifest["spec"].update(spec)
    with pytest.raises(NotProxied):
        service_from_manifest(manifest)


def _mutate(path: list[Any], value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return obj

    return apply


BAD_SERVICES = [
    pytest.param(["spec", "clusterIP"], "10.96.0.300", "invalid_ip", id="bad-cluster-ip"),
    pytest.param(["spec", "clusterIPs"], ["10.0.0.1; flush ruleset"], "invalid_ip", id="injected-cluster-ip"),
    pytest.param(["spec", "ports"], [{"name": "http", "port": 70000}], "invalid_port", id="port-out-of-range"),
    pytest.param(["spec", "ports"], [{"name": "http", "port": "80"}], "invalid_port", id="port-as-string"),
    pytest.param(["spec", "ports"], [{"name": "http", "port": 80, "protocol": "ICMP"}], "unknown_protocol", id="unknown-protocol"),
    pytest.param(["spec", "ports"], [{"name": 'x" ; flush ruleset ; "', "port": 80}], "invalid_name", id="injected-port-name"),
    pytest.param(["spec", "ipFamilies"], ["IPv6"], "family_mismatch", id="family-mismatch"),
    pytest.param(["spec", "externalIPs"], ["not-an-ip"], "invalid_ip", id="bad-external-ip"),
    pytest.param(["spec", "loadBalancerSourceRanges"], ["10.0.0.0/33"], "invalid_cidr", id="bad-source-range"),
    pytest.param(["metadata", "name"], "Web}", "invalid_name", id="injected-name"),
    pytest.param(["metadata", "namespace"], "a" * 64, "invalid_name", id="namespace-too-long"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "10/hour"}, "invalid_annotation", id="rate-unit"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "0/second"}, "invalid_annotation", id="rate-zero"),
    pytest.param(
        ["metadata", "annotations"],
        {"kproxy.io/rate-limit": '1/second } drop ; add rule ip filter x accept #'},
        "invalid_annotation",
        id="rate-injection",
    ),
    pytest.param(
        ["metadata", "annotations"],
        {"kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-burst": "-1"},
        "invalid_annotation",
        id="bad-burst",
    ),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-burst": "3"}, "invalid_annotation", id="burst-alone"),
    pytest.param(
        ["spec", "sessionAffinityConfig"], {"clientIP": {"timeoutSeconds": 0}}, "malformed", id="affinity-timeout-zero"
    ),
    pytest.param(["spec", "externalTrafficPolicy"], "Sometimes", "malformed", id="unknown-policy"),
]


@pytest.mark.parametrize("path, value, reason", BAD_SERVICES)
def test_bad_service_rejected(path: list[Any], value: Any, reason: str) -> None:
    """A malformed or hostile Service raises InvalidObject with a metric reason."""
    base = service("web", sessionAffinity="ClientIP")
    with pytest.raises(InvalidObject) as info:
        service_from_manifest(_mutate(path, value)(base))
    assert info.value.reason == reason


BAD_SLICES = [
    pytest.param(["endpoints"], [endpoint("10.0.0.1; drop")], "invalid_ip", id="bad-endpoint-ip"),
    pytest.param(["endpoints"], [endpoint("fd00::1")], "family_mismatch", id="v6-in-v4-slice"),
    pytest.param(["addressType"], "FQDN", "family_mismatch", id="fqdn-slice"),
    pytest.param(["ports"], [{"name": "http", "port": 0}], "invalid_port", id="port-zero"),
    pytest.param(["metadata", "labels"], {}, "invalid_name", id="no-service-label"),
]


@pytest.mark.parametrize("path, value, reason", BAD_SLICES)
def test_bad_slice_rejected(path: list[Any], value: Any, reason: str) -> None:
    """A malformed EndpointSlice raises InvalidObject with a metric reason."""
    base = endpoint_slice("web-1", "web", [endpoint("10.0.0.1")])
    with pytest.raises(InvalidObject) as info:
        slice_from_manifest(_mutate(path, value)(base))
    assert info.value.reason == reason


def test_slice_fields() -> None:
    """Conditions default as upstream's do, and hints and the trigger time are read."""
    eps = slice_from_manifest(
        endpoint_slice(
            "web-1",
            "web",
            [
                endpoint("10.0.0.1", ready=None, for_zones=["zone-a"], for_nodes=["node-a"]),
                endpoint("10.0.0.2", ready=False, terminating=True),
                {"addresses": [], "conditions": {}},
            ],
            annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"},
        )
    )
    first, second = eps.endpoints
    assert (first.ready, first.serving, first.terminating) == (True, True, False)
    assert first.hint_zones == frozenset({"zone-a"}) and first.hint_nodes == frozenset({"node-a"})
    assert (second.ready, second.serving, second.terminating) == (False, False, True)
    assert eps.trigger_time == "2026-12-01T10:00:00Z"
    assert eps.service_key == "default/web"


def test_node_fields() -> None:
    """Addresses, zone and the being-deleted state come from the Node."""
    n = node_from_manifest(node("node-a", ["192.168.50.1", "fd00:50::1"]))
    assert n.internal_ips == ("192.168.50.1", "fd00:50::1")
    assert n.zone == "zone-a"
    assert not n.being_deleted
    assert node_from_manifest(node(deleting=True)).being_deleted
    tainted = node(taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}])
    assert node_from_manifest(tainted).being_deleted


def test_build_cluster_skips_only_bad_objects() -> None:
    """One bad Service and one bad slice are reported; everything else is kept."""
    objects = [
        service("good", cluster_ip="10.96.0.1"),
        service("bad", cluster_ip="10.96.0.999"),
        endpoint_slice("good-1", "good", [endpoint("10.0.0.1")]),
        endpoint_slice("bad-1", "bad", [endpoint("nope")]),
        node("node-a"),
        node("node-b"),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
        "not even a mapping",
    ]
    cluster, problems = build_cluster(objects, "node-a")  # type: ignore[arg-type]
    assert set(cluster.services) == {"default/good"}
    assert set(cluster.slices) == {"default/good-1"}
    assert cluster.node is not None and cluster.node.name == "node-a"
    assert sorted((p.kind, p.key, p.reason) for p in problems) == [
        ("EndpointSlice", "default/bad-1", "invalid_ip"),
        ("Service", "default/bad", "invalid_ip"),
    ]
    assert "default/bad" in str(problems[1]) or "default/bad" in str(problems[0])


def test_parse_list_and_multidoc() -> None:
    """A List and plain documents in one file are flattened in order."""
    text = """
apiVersion: v1
kind: List
items:
- {kind: Service, metadata: {name: a}}
- {kind: Service, metadata: {name: b}}
---
kind: ServiceList
items: [{kind: Service, metadata: {name: c}}]
---
{kind: Node, metadata: {name: n}}
---
"""
    names = [o["metadata"]["name"] for o in parse_manifests(text, "f.yaml")]
    assert names == ["a", "b", "c", "n"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        pytest.param("a: [", "f.yaml: invalid YAML at line", id="broken-yaml"),
        pytest.param("- 1\n- 2\n", "f.yaml: document 1 is a list", id="not-an-object"),
    ],
)
def test_parse_errors_name_the_file(text: str, fragment: str) -> None:
    """Broken input raises ManifestError naming the file and the problem, on one line."""
    with pytest.raises(ManifestError) as info:
        parse_manifests(text, "f.yaml")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
