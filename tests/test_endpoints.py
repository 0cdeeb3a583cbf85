"""Endpoint selection: every rule of upstream's topology.go and endpointslicecache.go."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.cluster.convert import service_from_manifest, slice_from_manifest
from kproxy.rules.endpoints import PREFER_SAME_NODE, PREFER_SAME_ZONE, port_endpoints, select
from tests.harness.builders import endpoint, endpoint_slice, service

NODE = "node-a"
ZONE = "zone-a"


def _select(svc_spec: dict[str, Any], endpoints: list[dict[str, Any]], *extra_slices: list[dict[str, Any]]):
    svc = service_from_manifest(service("web", **svc_spec))
    slices = [slice_from_manifest(endpoint_slice("web-1", "web", endpoints))]
    for i, eps in enumerate(extra_slices, 2):
        slices.append(slice_from_manifest(endpoint_slice(f"web-{i}", "web", eps)))
    return select(svc, port_endpoints(svc.ports[0], slices, 4), NODE, ZONE)


def _ips(eps) -> list[str]:
    return [pe.address for pe in eps]


CASES = [
    pytest.param(
        {},
        [endpoint("10.0.0.1"), endpoint("10.0.0.2", node="node-b")],
        ["10.0.0.1", "10.0.0.2"], [], True, "",
        id="ready-endpoints-all-used",
    ),
    pytest.param(
        {},
        [endpoint("10.0.0.1", ready=False, serving=False), endpoint("10.0.0.2")],
        ["10.0.0.2"], [], True, "",
        id="not-ready-excluded",
    ),
    pytest.param(
        {},
        [endpoint("10.0.0.1", ready=None), endpoint("10.0.0.2", ready=False)],
        ["10.0.0.1"], [], True, "",
        id="ready-nil-means-ready",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
            endpoint("10.0.0.2", ready=False, serving=False, terminating=True),
        ],
        ["10.0.0.1"], [], True, "",
        id="terminating-fallback-when-nothing-ready",
    ),
    pytest.param(
        {},
        [endpoint("10.0.0.1", ready=False, serving=True, terminating=True), endpoint("10.0.0.2")],
        ["10.0.0.2"], [], True, "",
        id="terminating-ignored-while-something-ready",
    ),
    pytest.param(
        {},
        [endpoint("10.0.0.1", ready=False, serving=False, terminating=True)],
        [], [], False, "",
        id="nothing-usable",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", for_zones=["zone-a"]),
            endpoint("10.0.0.2", node="node-b", for_zones=["zone-b"]),
        ],
        ["10.0.0.1"], [], True, PREFER_SAME_ZONE,
        id="zone-hints-narrow-to-same-zone",
    ),
    pytest.param(
        {"trafficDistribution": "PreferClose"},
        [
            endpoint("10.0.0.1", for_zones=["zone-a"]),
            endpoint("10.0.0.2", node="node-b", for_zones=["zone-b"]),
            endpoint("10.0.0.3", node="node-b"),
        ],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"], [], True, "",
        id="one-unhinted-endpoint-disables-zone-topology",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", for_zones=["zone-b"]),
            endpoint("10.0.0.2", node="node-b", for_zones=["zone-b"]),
        ],
        ["10.0.0.1", "10.0.0.2"], [], True, "",
        id="no-hint-for-this-zone-falls-back-to-all",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", for_zones=["zone-a"]),
            endpoint("10.0.0.2", ready=False, serving=False),
            endpoint("10.0.0.3", node="node-b", for_zones=["zone-b"]),
        ],
        ["10.0.0.1"], [], True, PREFER_SAME_ZONE,
        id="unready-endpoint-without-hint-does-not-disable-topology",
    ),
    pytest.param(
        {"trafficDistribution": "PreferSameNode"},
        [
            endpoint("10.0.0.1", for_zones=["zone-a"], for_nodes=["node-a"]),
            endpoint("10.0.0.2", node="node-c", for_zones=["zone-a"], for_nodes=["node-c"]),
        ],
        ["10.0.0.1"], [], True, PREFER_SAME_NODE,
        id="node-hints-narrow-to-same-node",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", node="node-b", for_zones=["zone-a"], for_nodes=["node-b"]),
            endpoint("10.0.0.2", node="node-c", for_zones=["zone-b"], for_nodes=["node-c"]),
        ],
        ["10.0.0.1"], [], True, PREFER_SAME_ZONE,
        id="no-node-hint-for-this-node-falls-back-to-zone",
    ),
    pytest.param(
        {},
        [
            endpoint("10.0.0.1", for_zones=["zone-a"], for_nodes=["node-a"]),
            endpoint("10.0.0.2", node="node-b", for_zones=["zone-a"]),
        ],
        ["10.0.0.1", "10.0.0.2"], [], True, PREFER_SAME_ZONE,
        id="partial-node-hints-fall-back-to-zone-hints",
    ),
    pytest.param(
        {"internalTrafficPolicy": "Local"},
        [endpoint("10.0.0.1"), endpoint("10.0.0.2", node="node-b")],
        [], ["10.0.0.1"], True, "",
        id="internal-local-uses-local-endpoints-only",
    ),
    pytest.param(
        {"internalTrafficPolicy": "Local"},
        [endpoint("10.0.0.2", node="node-b")],
        [], [], True, "",
        id="internal-local-without-local-endpoint-still-has-endpoints",
    ),
    pytest.param(
        {"internalTrafficPolicy": "Local"},
        [
            endpoint("10.0.0.1", ready=False, serving=True, terminating=True),
            endpoint("10.0.0.2", node="node-b"),
        ],
        [], ["10.0.0.1"], True, "",
        id="local-terminating-fallback-even-if-remote-ready",
    ),
    pytest.param(
        {"internalTrafficPolicy": "Local"},
        [
            endpoint("10.0.0.1", for_zones=["zone-b"]),
            endpoint("10.0.0.2", node="node-b", for_zones=["zone-b"]),
        ],
        [], ["10.0.0.1"], True, "",
        id="local-policy-overrides-topology",
    ),
    pytest.param(
        {"type": "NodePort", "externalTrafficPolicy": "Local"},
        [endpoint("10.0.0.1"), endpoint("10.0.0.2", node="node-b")],
        ["10.0.0.1", "10.0.0.2"], ["10.0.0.1"], True, "",
        id="external-local-has-cluster-and-local",
    ),
    pytest.param(
        {"externalTrafficPolicy": "Local"},
        [endpoint("10.0.0.1"), endpoint("10.0.0.2", node="node-b")],
        ["10.0.0.1", "10.0.0.2"], [], True, "",
        id="external-policy-ignored-when-not-externally-accessible",
    ),
    pytest.param(
        {"type": "NodePort", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"},
        [endpoint("10.0.0.2", node="node-b")],
        ["10.0.0.2"], [], True, "",
        id="both-local-without-local-endpoints-keeps-cluster-endpoints-for-short-circuit",
    ),
]


@pytest.mark.parametrize("spec, endpoints, cluster, local, has_any, topology", CASES)
def test_selection(spec, endpoints, cluster, local, has_any, topology) -> None:
    """Each upstream selection rule picks exactly the expected endpoints."""
    selection = _select(spec, endpoints)
    assert _ips(selection.cluster) == cluster
    assert _ips(selection.local) == local
    assert selection.has_any is has_any
    assert selection.topology == topology


def test_duplicate_endpoint_across_slices_kept_once() -> None:
    """An address in two slices is one endpoint; a ready copy beats an unready one."""
    selection = _select(
        {},
        [endpoint("10.0.0.1", ready=False, serving=False), endpoint("10.0.0.2")],
        [endpoint("10.0.0.1"), endpoint("10.0.0.2")],
    )
    assert _ips(selection.cluster) == ["10.0.0.1", "10.0.0.2"]


def test_port_matched_by_name_and_protocol() -> None:
    """Endpoint ports come from the slice port with the Service port's name and protocol."""
    svc = service_from_manifest(
        service("dns", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53}])
    )
    eps = slice_from_manifest(
        endpoint_slice(
            "dns-1",
            "dns",
            [endpoint("10.0.0.1")],
            ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}],
        )
    )
    udp, tcp = (port_endpoints(p, [eps], 4) for p in svc.ports)
    assert [pe.port for pe in udp] == [5353]
    assert [pe.port for pe in tcp] == [5354]


def test_slices_of_other_family_ignored() -> None:
    """An IPv6 slice does not feed the IPv4 table."""
    svc = service_from_manifest(service("web", cluster_ip=["10.96.0.1", "fd00::1"], ipFamilies=["IPv4", "IPv6"]))
    v6 = slice_from_manifest(endpoint_slice("web-6", "web", [endpoint("fd00:1::5")], address_type="IPv6"))
    assert port_endpoints(svc.ports[0], [v6], 4) == []
    assert [pe.address for pe in port_endpoints(svc.ports[0], [v6], 6)] == ["fd00:1::5"]
