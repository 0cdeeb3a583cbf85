"""Manifest conversion: what is read, what is skipped, and why."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.cluster.conflicts import FrontendIndex
from kproxy.cluster.convert import (
    InvalidObject,
    NotProxied,
    build_cluster,
    node_from_manifest,
    service_from_manifest,
    slice_from_manifest,
)
from kproxy.cluster.manifests import ManifestError, parse_manifests
from kproxy.cluster.model import BandwidthLimit, RateLimit
from tests.harness.builders import endpoint, endpoint_slice, node, service


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
    pytest.param(["spec", "clusterIPs"], ["fd00::1%x }"], "invalid_ip", id="zone-id-cluster-ip"),
    pytest.param(["spec", "clusterIPs"], ["10.96.0.1\n"], "invalid_ip", id="trailing-newline-cluster-ip"),
    pytest.param(["spec", "ipFamilies"], ["IPv6"], "family_mismatch", id="family-mismatch"),
    pytest.param(["spec", "ipFamilies"], [["IPv4"]], "family_mismatch", id="family-wrong-type"),
    pytest.param(["spec", "loadBalancerSourceRanges"], ["10.0.0.0/33"], "invalid_cidr", id="bad-source-range"),
    pytest.param(["spec", "loadBalancerSourceRanges"], ["fe80::%1/64"], "invalid_cidr", id="zone-id-source-range"),
    pytest.param(["metadata", "name"], "Web}", "invalid_name", id="injected-name"),
    pytest.param(["metadata", "name"], "web\n", "invalid_name", id="trailing-newline-name"),
    pytest.param(["metadata", "namespace"], "a" * 64, "invalid_name", id="namespace-too-long"),
    pytest.param(["metadata", "namespace"], ["default"], "invalid_name", id="namespace-wrong-type"),
    pytest.param(
        ["spec", "sessionAffinityConfig"], {"clientIP": {"timeoutSeconds": 0}}, "malformed", id="affinity-timeout-zero"
    ),
    pytest.param(["spec", "externalTrafficPolicy"], "Sometimes", "malformed", id="unknown-policy"),
    pytest.param(["spec", "externalTrafficPolicy"], ["Local"], "malformed", id="policy-wrong-type"),
    pytest.param(["spec", "type"], {"a": 1}, "malformed", id="type-wrong-type"),
]


@pytest.mark.parametrize("path, value, reason", BAD_SERVICES)
def test_bad_service_rejected(path: list[Any], value: Any, reason: str) -> None:
    """A Service whose every rule depends on a bad value raises InvalidObject with a metric reason."""
    base = service("web", sessionAffinity="ClientIP")
    with pytest.raises(InvalidObject) as info:
        service_from_manifest(_mutate(path, value)(base))
    assert info.value.reason == reason
    assert path[-1] in str(info.value), f"the message names the field: {info.value}"


BAD_PARTS = [
    pytest.param(["spec", "ports", 1], {"name": "b", "port": 70000}, "invalid_port", "spec.ports[1].port", id="port-out-of-range"),
    pytest.param(["spec", "ports", 1], {"name": "b", "port": "80"}, "invalid_port", "spec.ports[1].port", id="port-as-string"),
    pytest.param(["spec", "ports", 1], {"name": "b", "port": 81, "protocol": "ICMP"}, "unknown_protocol",
                 "spec.ports[1].protocol", id="unknown-protocol"),
    pytest.param(["spec", "ports", 1], {"name": "b", "port": 81, "protocol": ["TCP"]}, "unknown_protocol",
                 "spec.ports[1].protocol", id="protocol-wrong-type"),
    pytest.param(["spec", "ports", 1], {"name": 'x" ; flush ruleset ; "', "port": 81}, "invalid_name",
                 "spec.ports[1].name", id="injected-port-name"),
    pytest.param(["spec", "ports", 1], {"name": "http\n", "port": 81}, "invalid_name", "spec.ports[1].name",
                 id="trailing-newline-port-name"),
    pytest.param(["spec", "externalIPs"], ["not-an-ip"], "invalid_ip", "spec.externalIPs[0]", id="bad-external-ip"),
    pytest.param(["spec", "externalIPs"], ["0.0.0.0"], "invalid_ip", "spec.externalIPs[0]", id="unspecified-external-ip"),
    pytest.param(["spec", "externalIPs"], ["127.0.0.1"], "invalid_ip", "spec.externalIPs[0]", id="loopback-external-ip"),
    pytest.param(["spec", "externalIPs"], ["239.1.1.1"], "invalid_ip", "spec.externalIPs[0]", id="multicast-external-ip"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "10/hour"}, "invalid_annotation",
                 "kproxy.io/rate-limit", id="rate-unit"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "0/second"}, "invalid_annotation",
                 "kproxy.io/rate-limit", id="rate-zero"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "1/second } drop ; add rule ip filter x accept #"},
                 "invalid_annotation", "kproxy.io/rate-limit", id="rate-injection"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-burst": "-1"},
                 "invalid_annotation", "kproxy.io/rate-limit-burst", id="bad-burst"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit": "5/second", "kproxy.io/rate-limit-burst": "0"},
                 "invalid_annotation", "kproxy.io/rate-limit-burst", id="zero-burst-nft-cannot-express"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-burst": "3"}, "invalid_annotation",
                 "kproxy.io/rate-limit-burst", id="burst-alone"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-connections": "0"}, "invalid_annotation",
                 "kproxy.io/limit-connections", id="connections-zero"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-connections": "three"}, "invalid_annotation",
                 "kproxy.io/limit-connections", id="connections-word"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-connections": "-3"}, "invalid_annotation",
                 "kproxy.io/limit-connections", id="connections-negative"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-connections": "1234567890"}, "invalid_annotation",
                 "kproxy.io/limit-connections", id="connections-too-many-digits"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-total": "50/hour"}, "invalid_annotation",
                 "kproxy.io/rate-limit-total", id="total-unit"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-total": "0/second"}, "invalid_annotation",
                 "kproxy.io/rate-limit-total", id="total-zero"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-total": "50/second", "kproxy.io/rate-limit-total-burst": "0"}, "invalid_annotation",
                 "kproxy.io/rate-limit-total-burst", id="total-zero-burst"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/rate-limit-total-burst": "5"}, "invalid_annotation",
                 "kproxy.io/rate-limit-total-burst", id="total-burst-alone"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1 gbytes/second"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-unit"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1 mbytes/minute"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-per-minute"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "0 kbytes/second"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-zero"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1mbit"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-bits"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1 mbytes/second } drop ; flush ruleset #"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-injection"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "999999999 mbytes/second"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit", id="bandwidth-kernel-overflow"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1 mbytes/second", "kproxy.io/bandwidth-limit-burst": "lots"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit-burst", id="bandwidth-bad-burst"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit": "1 mbytes/second", "kproxy.io/bandwidth-limit-burst": "4096 mbytes"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit-burst", id="bandwidth-burst-32-bits"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/bandwidth-limit-burst": "128 kbytes"}, "invalid_annotation",
                 "kproxy.io/bandwidth-limit-burst", id="bandwidth-burst-alone"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-allowlist": "10.0.0.0/8, 10.1.2.3"}, "invalid_annotation",
                 "kproxy.io/limit-allowlist", id="allowlist-address-without-prefix"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-allowlist": "10.0.0.0/33"}, "invalid_annotation",
                 "kproxy.io/limit-allowlist", id="allowlist-prefix-too-long"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-allowlist": "fe80::1%eth0/64"}, "invalid_annotation",
                 "kproxy.io/limit-allowlist", id="allowlist-zone-id"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/limit-allowlist": "10.0.0.0/8\" ; flush ruleset"}, "invalid_annotation",
                 "kproxy.io/limit-allowlist", id="allowlist-injection"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/metrics": "yes"}, "invalid_annotation",
                 "kproxy.io/metrics", id="metrics-yes"),
    pytest.param(["metadata", "annotations"], {"kproxy.io/metrics": "True"}, "invalid_annotation",
                 "kproxy.io/metrics", id="metrics-capitalised"),
]


@pytest.mark.parametrize("path, value, reason, field", BAD_PARTS)
def test_bad_part_skipped_and_the_rest_kept(path: list[Any], value: Any, reason: str, field: str) -> None:
    """A bad port, external IP or annotation is skipped with a note naming the field; the Service is kept."""
    base = service("web", ports=[{"name": "a", "port": 80}, {"name": "b", "port": 81}])
    notes: list[tuple[str, str]] = []
    svc = service_from_manifest(_mutate(path, value)(base), notes)
    assert [n[0] for n in notes] == [reason]
    assert field in notes[0][1]
    assert svc.ports[0].name == "a"
    assert svc.external_ips == () and svc.rate_limit is None and svc.metrics is False
    assert not svc.limited and svc.limit_allowlist == ()


def test_limit_annotations() -> None:
    """Issue 19's annotations, read: nft's byte units (1024), optional bursts, an allowlist's ranges canonical."""
    notes: list[tuple[str, str]] = []
    svc = service_from_manifest(service("web", annotations={
        "kproxy.io/limit-connections": " 3 ", "kproxy.io/rate-limit-total": "50/second",
        "kproxy.io/rate-limit-total-burst": "10", "kproxy.io/bandwidth-limit": "1 mbytes/second",
        "kproxy.io/bandwidth-limit-burst": "128kbytes", "kproxy.io/limit-allowlist": " 10.1.2.3/8 ,FD00::1/64,,10.0.0.0/8"}),
        notes)
    assert notes == []
    assert svc.connection_limit == 3 and svc.rate_limit_total == RateLimit(50, "second", 10)
    assert svc.bandwidth_limit == BandwidthLimit(1024 * 1024, 128 * 1024)
    assert svc.limit_allowlist == ("10.0.0.0/8", "fd00::/64") and svc.limited
    plain = service_from_manifest(service("web", annotations={"kproxy.io/bandwidth-limit": "1500 kbytes/second"}), notes)
    assert plain.bandwidth_limit == BandwidthLimit(1500 * 1024) and plain.limited and notes == []


