"""Hypothesis at the raw-manifest level: any value of any type in any field.

Whatever a manifest holds, conversion raises only ``InvalidObject`` (or
``NotProxied``), every Service it accepts compiles, and the compiled ruleset
renders as nft text and encodes as netlink messages without an exception.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.cluster.convert import (
    InvalidObject,
    NotProxied,
    node_from_manifest,
    service_from_manifest,
    slice_from_manifest,
)
from kproxy.cluster.model import Cluster
from kproxy.nft import netlink as nfnetlink
from kproxy.nft.objects import Transaction
from kproxy.rules.compiler import NodeInfo, ProxyConfig, compile_ruleset
from kproxy.rules.plan import plan
from tests.harness.builders import endpoint, endpoint_slice, node, service

NODE = NodeInfo("node-a", "zone-a", ("192.168.50.1", "fd00:50::1"), ("192.168.50.1", "fd00:50::1"))
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))

BASE_SERVICE = service(
    "web", "ns", ["10.96.0.5", "fd00::5"], ipFamilies=["IPv4", "IPv6"], type="LoadBalancer",
    ports=[{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"},
           {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}],
    externalIPs=["198.51.100.1"], loadBalancerSourceRanges=["203.0.113.0/24"], externalTrafficPolicy="Local",
    internalTrafficPolicy="Cluster", healthCheckNodePort=31000, sessionAffinity="ClientIP",
    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}, trafficDistribution="PreferClose",
    annotations={"kproxy.io/rate-limit": "10/second", "kproxy.io/rate-limit-burst": "20"},
    labels={"app": "web"},
    status={"loadBalancer": {"ingress": [{"ip": "192.0.2.1", "ipMode": "VIP"}]}},
)
BASE_SLICE = endpoint_slice(
    "web-1", "web", [endpoint("10.244.1.5", zone="zone-a", for_zones=["zone-a"], for_nodes=["node-a"]),
                     endpoint("10.244.2.5", node="node-b", ready=False, serving=True, terminating=True)],
    namespace="ns", ports=[{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
    annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T10:00:00Z"},
)
BASE_NODE = node("node-a", ["192.168.50.1", "fd00:50::1"])


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a manifest (mapping keys and list indexes)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


_tricky_text = st.sampled_from([
    "", " ", "\n", "web\n", "10.96.0.5\n", "fd00::5%eth0", "0.0.0.0", "::", "127.0.0.1", "224.0.0.1", "::ffff:1.2.3.4",
    '" ; flush ruleset', "}", "{", "a" * 64, "a" * 254, "TCP", "UDP", "SCTP", "Local", "Cluster", "ClientIP", "None",
    "IPv4", "IPv6", "FQDN", "1/second", "0/second", "99999999999/minute", "10.0.0.0/8", "10.0.0.0/33", "-1", "\x00",
    "\u0435", "PreferClose", "ExternalName", "NodePort", "LoadBalancer", "Proxy",
])
_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20) | _tricky_text
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | _tricky_text, inner, max_size=3), max_leaves=8)


@st.composite
def _mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with a few of its fields (or new fields beside them) replaced by anything."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        target = obj
        for key in path[:-1]:
            target = target[key]
        if not isinstance(target, (dict, list)):
            continue
        if isinstance(target, dict) and draw(st.booleans()):
            target[draw(st.sampled_from(["ports", "endpoints", "addresses", "hints", "conditions", "nodeName",
                                         "clusterIPs", "ipFamilies", "externalIPs", "annotations", "labels"]))] = draw(_values)
        else:
            target[path[-1]] = draw(_values)
    if draw(st.integers(0, 9)) == 0:
        return draw(_values)  # not even a mapping
    return obj


def _compile_and_encode(cluster: Cluster) -> None:
    failed: dict[str, str] = {}
    ruleset = compile_ruleset(cluster, NODE, CONFIG, failed)  # type: ignore[arg-type]
    assert failed == {}, f"a converted Service must compile: {failed}"
    tx = plan(None, ruleset)
    str(tx)  # the nft text (--dry-run)
    sendable = Transaction([op for op in tx.ops if nfnetlink.encodable_op(op)])
    if sendable.ops:
        nfnetlink.encode(sendable)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_mutated(BASE_SERVICE), _mutated(BASE_SLICE), _mutated(BASE_NODE))
def test_any_manifest_converts_compiles_and_encodes(raw_service: Any, raw_slice: Any, raw_node: Any) -> None:
    """No exception but InvalidObject escapes conversion; what converts compiles, renders and encodes."""
    services, slices, node_ = {}, {}, None
    notes: list[tuple[str, str]] = []
    try:
        svc = service_from_manifest(raw_service, notes)
        services[svc.key] = svc
    except (InvalidObject, NotProxied):
        pass
    try:
        eps = slice_from_manifest(raw_slice, notes)
        slices[eps.key] = eps
    except (InvalidObject, NotProxied):
        pass
    try:
        node_ = node_from_manifest(raw_node, notes)
    except InvalidObject:
        pass
    assert all(isinstance(reason, str) and isinstance(message, str) and "\n" not in reason for reason, message in notes)
    _compile_and_encode(Cluster(services, slices, node_))
