"""Synthetic clusters at the sizes users run, shared by every benchmark.

A cluster of N Services x E endpoints mixes what real clusters have: mostly
ClusterIP, one in five NodePort (among the first 11,000: NodePorts are unique
and the default range holds 2,768), one in twenty with ClientIP affinity, one
in twenty with externalTrafficPolicy Local, endpoints spread over 50 nodes.
Objects are plain manifests, so the benchmark pays for conversion too.
"""

from __future__ import annotations

from typing import Any

NODE_NAME = "node-0"
NODEPORT_LIMIT = 11_000


def service_manifest(i: int, generation: int = 0) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "clusterIP": f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }
    spec["clusterIPs"] = [spec["clusterIP"]]
    # NodePorts are unique and stay inside the default range 30000-32767, so
    # only the first 11,000 Services can have one (2,750 NodePorts).
    if i % 5 == 0 and i < NODEPORT_LIMIT:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 30000 + i // 5
    if i % 20 == 1:
        spec["sessionAffinity"] = "ClientIP"
    if i % 20 == 5 and i < NODEPORT_LIMIT:
        spec["type"] = "NodePort"
        spec["ports"][0]["nodePort"] = 32200 + i // 20
        spec["externalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 100}"},
        "spec": spec,
    }


def endpoint_address(i: int, j: int, endpoints: int) -> str:
    n = i * endpoints + j
    return f"10.{128 + n // 65536}.{(n // 256) % 256}.{n % 256}"


def slice_manifest(i: int, endpoints: int, generation: int = 0) -> dict[str, Any]:
    eps = []
    for j in range(endpoints):
        eps.append({
            "addresses": [endpoint_address(i, j, endpoints)],
            "conditions": {"ready": True},
            "nodeName": f"node-{(i + j) % 50}",
        })
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-abcde",
            "namespace": f"ns-{i % 100}",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080 + generation, "protocol": "TCP"}],
        "endpoints": eps,
    }


def node_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]},
    }


def cluster_objects(services: int, endpoints: int) -> list[dict[str, Any]]:
    objects = [node_manifest()]
    for i in range(services):
        objects.append(service_manifest(i))
        objects.append(slice_manifest(i, endpoints))
    return objects