def test_one_bad_limit_annotation_leaves_the_others() -> None:
    """A bad limit is skipped with one note naming its annotation; the Service's other limits and ports stay."""
    notes: list[tuple[str, str]] = []
    svc = service_from_manifest(service("web", annotations={
        "kproxy.io/limit-connections": "3", "kproxy.io/bandwidth-limit": "fast", "kproxy.io/limit-allowlist": "10.0.0.0/8"}),
        notes)
    assert [(reason, message.split(":")[0]) for reason, message in notes] == [("invalid_annotation", "kproxy.io/bandwidth-limit")]
    assert svc.connection_limit == 3 and svc.bandwidth_limit is None and svc.limit_allowlist == ("10.0.0.0/8",)


@pytest.mark.parametrize("annotations, expected", [
    pytest.param({"kproxy.io/metrics": "true"}, True, id="true"),
    pytest.param({"kproxy.io/metrics": "false"}, False, id="false"),
    pytest.param({}, False, id="absent"),
])
def test_metrics_annotation_opts_a_service_in(annotations: dict[str, str], expected: bool) -> None:
    """``kproxy.io/metrics: "true"`` opts a Service in to per-Service series; "false" or nothing does not, silently."""
    notes: list[tuple[str, str]] = []
    assert service_from_manifest(service("web", annotations=annotations), notes).metrics is expected
    assert notes == []


