"""Small builders for the manifests the tests feed kproxy.

They produce plain dicts shaped exactly like ``kubectl get -o yaml`` output, so
the tests exercise the same conversion the CLI and the watcher use.
"""

from __future__ import annotations

from typing import Any


def service(
    name: str,
    namespace: str = "default",
    cluster_ip: str | list[str] = "10.96.0.1",
    ports: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": ports if ports is not None else [{"name": "http", "port": 80, "protocol": "TCP"}],
            **spec,
        },
    }
    if labels:
        body["metadata"]["labels"] = labels
    if annotations:
        body["metadata"]["annotations"] = annotations
    if status:
        body["status"] = status
    return body


def endpoint(
    address: str,
    node: str | None = "node-a",
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    zone: str | None = None,
    for_zones: list[str] | None = None,
    for_nodes: list[str] | None = None,
) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None:
        conditions["serving"] = serving
    if terminating is not None:
        conditions["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if node is not None:
        ep["nodeName"] = node
    if zone is not None:
        ep["zone"] = zone
    hints: dict[str, Any] = {}
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if hints:
        ep["hints"] = hints
    return ep


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: list[dict[str, Any]],
    namespace: str = "default",
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }
    if annotations:
        body["metadata"]["annotations"] = annotations
    return body


def node(
    name: str = "node-a",
    addresses: list[str] | None = None,
    zone: str | None = "zone-a",
    taints: list[dict[str, Any]] | None = None,
    deleting: bool = False,
    pod_cidrs: list[str] | None = None,
) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if zone:
        labels["topology.kubernetes.io/zone"] = zone
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints or []},
        "status": {
            "addresses": [{"type": "InternalIP", "address": a} for a in (addresses or ["192.168.50.1"])]
        },
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    if pod_cidrs:
        body["spec"]["podCIDR"] = pod_cidrs[0]
        body["spec"]["podCIDRs"] = pod_cidrs
    return body