def test_metrics_annotation_warning_says_what_happens() -> None:
    notes: list[tuple[str, str]] = []
    svc = service_from_manifest(service("web", annotations={"kproxy.io/metrics": "1"}), notes)
    assert svc.metrics is False
    assert notes == [("invalid_annotation", "kproxy.io/metrics: '1' is not \"true\" or \"false\"; "
                      "the Service exports no per-Service metrics")]


BAD_SLICES = [
    pytest.param(["addressType"], ["IPv4"], "family_mismatch", id="address-type-wrong-type"),
    pytest.param(["metadata", "labels"], {"kubernetes.io/service-name": "Web!"}, "invalid_name", id="bad-service-label"),
]


@pytest.mark.parametrize("path, value", [
    pytest.param(["addressType"], "FQDN", id="fqdn-slice"),
    pytest.param(["metadata", "labels"], {}, id="no-service-label"),
])
def test_slices_proxies_ignore_are_not_invalid(path: list[Any], value: Any) -> None:
    """Legal slices that no proxy uses (FQDN, no Service label) are left alone, not reported as invalid."""
    with pytest.raises(NotProxied):
        slice_from_manifest(_mutate(path, value)(endpoint_slice("web-1", "web", [endpoint("10.0.0.1")])))


@pytest.mark.parametrize("path, value, reason", BAD_SLICES)
def test_bad_slice_rejected(path: list[Any], value: Any, reason: str) -> None:
    """A malformed EndpointSlice raises InvalidObject with a metric reason."""
    base = endpoint_slice("web-1", "web", [endpoint("10.0.0.1")])
    with pytest.raises(InvalidObject) as info:
        slice_from_manifest(_mutate(path, value)(base))
    assert info.value.reason == reason


BAD_SLICE_PARTS = [
    pytest.param(["endpoints", 0], endpoint("10.0.0.1; drop"), "invalid_ip", id="bad-endpoint-ip"),
    pytest.param(["endpoints", 0], endpoint("fd00::1"), "family_mismatch", id="v6-in-v4-slice"),
    pytest.param(["endpoints", 0], endpoint("127.0.0.1"), "invalid_ip", id="loopback-endpoint"),
    pytest.param(["endpoints", 0], endpoint("10.0.0.1", node="Node A"), "invalid_name", id="bad-node-name"),
    pytest.param(["ports", 0], {"name": "http", "port": 0}, "invalid_port", id="port-zero"),
]


@pytest.mark.parametrize("path, value, reason", BAD_SLICE_PARTS)
def test_bad_endpoint_or_slice_port_skipped(path: list[Any], value: Any, reason: str) -> None:
    """A bad endpoint or port of a slice is skipped with a note; the rest of the slice is kept."""
    base = endpoint_slice("web-1", "web", [endpoint("10.0.0.1"), endpoint("10.0.0.2")],
                          ports=[{"name": "http", "port": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    notes: list[tuple[str, str]] = []
    eps = slice_from_manifest(_mutate(path, value)(base), notes)
    assert [n[0] for n in notes] == [reason]
    assert path[0] + "[0]" in notes[0][1]
    assert len(eps.endpoints) + len(eps.ports) == 3


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
    assert (second.ready, second.serving, second.terminating) == (False, True, True), "unset serving is true"
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


def test_node_pod_cidrs() -> None:
    """spec.podCIDRs (else spec.podCIDR), canonical; a bad one is noted and skipped, never the Node."""
    assert node_from_manifest(node(pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"])).pod_cidrs == (
        "10.244.1.0/24", "fd00:10:244:1::/64")
    only_old = node()
    only_old["spec"]["podCIDR"] = "10.244.2.1/24"
    assert node_from_manifest(only_old).pod_cidrs == ("10.244.2.0/24",)
    assert node_from_manifest(node()).pod_cidrs == ()
    notes: list[tuple[str, str]] = []
    bad = node(pod_cidrs=["10.244.3.0/24", "nope"])
    assert node_from_manifest(bad, notes).pod_cidrs == ("10.244.3.0/24",)
    assert notes and notes[0][0] == "invalid_cidr" and "spec.podCIDRs[1]" in notes[0][1]
    bad["spec"]["podCIDRs"] = "10.244.3.0/24"
    assert node_from_manifest(bad, notes).pod_cidrs == ()


def test_build_cluster_skips_only_bad_objects() -> None:
    """One bad Service and one bad slice are reported; everything else is kept."""
    objects = [
        service("good", cluster_ip="10.96.0.1"),
        service("bad", cluster_ip="10.96.0.999"),
        endpoint_slice("good-1", "good", [endpoint("10.0.0.1")]),
        endpoint_slice("bad-1", "bad", [endpoint("nope")], address_type="IPv5"),
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
        ("EndpointSlice", "default/bad-1", "family_mismatch"),
        ("Service", "default/bad", "invalid_ip"),
    ]
    assert "default/bad" in str(problems[1]) or "default/bad" in str(problems[0])


def test_duplicates_and_conflicts_are_named() -> None:
    """Two objects with one name, and two Services on one address:port or NodePort, each give a warning naming both."""
    objects = [
        service("a", cluster_ip="10.96.0.1"),
        service("a", cluster_ip="10.96.0.2"),
        service("b", cluster_ip="10.96.0.3", type="NodePort", externalIPs=["198.51.100.1"],
                ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
        service("c", cluster_ip="10.96.0.4", type="NodePort", externalIPs=["198.51.100.1"],
                ports=[{"name": "http", "port": 80, "nodePort": 30080}]),
    ]
    cluster, problems = build_cluster(objects, "node-a")
    assert cluster.services["default/a"].cluster_ips == ("10.96.0.2",), "the last definition is used"
    texts = sorted(str(p) for p in problems)
    assert any("default/a" in t and "defined 2 times" in t for t in texts)
    conflicts = [t for t in texts if "both claim" in t]
    assert len(conflicts) == 2, texts
    assert any("198.51.100.1 tcp/80" in t for t in conflicts) and any("NodePort tcp/30080" in t for t in conflicts)
    assert all("default/b gets it" in t and "default/c" in t for t in conflicts)



def test_the_daemons_frontend_index_names_a_conflict_when_it_starts_and_once() -> None:
    """One Service at a time (the daemon's FrontendIndex): a Service alone on its frontends is no news; a second one
    on its ClusterIP port is named once, not again on an unchanged update, and again once the winner comes back."""
    a = service_from_manifest(service("a", cluster_ip="10.96.0.1"))
    b = service_from_manifest(service("b", cluster_ip="10.96.0.1", type="NodePort",
                                      ports=[{"name": "http", "port": 80, "nodePort": 30080}]))
    index = FrontendIndex(["192.168.50.1"])
    assert index.update(a.key, a) == []
    assert [str(c) for c in index.update(b.key, b)] == [
        "Services default/a and default/b both claim 10.96.0.1 tcp/80; default/a gets it (the first by namespace/name), "
        "default/b does not"]
    assert index.update(b.key, b) == [], "nothing new"
    assert index.update(a.key, None) == []
    assert index.neighbours({b.key}) == set()
    assert [(c.frontend, c.winner, c.loser) for c in index.update(a.key, a)] == [("10.96.0.1 tcp/80", a.key, b.key)]
    assert index.neighbours({a.key}) == {b.key}

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


def test_zone_hint_names_are_label_values() -> None:
    """Zone hints are label values for the API server ('AZ1', 'Zone_A'): endpoints carrying them are kept."""
    notes: list[tuple[str, str]] = []
    eps = slice_from_manifest(endpoint_slice("web-1", "web", [
        endpoint("10.244.1.1", zone="AZ1", for_zones=["AZ1"]),
        endpoint("10.244.1.2", zone="Zone_A", for_zones=["Zone_A", "not a zone!"])], namespace="ns"), notes)
    assert [e.hint_zones for e in eps.endpoints] == [frozenset({"AZ1"}), frozenset({"Zone_A"})]
    assert [reason for reason, _ in notes] == ["invalid_name"], "a bad hint is skipped alone"


def test_repeated_port_protocol_or_node_port_in_one_service_is_named() -> None:
    """What the API server refuses inside one Service (a port or NodePort twice for a protocol) is skipped and named."""
    notes: list[tuple[str, str]] = []
    svc = service_from_manifest(service("dup", "ns", "10.96.100.2", type="NodePort", ports=[
        {"name": "a", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "b", "port": 80, "protocol": "TCP", "nodePort": 30081},
        {"name": "c", "port": 81, "protocol": "TCP", "nodePort": 30080},
        {"name": "d", "port": 80, "protocol": "UDP", "nodePort": 30080}]), notes)
    assert [p.name for p in svc.ports] == ["a", "d"]
    assert [m.split(":")[1].strip().split(" ")[1] for _, m in notes] == ["port", "nodePort"]


def test_rate_limit_burst_the_kernel_would_refuse_is_a_skipped_annotation() -> None:
    """A burst whose bucket overflows 64 bits in the kernel is refused here, as an annotation, not as a Service."""
    notes: list[tuple[str, str]] = []
    limit = {"kproxy.io/rate-limit": "1/minute"}
    ok = service_from_manifest(service("rl", "ns", "10.96.100.1",
                                       annotations={**limit, "kproxy.io/rate-limit-burst": "307445734"}), notes)
    assert ok.rate_limit is not None and not notes
    over = service_from_manifest(service("rl", "ns", "10.96.100.1",
                                         annotations={**limit, "kproxy.io/rate-limit-burst": "307445735"}), notes)
    assert over.rate_limit is None and [r for r, _ in notes] == ["invalid_annotation"]


def test_flow_style_yaml_and_json_streams_are_read() -> None:
    """Both are YAML that kubectl apply -f reads: JSON that is not one document is read as YAML."""
    flow = "{apiVersion: v1, kind: Service, metadata: {name: a, namespace: ns}, spec: {clusterIP: 10.96.1.1}}\n"
    assert [o["metadata"]["name"] for o in parse_manifests(flow, "flow.yaml")] == ["a"]
    one = json.dumps(service("a", "ns", "10.96.1.1"))
    assert len(parse_manifests(one + "\n---\n" + one, "stream.yaml")) == 2


def test_yaml_merge_keys_and_aliases_as_pyyaml_reads_them() -> None:
    """The event reader builds what PyYAML's safe loader builds for plain data (merge keys, aliases, scalars)."""
    import yaml

    text = "a: &x {b: 1, c: [true, null, 1.5, 0x10, '07']}\nd: *x\ne: {<<: *x, b: 2}\nf: 2026-01-01T00:00:00Z\n"
    ours = parse_manifests(text, "x.yaml")[0]
    theirs = yaml.safe_load(text)
    theirs["f"] = "2026-01-01T00:00:00Z"  # timestamps stay strings here
    assert ours == theirs


def test_source_ranges_are_trimmed_as_the_api_server_validates_them() -> None:
    """A range with white space around it is legal (the API server trims it to validate it): it is kept, trimmed."""
    cluster, problems = build_cluster([service("lb", cluster_ip="10.96.0.9", type="LoadBalancer",
                                               loadBalancerSourceRanges=[" 203.0.113.0/25", "10.0.0.0/8\t", " "])], "node-a")
    assert problems == []
    assert cluster.services["default/lb"].load_balancer_source_ranges == ("203.0.113.0/25", "10.0.0.0/8")
