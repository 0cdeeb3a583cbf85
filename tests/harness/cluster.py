"""A multi-node Kubernetes-like cluster in network namespaces, with kproxy on every node.

``./dev cluster`` builds one to try kproxy by hand; ``tests/test_e2e.py`` runs the
end-to-end tests on one.  Everything lives in network namespaces named
``kpc-<6 hex>-<role>``, all of them deleted by :meth:`Cluster.close` (also after a
failed build, and on Ctrl-C / SIGTERM / SIGHUP in ``./dev cluster``).

Topology (3 nodes, 2 zones; every address is private and exists only in these
namespaces)::

                 fabric ns: bridge br0 192.168.60.1/24 fd00:60::1/64
                 (the underlay; the test API server listens here, on :6443)
          +-------------+--------------+--------------+--------------+
         eth0          eth0           eth0           eth0
    node-1 (zone-a)  node-2 (zone-b)  node-3 (zone-a)  client (external)
    192.168.60.11    192.168.60.12    192.168.60.13    192.168.60.100
    fd00:60::11      fd00:60::12      fd00:60::13      fd00:60::100
    pods 10.244.1.0/24 10.244.2.0/24  10.244.3.0/24    (pod CIDRs unreachable)
         fd00:244:0:1::/64 ...

* A **node** is a namespace with the underlay interface ``eth0``, IPv4/IPv6
  forwarding, a default route via the fabric, its own pod CIDR routed to its pods
  and every other node's pod CIDR routed via that node's underlay address (what a
  simple CNI such as flannel's host-gw does).
* A **pod** is a namespace behind its node on a routed veth (as in
  ``tests/harness/netbed.py``: the pod has a /32 and /128, its default route goes
  to the node), running ``trafficd.py serve`` named after the pod: TCP 8080 and
  UDP 5353 (and the Services map 80 -> 8080, 53 -> 5353) answer
  ``<pod name> <source IP seen>``.
* One **test API server** (:class:`tests.harness.fakeapi.FakeKubeAPI`, in this
  process) listens on the fabric's bridge address, so every node reaches it over
  the underlay.  It holds the Nodes (zone labels, InternalIPs, podCIDRs), a
  ServiceCIDR, the Services (ClusterIPs, NodePorts and healthCheckNodePorts
  allocated here as the real API server does) and EndpointSlices.
* :class:`EndpointSliceController` builds the EndpointSlices from the pods, as
  kube-controller-manager's endpointslice controller does: one slice per
  address family, ready/serving/terminating conditions, nodeName, zone,
  targetRef, and the hints of ``trafficDistribution`` (PreferClose: each ready
  endpoint hinted for its own zone).  The cluster calls it after every change
  of pods or Services, as the controller would react to them.
* A **kproxy daemon** per node (:class:`KproxyDaemon`): ``python -m kproxy`` in the
  node namespace with the container args and the ConfigMap of ``daemonset.yaml``
  (clusterCIDR set to this cluster's pod CIDRs), ``NODE_NAME`` in the
  environment, and a kubeconfig instead of the in-cluster ServiceAccount.  Its
  log goes to ``<workdir>/logs/<node>.log``; its metrics (127.0.0.1:10249) and
  health (0.0.0.0:10256) are served in the node namespace.
* An **external client** namespace on the underlay, and :class:`LoadBalancer`,
  a client-side load balancer in it that sends to the NodePorts of the nodes
  whose health check answers 200 (the Service's healthCheckNodePort for
  ``externalTrafficPolicy: Local``, kproxy's ``/healthz`` on 10256 otherwise).

Use :func:`build_cluster` (a context manager) or ``Cluster(...).build()`` and
``close()``.  ``python -m tests.harness.cluster --help`` is the command line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness import netbed
from tests.harness.daemonbed import wait_until
from tests.harness.fakeapi import FakeKubeAPI
from tests.harness.netbed import Netns, Results, Server

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
NS_PREFIX = "kpc-"
NAMESPACE = "default"

UNDERLAY4, UNDERLAY6 = "192.168.60.0/24", "fd00:60::/64"
FABRIC_IP4, FABRIC_IP6 = "192.168.60.1", "fd00:60::1"
CLIENT_IP4, CLIENT_IP6 = "192.168.60.100", "fd00:60::100"
API_PORT = 6443
CLUSTER_CIDR4, CLUSTER_CIDR6 = "10.244.0.0/16", "fd00:244::/48"
SERVICE_CIDR4, SERVICE_CIDR6 = "10.96.0.0/16", "fd00:96::/112"
NODE_PORT_FIRST = 30000
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
TCP_TARGET, UDP_TARGET = 8080, 5353
DEFAULT_PORTS = ({"name": "http", "port": 80, "targetPort": TCP_TARGET, "protocol": "TCP"},
                 {"name": "dns", "port": 53, "targetPort": UDP_TARGET, "protocol": "UDP"})
ZONE_LABEL = "topology.kubernetes.io/zone"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"


def zone_name(i: int) -> str:
    """zone-a, zone-b, ... for 0, 1, ..."""
    return "zone-" + "abcdefghijklmnopqrstuvwxyz"[i]


def _ip_pattern(ip: str) -> re.Pattern[str]:
    """A regex finding ``ip`` as a whole address in nft output (10.244.1.11 must not match 10.244.1.110)."""
    if ":" in ip:
        return re.compile(rf"(?<![0-9a-f:]){re.escape(ip)}(?![0-9a-f:])")
    return re.compile(rf"(?<![0-9.]){re.escape(ip)}(?![0-9])")


# ----------------------------------------------------------------------------- topology objects


@dataclass(eq=False)
class Node:
    """A node: a network namespace on the underlay, routing its own pod CIDR."""

    name: str
    index: int
    zone: str
    netns: Netns
    ip4: str
    ip6: str
    pod_cidr4: str
    pod_cidr6: str
    kproxy: KproxyDaemon | None = field(default=None, repr=False)
    next_host: int = field(default=10, repr=False)

    @property
    def gw4(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr4)[1])

    @property
    def gw6(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr6)[1])

    @property
    def ips(self) -> tuple[str, str]:
        return (self.ip4, self.ip6)

    def ip(self, family: int = 4) -> str:
        return self.ip4 if family == 4 else self.ip6

    def manifest(self) -> dict[str, Any]:
        """The Node object, as the kubelet and the node IPAM controller fill it in."""
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": {
                "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                ZONE_LABEL: self.zone, "topology.kubernetes.io/region": "region-1"}},
            "spec": {"podCIDR": self.pod_cidr4, "podCIDRs": [self.pod_cidr4, self.pod_cidr6]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": self.ip4},
                              {"type": "InternalIP", "address": self.ip6},
                              {"type": "Hostname", "address": self.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        }


@dataclass(eq=False)
class Pod:
    """A pod: a network namespace behind its node, with an echo server named after it."""

    name: str
    node: Node
    netns: Netns
    ip4: str
    ip6: str
    host_veth: str
    labels: dict[str, str]
    ready: bool = True
    """The pod's Ready condition (its readiness probe passes)."""
    terminating: bool = False
    """The pod is being deleted (deletionTimestamp set) but still runs."""
    uid: str = field(default_factory=lambda: secrets.token_hex(8))
    server: Server | None = field(default=None, repr=False)

    @property
    def node_name(self) -> str:
        return self.node.name

    @property
    def zone(self) -> str:
        return self.node.zone

    @property
    def ips(self) -> tuple[str, str]:
        return (self.ip4, self.ip6)

    def ip(self, family: int = 4) -> str:
        return self.ip4 if family == 4 else self.ip6

    def connect_many(self, dst: str, port: int, count: int = 1, proto: str = "tcp", timeout: float = 2.5,
                     **kw: Any) -> Results:
        """Connections from this pod (see ``Netns.connect_many``)."""
        return self.netns.connect_many(dst, port, count, proto, timeout, **kw)


# ----------------------------------------------------------------------------- kproxy daemons


def daemonset_spec(path: Path = ROOT / "daemonset.yaml") -> tuple[list[str], dict[str, Any]]:
    """The kproxy container's args and the KubeProxyConfiguration of the ConfigMap, from daemonset.yaml."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    container = next(c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "kproxy")
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kproxy-config")
    return list(container["args"]), yaml.safe_load(configmap["data"]["config.yaml"])


class KproxyDaemon:
    """The kproxy DaemonSet pod of one node: ``python -m kproxy`` in the node namespace (hostNetwork).

    Started with the container args of daemonset.yaml (``--config`` pointing at a
    copy of the ConfigMap's file, ``--hostname-override=$(NODE_NAME)``), NODE_NAME in
    the environment, and ``--kubeconfig`` for the test API server (there is no
    ServiceAccount token).  stdout and stderr go to ``log_path``; every start
    appends a ``----- kproxy start N -----`` line first.
    """

    def __init__(self, cluster: Cluster, node: Node) -> None:
        self.cluster = cluster
        self.node = node
        self.log_path = cluster.workdir / "logs" / f"{node.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        args, _ = daemonset_spec()
        out = []
        for arg in args:
            arg = arg.replace("$(NODE_NAME)", self.node.name)
            if arg.startswith("--config="):
                arg = f"--config={self.cluster.config_path}"
            out.append(arg)
        return [PYTHON, "-m", "kproxy", *out, f"--kubeconfig={self.cluster.kubeconfig}"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"kproxy on {self.node.name} is already running")
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"----- kproxy start {self.starts} at {time.strftime('%H:%M:%S')} -----\n".encode())
            log.flush()
            self.proc = self.node.netns.popen(*self.argv(), track=False, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=str(ROOT),
                                              env=dict(os.environ, NODE_NAME=self.node.name, PYTHONUNBUFFERED="1"))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``signum`` (SIGTERM: a clean stop; SIGKILL: a crash) and wait; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            # ip netns exec execs the command: the Popen's pid is kproxy's own.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: the pod dies without cleaning up (rules stay in the kernel)."""
        return self.stop(signal.SIGKILL)

    def restart(self, signum: int = signal.SIGTERM) -> None:
        self.stop(signum)
        self.start()

    # -- observation

    def http_get(self, path: str, host: str = "127.0.0.1", port: int = METRICS_PORT,
                 timeout: float = 3.0) -> tuple[int, str]:
        """GET from inside the node namespace; (0, error) when nothing answers."""
        with self.node.netns.entered():
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read().decode(errors="replace")
            except OSError as exc:
                return 0, f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()

    def metrics_text(self) -> str:
        status, body = self.http_get("/metrics")
        return body if status == 200 else ""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: {(name, sorted labels): value}; empty when it does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def samples(self, name: str, **labels: str) -> list[float]:
        """The values of the samples of ``name`` matching ``labels``.

        kproxy shares a /metrics body for a second (kproxy/observe/exposition.py):
        a change less than a second after the last scrape may not show yet.
        """
        return [v for (n, ls), v in self.metrics().items()
                if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items())]

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of ``name`` matching ``labels``; None if there is none."""
        values = self.samples(name, **labels)
        return sum(values) if values else None

    def healthz(self, path: str = "/healthz") -> int:
        """The HTTP status of /healthz on the node's health port (0: no answer)."""
        return self.http_get(path, port=HEALTHZ_PORT)[0]

    def last_sync(self) -> float:
        """kubeproxy_sync_proxy_rules_last_timestamp_seconds, the older of the two families (0 before the first
        sync or when down)."""
        return min(self.samples("kubeproxy_sync_proxy_rules_last_timestamp_seconds"), default=0.0)

    def wait_synced(self, timeout: float = 30.0, after: float = 0.0) -> float:
        """Wait for a sync that ended after ``after`` (a time.time()); returns its timestamp."""
        return wait_until(lambda: self.running and (t := self.last_sync()) > after and t, timeout,
                          f"a sync of kproxy on {self.node.name}\n{self.tail()}", interval=0.2)

    def pending_operations(self) -> int:
        """How many nft operations this node's next sync would send (0: its kernel matches the API server).

        What ``kproxy --dry-run --diff`` computes, in-process: the objects the
        daemon watches (from the test API server), converted and compiled for
        this node with the daemon's own configuration, against the live tables.
        The ClusterIPs of deleted Services, which kproxy keeps refusing for a
        minute on purpose, do not count.
        """
        from kproxy.cli import build_parser
        from kproxy.cluster.convert import build_cluster as convert
        from kproxy.daemon.config import daemon_config
        from kproxy.nft.backend import NftablesBackend
        from kproxy.node.addresses import interface_addresses
        from kproxy.rules.compiler import compile_ruleset, node_info
        from kproxy.rules.plan import plan

        api = self.cluster.api
        objects = [*api.list_objects("Service"), *api.list_objects("EndpointSlice"),
                   *api.list_objects("ServiceCIDR"), *(n for n in api.list_objects("Node")
                                                        if n["metadata"]["name"] == self.node.name)]
        config = daemon_config(build_parser().parse_args(
            [f"--config={self.cluster.config_path}", f"--hostname-override={self.node.name}"]))
        model, _ = convert(objects, self.node.name)
        with self.node.netns.entered():
            node = node_info(self.node.name, model.node, interface_addresses()[1])
            desired = compile_ruleset(model, node, config.proxy_config(), {})
            tx = plan(NftablesBackend().read(), desired, delete_chains=False)
        # kproxy keeps a deleted Service's ClusterIPs in cluster-ips for 60 s (so they are refused, not
        # dropped): deleting them is not pending work.
        return sum(op.weight for op in tx.ops
                   if not (op.verb == "delete" and op.kind == "element" and op.name == "cluster-ips"))

    def rules(self) -> str:
        """kproxy's tables in this node's kernel (``nft list ruleset`` in the node namespace)."""
        return self.node.netns.nft("list", "ruleset", check=False).stdout

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 30) -> str:
        lines = self.log().splitlines()[-n:]
        return f"--- last {len(lines)} lines of {self.log_path}:\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- EndpointSlices


class EndpointSliceController:
    """What kube-controller-manager's endpointslice controller does, for the pods of this cluster.

    For every Service with a selector, in every family of ``spec.ipFamilies``,
    one EndpointSlice ``<service>-<5 chars>`` (created with generateName, then
    updated in place; kept with no endpoints when no pod matches) holding an
    endpoint per matching pod:

    * ``conditions``: ``ready`` = pod Ready and not terminating (or any pod with
      ``publishNotReadyAddresses``), ``serving`` = pod Ready, ``terminating`` =
      the pod is being deleted;
    * ``nodeName``, ``zone`` (the node's ``topology.kubernetes.io/zone``), ``targetRef``;
    * hints, as the controller's trafficdist heuristics: with
      ``trafficDistribution: PreferClose`` (or ``PreferSameZone``) every ready
      endpoint with a zone gets ``forZones: [its zone]``; ``PreferSameNode`` adds
      ``forNodes: [its node]``; without one, no hints.  (kproxy, like kube-proxy,
      uses the hints only when every ready endpoint has one and one of them is
      for the node's zone: a zone without endpoints falls back to all of them.)

    Ports are the Service's ports with their numeric ``targetPort``.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def reconcile(self, services: Iterable[str] | None = None) -> None:
        api = self.cluster.api
        names = list(services) if services is not None else [s["metadata"]["name"] for s in
                                                              api.list_objects("Service", NAMESPACE)]
        for name in names:
            svc = api.get("Service", NAMESPACE, name)
            if svc is None or not svc["spec"].get("selector"):
                continue
            self._reconcile_service(svc)

    def delete_slices(self, service: str) -> None:
        api = self.cluster.api
        for s in self.slices(service):
            api.delete("EndpointSlice", NAMESPACE, s["metadata"]["name"])

    def slices(self, service: str) -> list[dict[str, Any]]:
        return [s for s in self.cluster.api.list_objects("EndpointSlice", NAMESPACE)
                if s["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL) == service]

    def _endpoint(self, svc: dict[str, Any], pod: Pod, family: int) -> dict[str, Any]:
        spec = svc["spec"]
        publish = bool(spec.get("publishNotReadyAddresses"))
        ready = (pod.ready and not pod.terminating) or publish
        ep: dict[str, Any] = {
            "addresses": [pod.ip(family)],
            "conditions": {"ready": ready, "serving": pod.ready or publish, "terminating": pod.terminating},
            "nodeName": pod.node.name,
            "zone": pod.node.zone,
            "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name, "uid": pod.uid},
        }
        distribution = spec.get("trafficDistribution")
        if ready and distribution in ("PreferClose", "PreferSameZone", "PreferSameNode"):
            ep["hints"] = {"forZones": [{"name": pod.node.zone}]}
            if distribution == "PreferSameNode":
                ep["hints"]["forNodes"] = [{"name": pod.node.name}]
        return ep

    def _reconcile_service(self, svc: dict[str, Any]) -> None:
        api, spec, name = self.cluster.api, svc["spec"], svc["metadata"]["name"]
        selector = spec["selector"]
        pods = sorted((p for p in self.cluster.pods.values()
                       if all(p.labels.get(k) == v for k, v in selector.items())), key=lambda p: p.name)
        ports = [{"name": p.get("name", ""), "port": int(p.get("targetPort", p["port"])),
                  "protocol": p.get("protocol", "TCP")} for p in spec.get("ports", [])]
        families = {"IPv4": 4, "IPv6": 6}
        existing = {s["addressType"]: s for s in self.slices(name)}
        wanted = [f for f in spec.get("ipFamilies", ["IPv4"]) if f in families]
        for address_type in wanted:
            body: dict[str, Any] = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"namespace": NAMESPACE, "generateName": f"{name}-",
                             "labels": {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: CONTROLLER_NAME},
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                                  "uid": svc["metadata"]["uid"], "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "addressType": address_type,
                "endpoints": [self._endpoint(svc, p, families[address_type]) for p in pods],
                "ports": ports,
            }
            old = existing.pop(address_type, None)
            if old is None:
                api.create(body)
            else:
                new = copy.deepcopy(old)
                new["metadata"]["labels"] = body["metadata"]["labels"]
                new["endpoints"], new["ports"] = body["endpoints"], body["ports"]
                api.update(new)  # a no-op update sends no event
        for stale in existing.values():  # a family the Service no longer has
            api.delete("EndpointSlice", NAMESPACE, stale["metadata"]["name"])


# ----------------------------------------------------------------------------- the load balancer


@dataclass
class LBResult:
    """What :meth:`LoadBalancer.send` did: the health of each node, and the connections per node."""

    health: dict[str, int]
    per_node: dict[str, Results]

    @property
    def results(self) -> Results:
        return Results(r for rs in self.per_node.values() for r in rs)

    @property
    def backends(self) -> list[str]:
        return [n for n, status in self.health.items() if status == 200]


class LoadBalancer:
    """A network load balancer in front of a Service's NodePort, as a cloud provider runs one.

    It health-checks every node the way cloud providers do for kube-proxy: for
    ``externalTrafficPolicy: Local`` the Service's ``healthCheckNodePort`` (``GET /``,
    200 when the node has local endpoints), otherwise kproxy's ``/healthz`` on
    port 10256.  It sends connections only to the nodes that answered 200, spread
    round-robin, from the external client namespace and without rewriting the
    source (like a pass-through LB, e.g. an NLB in instance mode with client IP
    preservation): the pod sees the client's address unless kproxy masquerades.
    """

    def __init__(self, cluster: Cluster, service: str, port: str | int | None = None,
                 client: Netns | None = None) -> None:
        self.cluster = cluster
        self.service = service
        self.port = port
        self.client = client or cluster.client

    def _spec(self) -> dict[str, Any]:
        svc = self.cluster.api.get("Service", NAMESPACE, self.service)
        if svc is None:
            raise KeyError(f"no Service {self.service}")
        return svc["spec"]

    def node_port(self, proto: str = "tcp") -> int:
        ports = [p for p in self._spec()["ports"] if p.get("protocol", "TCP").lower() == proto]
        if self.port is not None:
            ports = [p for p in ports if self.port in (p.get("name"), p["port"])]
        if not ports or "nodePort" not in ports[0]:
            raise ValueError(f"Service {self.service} has no {proto} NodePort {self.port or ''}")
        return int(ports[0]["nodePort"])

    def check(self, node: Node, family: int = 4, timeout: float = 1.0) -> tuple[int, str]:
        """One health check of ``node`` from the client: (HTTP status or 0, body)."""
        spec = self._spec()
        hc_port = spec.get("healthCheckNodePort") if spec.get("externalTrafficPolicy") == "Local" else None
        port, path = (hc_port, "/") if hc_port else (HEALTHZ_PORT, "/healthz")
        with self.client.entered():
            conn = http.client.HTTPConnection(node.ip(family), port, timeout=timeout)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read().decode(errors="replace")
            except OSError as exc:
                return 0, f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()

    def health(self, family: int = 4) -> dict[str, int]:
        """{node: HTTP status of its health check} (0: no answer)."""
        return {node.name: self.check(node, family)[0] for node in self.cluster.nodes}

    def send(self, count: int, proto: str = "tcp", family: int = 4, timeout: float = 2.5) -> LBResult:
        """``count`` connections to the NodePort, round-robin over the nodes that pass the health check."""
        health = self.health(family)
        healthy = [n for n in self.cluster.nodes if health[n.name] == 200]
        port = self.node_port(proto)
        per_node: dict[str, Results] = {}
        for i, node in enumerate(healthy):
            share = count // len(healthy) + (1 if i < count % len(healthy) else 0)
            if share:
                per_node[node.name] = self.client.connect_many(node.ip(family), port, share, proto, timeout)
        return LBResult(health, per_node)


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Checkpoint:
    services: set[str]
    pods: dict[str, tuple[dict[str, str], bool, bool]]


class Cluster:
    """The namespaces, the API server, the pods, the Services and a kproxy per node.

    Build with :meth:`build` (or :func:`build_cluster`), always :meth:`close`.
    Methods that change pods or Services re-run the EndpointSlice controller, as
    the real controller reacts to them.
    """

    def __init__(self, nodes: int = 3, zones: int = 2, pods_per_node: int = 2, workdir: Path | None = None,
                 prefix: str = NS_PREFIX, app: str = "web") -> None:
        if not 1 <= nodes <= 50:
            raise ValueError("--nodes must be within 1..50")
        if not 1 <= zones <= min(nodes, 26):
            raise ValueError("--zones must be within 1..min(nodes, 26)")
        if not 0 <= pods_per_node <= 20:
            raise ValueError("--pods-per-node must be within 0..20")
        self.suffix = secrets.token_hex(3)
        self.base = f"{prefix}{self.suffix}-"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"kproxy-cluster-{self.suffix}-"))
        self.config_path = self.workdir / "kproxy-config.yaml"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.fabric = Netns(self.base + "fabric")
        self.client = Netns(self.base + "client")
        self.client_ip4, self.client_ip6 = CLIENT_IP4, CLIENT_IP6
        self.nodes: list[Node] = []
        for i in range(1, nodes + 1):
            self.nodes.append(Node(
                name=f"node-{i}", index=i, zone=zone_name((i - 1) % zones), netns=Netns(f"{self.base}node-{i}"),
                ip4=f"192.168.60.{10 + i}", ip6=str(ipaddress.ip_address(f"fd00:60::{10 + i}")),
                pod_cidr4=f"10.244.{i}.0/24", pod_cidr6=f"fd00:244:0:{i}::/64"))
        self.zones = sorted({n.zone for n in self.nodes})
        self.pods: dict[str, Pod] = {}
        self.pod_nodes: dict[str, str] = {}
        """Every pod ever created (deleted ones too), to its node's name: where a reply came from."""
        self.clients: dict[str, Pod] = {}
        """One client pod per node (label role=client, selected by no Service of the tests), by node name."""
        self.api: FakeKubeAPI = None  # type: ignore[assignment]
        self.endpoints = EndpointSliceController(self)
        self._pods_per_node = pods_per_node
        self._app = app
        self._created: list[str] = []
        self._veth_seq = 0
        self._next_service_ip = 10
        self._next_node_port = NODE_PORT_FIRST
        self._lock = threading.RLock()
        self._closed = False

    # -- lookups

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, name: str) -> Pod:
        return self.pods[name]

    def pods_on(self, node: Node | str, app: str | None = None) -> list[Pod]:
        name = node if isinstance(node, str) else node.name
        return [p for p in self.pods.values() if p.node.name == name and (app is None or p.labels.get("app") == app)]

    def app_pods(self, app: str | None = None) -> list[Pod]:
        app = app or self._app
        return [p for p in self.pods.values() if p.labels.get("app") == app]

    def where(self, pod_name: str | None) -> str:
        """``pod@node`` for a server name from a reply (the pod may be gone since)."""
        node = self.pod_nodes.get(pod_name or "")
        return f"{pod_name}@{node}" if node else str(pod_name)

    def ns_names(self) -> list[str]:
        return list(self._created)

    # -- building

    def build(self, start_kproxy: bool = True) -> Cluster:
        """Create the namespaces, the network, the API server with the Nodes, the pods and (by default) kproxy."""
        try:
            self._build_network()
            self._start_api()
            pods = []
            for node in self.nodes:
                for j in range(self._pods_per_node):
                    pods.append((node, f"{self._app}-{node.index}{'abcdefghijklmnopqrst'[j]}", {"app": self._app}))
                pods.append((node, f"client-{node.index}", {"role": "client"}))
            created = self._create_pods(pods, ready=True)
            for pod in created:
                if pod.labels.get("role") == "client":
                    self.clients[pod.node.name] = pod
            if start_kproxy:
                self.start_kproxy()
        except BaseException:
            self.close()
            raise
        return self

    def _build_network(self) -> None:
        names = [self.fabric.name, self.client.name, *(n.netns.name for n in self.nodes)]
        clash = [n for n in names if (netbed.NETNS_RUN_DIR / n).exists()]
        if clash:
            raise RuntimeError(f"namespaces already exist: {clash}")
        self._created.extend(names)
        netbed._ip_batch([f"netns add {n}" for n in names])
        for name in names:
            Netns(name).sysctl(netbed._COMMON_SYSCTLS)
        for node in self.nodes:
            # Nodes forward between hosts of one subnet (client -> node-1 -> node-2 after DNAT): no ICMP redirects
            # (see _FORWARDING_SYSCTLS), which would also teach the client shortcuts.
            node.netns.sysctl(netbed._FORWARDING_SYSCTLS)
        links = [f"link add name vcl netns {self.fabric.name} type veth peer name eth0 netns {self.client.name}"]
        links += [f"link add name vn{n.index} netns {self.fabric.name} type veth peer name eth0 netns {n.netns.name}"
                  for n in self.nodes]
        netbed._ip_batch(links)
        fabric = ["link set lo up", "link add name br0 type bridge forward_delay 0 mcast_snooping 0",
                  f"addr add {FABRIC_IP4}/24 dev br0", f"addr add {FABRIC_IP6}/64 dev br0 nodad", "link set br0 up"]
        for port in ["vcl", *(f"vn{n.index}" for n in self.nodes)]:
            fabric += [f"link set {port} master br0", f"link set {port} up"]
        batches = {self.fabric.name: fabric, self.client.name: [
            "link set lo up", f"addr add {CLIENT_IP4}/24 dev eth0", f"addr add {CLIENT_IP6}/64 dev eth0 nodad",
            "link set eth0 up",
            # an external client reaches pods only through node IPs
            f"route add unreachable {CLUSTER_CIDR4}", f"route add unreachable {CLUSTER_CIDR6}"]}
        for node in self.nodes:
            lines = ["link set lo up", f"addr add {node.ip4}/24 dev eth0", f"addr add {node.ip6}/64 dev eth0 nodad",
                     "link set eth0 up", f"route add default via {FABRIC_IP4}", f"route add default via {FABRIC_IP6}"]
            for other in self.nodes:
                if other is not node:
                    lines += [f"route add {other.pod_cidr4} via {other.ip4}", f"route add {other.pod_cidr6} via {other.ip6}"]
            batches[node.netns.name] = lines
        netbed._parallel_batches(batches)

    def _start_api(self) -> None:
        with self.fabric.entered():
            self.api = FakeKubeAPI(host=FABRIC_IP4, port=API_PORT, bookmark_interval=1.0).start()
        self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kproxy-cluster",
            "clusters": [{"name": "kproxy-cluster", "cluster": {"server": self.api.url}}],
            "users": [{"name": "kproxy", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "kproxy-cluster", "context": {"cluster": "kproxy-cluster", "user": "kproxy",
                                                                "namespace": NAMESPACE}}],
        }))
        _, config = daemonset_spec()
        config["clusterCIDR"] = f"{CLUSTER_CIDR4},{CLUSTER_CIDR6}"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        for node in self.nodes:
            self.api.create(node.manifest())
        self.api.create({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                         "metadata": {"name": "kubernetes"}, "spec": {"cidrs": [SERVICE_CIDR4, SERVICE_CIDR6]}})

    # -- pods

    def _new_pod(self, node: Node, name: str, labels: dict[str, str]) -> Pod:
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        host = node.next_host
        if host > 250:
            raise RuntimeError(f"{node.name} has no pod address left")
        node.next_host += 1
        self._veth_seq += 1
        net4, net6 = ipaddress.ip_network(node.pod_cidr4), ipaddress.ip_network(node.pod_cidr6)
        return Pod(name=name, node=node, netns=Netns(self.base + name), ip4=str(net4[host]), ip6=str(net6[host]),
                   host_veth=f"vp{self._veth_seq}", labels=dict(labels))

    def _create_pods(self, specs: Sequence[tuple[Node, str, dict[str, str]]], ready: bool) -> list[Pod]:
        with self._lock:
            pods = [self._new_pod(node, name, labels) for node, name, labels in specs]
            names = [p.netns.name for p in pods]
            clash = [n for n in names if (netbed.NETNS_RUN_DIR / n).exists()]
            if clash:
                raise RuntimeError(f"namespaces already exist: {clash}")
            self._created.extend(names)
            netbed._ip_batch([f"netns add {n}" for n in names])
            for pod in pods:
                pod.netns.sysctl(netbed._COMMON_SYSCTLS)
            netbed._ip_batch([f"link add name {p.host_veth} netns {p.node.netns.name} type veth peer name eth0 "
                              f"netns {p.netns.name}" for p in pods])
            batches: dict[str, list[str]] = collections.defaultdict(list)
            for pod in pods:
                batches[pod.node.netns.name] += netbed._host_side(pod.node.gw4, pod.node.gw6, pod.host_veth, pod)
                batches[pod.netns.name] = netbed._pod_side(pod.node.gw4, pod)
            netbed._parallel_batches(batches)
            for pod in pods:
                pod.server = pod.netns._spawn_server(pod.name, (TCP_TARGET,), (UDP_TARGET,), "::")
            netbed._wait_ready([p.server for p in pods], 20.0)  # type: ignore[misc]
            for pod in pods:
                pod.ready = ready
                self.pods[pod.name] = pod
                self.pod_nodes[pod.name] = pod.node.name
        self.endpoints.reconcile()
        return pods

    def add_pods(self, specs: Sequence[tuple[Node | str, str, dict[str, str]]], ready: bool = True) -> list[Pod]:
        """Create pods ``(node, name, labels)`` with their servers running; ``ready``: their Ready condition."""
        return self._create_pods([(n if isinstance(n, Node) else self.node(n), name, labels)
                                  for n, name, labels in specs], ready)

    def add_pod(self, node: Node | str, name: str, labels: dict[str, str], ready: bool = True) -> Pod:
        return self.add_pods([(node, name, labels)], ready)[0]

    def set_pod(self, pod: Pod | str, *, ready: bool | None = None, terminating: bool | None = None,
                labels: dict[str, str] | None = None) -> Pod:
        """Change a pod's Ready condition, its being deleted, or its labels (replaced); the slices follow."""
        pod = self.pods[pod] if isinstance(pod, str) else pod
        if ready is not None:
            pod.ready = ready
        if terminating is not None:
            pod.terminating = terminating
        if labels is not None:
            pod.labels = dict(labels)
        self.endpoints.reconcile()
        return pod

    def delete_pods(self, pods: Iterable[Pod | str]) -> None:
        """Remove pods at once (no grace): out of the slices, servers stopped, namespaces deleted."""
        with self._lock:
            gone = [self.pods.pop(p if isinstance(p, str) else p.name) for p in pods]
        self.endpoints.reconcile()
        for pod in gone:
            pod.netns.stop_processes()
        if gone:
            netbed.teardown_namespaces([p.netns.name for p in gone])

    def delete_pods_gracefully(self, pods: Iterable[Pod | str], grace: float = 10.0, drain: float = 1.0) -> None:
        """Delete pods as the kubelet does with an app that drains: terminating (still serving) until no node's
        kproxy sends it new connections any more (at most ``grace`` s), then removed from the slices, then,
        once no node programs it (at most ``grace`` s more) and after ``drain`` s for connections in flight,
        stopped."""
        pods = [self.pods[p] if isinstance(p, str) else p for p in pods]
        for pod in pods:
            pod.terminating = True
            pod.ready = True  # still passes its readiness probe while it drains: serving, not ready
        self.endpoints.reconcile()
        self.wait_unprogrammed(pods, grace, must=False)
        with self._lock:
            for pod in pods:
                self.pods.pop(pod.name, None)
        self.endpoints.reconcile()
        self.wait_unprogrammed(pods, grace, must=False)
        time.sleep(drain)
        for pod in pods:
            pod.netns.stop_processes()
        netbed.teardown_namespaces([p.netns.name for p in pods])

    def programmed_on(self, pod: Pod) -> list[str]:
        """The nodes whose kproxy tables mention ``pod``'s addresses."""
        pats = [_ip_pattern(pod.ip4), _ip_pattern(pod.ip6)]
        return [n.name for n in self.nodes if any(p.search(n.netns.nft("list", "ruleset", check=False).stdout)
                                                  for p in pats)]

    def wait_unprogrammed(self, pods: Sequence[Pod], timeout: float, must: bool = True) -> bool:
        """Wait until no node's tables mention any of ``pods``; with ``must``, fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while any(self.programmed_on(p) for p in pods):
            if time.monotonic() >= deadline:
                if must:
                    raise AssertionError(f"still programmed after {timeout}s: "
                                         f"{ {p.name: self.programmed_on(p) for p in pods} }")
                return False
            time.sleep(0.1)
        return True

    # -- Services

    def _allocate_ip(self, family: int) -> str:
        """The next free ClusterIP (never one used before in this cluster: no stale conntrack or affinity)."""
        used = {ip for s in self.api.list_objects("Service") for ip in s["spec"].get("clusterIPs") or ()}
        net = ipaddress.ip_network(SERVICE_CIDR4 if family == 4 else SERVICE_CIDR6)
        while True:
            n = self._next_service_ip
            self._next_service_ip += 1
            if str(net[n]) not in used:
                return str(net[n])

    def _allocate_node_port(self) -> int:
        port = self._next_node_port
        self._next_node_port += 1
        return port

    def _allocate(self, spec: dict[str, Any]) -> None:
        """Fill in what the API server allocates or defaults: families, ClusterIPs, NodePorts, health port."""
        policy = spec.setdefault("ipFamilyPolicy", "SingleStack")
        families = spec.setdefault("ipFamilies", ["IPv4"])
        if policy != "SingleStack" and len(families) == 1:
            families.append("IPv6" if families[0] == "IPv4" else "IPv4")
        elif policy == "SingleStack":
            del families[1:]
        if spec.get("clusterIP") != "None":
            ips = list(spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))[:len(families)]
            ips += [self._allocate_ip(4 if f == "IPv4" else 6) for f in families[len(ips):]]
            spec["clusterIPs"], spec["clusterIP"] = ips, ips[0]
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.setdefault("ports", copy.deepcopy(list(DEFAULT_PORTS))):
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
            if spec["type"] in ("NodePort", "LoadBalancer"):
                port.setdefault("nodePort", self._allocate_node_port())
            else:
                port.pop("nodePort", None)
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        else:
            spec.pop("externalTrafficPolicy", None)
        if spec["type"] == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local":
            spec.setdefault("healthCheckNodePort", self._allocate_node_port())
        else:
            spec.pop("healthCheckNodePort", None)
        if spec.get("sessionAffinity") == "ClientIP":
            spec.setdefault("sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 10800}})
        else:
            spec.pop("sessionAffinityConfig", None)

    def create_service(self, name: str, selector: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
        """Create a Service (default: ports http 80->8080/TCP and dns 53->5353/UDP, selector app=<app>).

        ``spec`` takes Service spec fields (``type="NodePort"``, ``externalTrafficPolicy="Local"``,
        ``ipFamilyPolicy="RequireDualStack"``, ...); the API server's allocations are filled in.
        """
        spec = copy.deepcopy(spec)
        spec["selector"] = dict(selector) if selector is not None else {"app": self._app}
        self._allocate(spec)
        svc = self.api.create({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec})
        self.endpoints.reconcile([name])
        return svc

    def update_service(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change spec fields (``None`` removes one); allocations are kept or added as the API server does."""
        svc = self.api.get("Service", NAMESPACE, name)
        if svc is None:
            raise KeyError(name)
        spec = svc["spec"]
        for key, value in changes.items():
            if value is None:
                spec.pop(key, None)
            else:
                spec[key] = copy.deepcopy(value)
        self._allocate(spec)
        svc = self.api.update(svc)
        self.endpoints.reconcile([name])
        return svc

    def control_loop_once(self) -> None:
        """What the control plane does for changes made behind this object's back (kubectl): allocate the
        ClusterIPs and NodePorts a Service lacks, and rebuild the EndpointSlices."""
        for svc in self.api.list_objects("Service", NAMESPACE):
            before = copy.deepcopy(svc["spec"])
            self._allocate(svc["spec"])
            if svc["spec"] != before:
                with contextlib.suppress(Exception):  # changed again meanwhile: next round
                    self.api.update(svc)
        self.endpoints.reconcile()

    def delete_service(self, name: str) -> None:
        """Delete a Service and its EndpointSlices (the garbage collector's part)."""
        self.api.delete("Service", NAMESPACE, name)
        self.endpoints.delete_slices(name)

    def service(self, name: str) -> dict[str, Any]:
        svc = self.api.get("Service", NAMESPACE, name)
        if svc is None:
            raise KeyError(name)
        return svc

    def cluster_ip(self, name: str, family: int = 4) -> str:
        for ip in self.service(name)["spec"]["clusterIPs"]:
            if (":" in ip) == (family == 6):
                return ip
        raise ValueError(f"Service {name} has no IPv{family} ClusterIP")

    def node_port(self, name: str, port: str | int = "http") -> int:
        for p in self.service(name)["spec"]["ports"]:
            if port in (p.get("name"), p["port"]):
                return int(p["nodePort"])
        raise ValueError(f"Service {name} has no NodePort for {port}")

    def load_balancer(self, service: str, port: str | int | None = None) -> LoadBalancer:
        return LoadBalancer(self, service, port)

    # -- kproxy

    def start_kproxy(self, nodes: Iterable[Node] | None = None, timeout: float = 60.0) -> None:
        """Start kproxy on the nodes (default: every node not running it) and wait for each one's first sync."""
        todo = [n for n in (nodes or self.nodes) if not (n.kproxy and n.kproxy.running)]
        started = time.time()
        for node in todo:
            node.kproxy = node.kproxy or KproxyDaemon(self, node)
            node.kproxy.start()
        for node in todo:
            node.kproxy.wait_synced(timeout, after=started)  # type: ignore[union-attr]

    def settle(self, timeout: float = 20.0) -> float:
        """Wait until every running kproxy has programmed the API server's current state (its next sync would
        send nothing); returns the seconds waited."""
        t0 = time.monotonic()
        for node in self.nodes:
            if node.kproxy and node.kproxy.running:
                wait_until(lambda n=node: n.kproxy.pending_operations() == 0,
                           max(1.0, timeout - (time.monotonic() - t0)),
                           f"kproxy on {node.name} to program the current state\n{node.kproxy.tail()}", interval=0.1)
        return time.monotonic() - t0

    def stop_kproxy(self) -> None:
        for node in self.nodes:
            if node.kproxy:
                node.kproxy.stop()

    def kproxy_logs(self, n: int = 20) -> str:
        return "\n".join(node.kproxy.tail(n) for node in self.nodes if node.kproxy)

    # -- test support

    def checkpoint(self) -> Checkpoint:
        """What :meth:`reset` returns to: the Services, the pods with their labels and conditions."""
        return Checkpoint({s["metadata"]["name"] for s in self.api.list_objects("Service", NAMESPACE)},
                          {p.name: (dict(p.labels), p.ready, p.terminating) for p in self.pods.values()})

    def reset(self, mark: Checkpoint) -> None:
        """Back to ``mark``: newer Services and pods deleted, labels and conditions restored, every kproxy running."""
        for svc in self.api.list_objects("Service", NAMESPACE):
            if svc["metadata"]["name"] not in mark.services:
                self.delete_service(svc["metadata"]["name"])
        self.delete_pods([p for p in list(self.pods.values()) if p.name not in mark.pods])
        for name, (labels, ready, terminating) in mark.pods.items():
            pod = self.pods.get(name)
            if pod is not None:
                pod.labels, pod.ready, pod.terminating = dict(labels), ready, terminating
        self.endpoints.reconcile()
        if any(not (n.kproxy and n.kproxy.running) for n in self.nodes):
            self.start_kproxy()

    def describe(self, results: Results) -> str:
        """One line: how many connections, where they landed (pod@node x count), the sources seen, failures."""
        landed = collections.Counter(self.where(r.server) for r in results if r.ok)
        failed = collections.Counter(r.error for r in results if not r.ok)
        peers = sorted({r.peer or "?" for r in results if r.ok})
        text = f"{len(results)} conns -> " + (", ".join(f"{k} x{v}" for k, v in sorted(landed.items())) or "none")
        if peers:
            text += f" | source seen: {', '.join(peers)}"
        if failed:
            text += f" | FAILED: {dict(failed)}"
        return text

    def diagnostics(self) -> str:
        out = []
        for node in self.nodes:
            out.append(f"=== {node.name}: kproxy running={node.kproxy.running if node.kproxy else None}")
            out.append(node.netns.nft("list", "ruleset", check=False).stdout[-3000:])
        out.append(self.kproxy_logs())
        return "\n".join(out)

    # -- teardown

    def close(self) -> None:
        """Stop every process, the API server, delete every namespace (and the workdir if it made it)."""
        if self._closed:
            return
        self._closed = True
        errors = []
        try:
            for node in self.nodes:
                if node.kproxy:
                    with contextlib.suppress(Exception):
                        node.kproxy.stop(timeout=5)
            for pod in self.pods.values():
                pod.netns.stop_processes()
            for ns in (self.client, self.fabric, *(n.netns for n in self.nodes)):
                ns.stop_processes()
        finally:
            if self.api is not None:
                with contextlib.suppress(Exception):
                    self.api.stop()
            try:
                netbed.teardown_namespaces(self._created)
            except Exception as exc:
                errors.append(exc)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def build_cluster(nodes: int = 3, zones: int = 2, pods_per_node: int = 2, workdir: Path | None = None,
                  start_kproxy: bool = True) -> Iterator[Cluster]:
    """Build a cluster, yield it, and always tear it down."""
    cluster = Cluster(nodes, zones, pods_per_node, workdir)
    try:
        cluster.build(start_kproxy=start_kproxy)
        yield cluster
    finally:
        cluster.close()


# ----------------------------------------------------------------------------- Deployments


class Deployment:
    """Pods of one app spread over the nodes, with scale and a rolling update (maxSurge 1, maxUnavailable 0)."""

    def __init__(self, cluster: Cluster, app: str, replicas: int, nodes: Sequence[Node] | None = None,
                 labels: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.app = app
        self.nodes = list(nodes or cluster.nodes)
        self.labels = {"app": app, **(labels or {})}
        self.revision = 1
        self._placed = 0
        self.pods: list[Pod] = []
        self.scale(replicas)

    def _spec(self) -> tuple[Node, str, dict[str, str]]:
        node = self.nodes[self._placed % len(self.nodes)]
        self._placed += 1
        return node, f"{self.app}-r{self.revision}-{secrets.token_hex(4)}", {**self.labels, "revision": str(self.revision)}

    def _start(self, count: int) -> list[Pod]:
        """New pods: not ready until their server answers (the readiness probe), then ready."""
        pods = self.cluster.add_pods([self._spec() for _ in range(count)], ready=False)
        for pod in pods:
            pod.ready = True
        self.cluster.endpoints.reconcile()
        self.pods += pods
        return pods

    def scale(self, replicas: int, grace: float = 10.0) -> None:
        if replicas > len(self.pods):
            self._start(replicas - len(self.pods))
        elif replicas < len(self.pods):
            going = self.pods[replicas:]
            self.pods = self.pods[:replicas]
            self.cluster.delete_pods_gracefully(going, grace)

    def rolling_update(self, on_step: Callable[[str], None] | None = None, grace: float = 10.0) -> None:
        """Replace every pod with one of a new revision: start one new pod, then delete one old pod gracefully."""
        self.revision += 1
        old = list(self.pods)
        for pod in old:
            (new,) = self._start(1)
            if on_step:
                on_step(f"started {new.name}@{new.node.name}")
            self.pods.remove(pod)
            self.cluster.delete_pods_gracefully([pod], grace)
            if on_step:
                on_step(f"deleted {pod.name}@{pod.node.name}")


# ----------------------------------------------------------------------------- the command line


STATE_DIR = Path("/run/kproxy-cluster")


def _usage(cluster: Cluster, state: Path) -> str:
    c = cluster
    venv = ROOT / ".venv/bin"
    kproxy = f"{venv}/kproxy" if (venv / "kproxy").exists() else f"{PYTHON} -m kproxy"
    here = f"cd {ROOT} && "  # python -m kproxy: this tree's kproxy
    n1 = c.nodes[0]
    client1 = c.clients[n1.name]
    web = c.cluster_ip("echo")
    lines = [
        "", f"kproxy cluster {c.suffix}: {len(c.nodes)} nodes, zones {', '.join(c.zones)}, API server {c.api.url}",
        f"workdir {c.workdir} (kubeconfig, kproxy config, logs/<node>.log); state {state}", "",
        "nodes:",
    ]
    for n in c.nodes:
        lines.append(f"  {n.name:8} {n.zone:7} {n.ip4:14} {n.ip6:13} pods {n.pod_cidr4}, {n.pod_cidr6}   "
                     f"netns {n.netns.name}   kproxy pid {n.kproxy.pid if n.kproxy else '-'}")
    lines.append("pods (each answers '<pod name> <source IP>' on TCP 8080 and UDP 5353):")
    for p in c.pods.values():
        lines.append(f"  {p.name:10} on {p.node.name:7} {p.ip4:12} {p.ip6:18} labels {p.labels}   netns {p.netns.name}")
    lines.append("services (port 80/TCP -> 8080, 53/UDP -> 5353):")
    for s in c.api.list_objects("Service", NAMESPACE):
        spec = s["spec"]
        extra = [f"{k}={spec[k]}" for k in ("type", "externalTrafficPolicy", "trafficDistribution",
                                            "healthCheckNodePort") if k in spec]
        ports = ",".join(f"{p['port']}/{p['protocol']}" + (f":{p['nodePort']}" if "nodePort" in p else "")
                         for p in spec["ports"])
        lines.append(f"  {s['metadata']['name']:12} {','.join(spec['clusterIPs']):24} {ports:28} {' '.join(extra)}")
    me = f"{ROOT}/dev cluster"
    lines += [
        "", "try (in another shell, as root):",
        f"  {me} connect {client1.name} {web} 80 --count 20        # from a pod on {n1.name}: where each connection lands",
        f"  {me} connect {client1.name} {web} 53 --udp",
        f"  {me} connect client {n1.ip4} {c.node_port('echo')} --count 20   # NodePort from the external client",
        f"  {me} connect client {c.nodes[-1].ip6} {c.node_port('echo')}     # ... over IPv6, via {c.nodes[-1].name}",
        f"  {me} connect {client1.name} {c.cluster_ip('echo-close')} 80 --count 20   # PreferClose: only {n1.zone}",
        f"  {me} lb echo-local --count 20          # the LB: health checks, then only to nodes with local endpoints",
        f"  ip netns exec {client1.netns.name} bash -c 'cat </dev/tcp/{web}/80'",
        f"  {here}ip netns exec {n1.netns.name} {kproxy} explain --config {c.config_path} --hostname-override {n1.name} "
        f"--kubeconfig {c.kubeconfig} {client1.ip4} {web} 80",
        f"  ip netns exec {n1.netns.name} nft list ruleset",
        f"  ip netns exec {n1.netns.name} curl -s 127.0.0.1:{METRICS_PORT}/metrics | grep ^kubeproxy_sync",
        f"  ip netns exec {c.client.name} curl -s {n1.ip4}:{HEALTHZ_PORT}/healthz      # kproxy's health, from outside",
        f"  tail -f {c.workdir}/logs/{n1.name}.log",
        f"  ip netns exec {c.client.name} kubectl --kubeconfig {c.kubeconfig} --cache-dir {c.workdir}/kube-cache "
        "get services,endpointslices -o yaml",
        f"  ip netns exec {c.client.name} kubectl --kubeconfig {c.kubeconfig} --cache-dir {c.workdir}/kube-cache "
        "patch services echo -p '{\"spec\":{\"sessionAffinity\":\"ClientIP\"}}'",
        "",
        "Ctrl-C tears everything down.",
    ]
    return "\n".join(lines)


def _demo_services(cluster: Cluster) -> None:
    cluster.create_service("echo", type="NodePort", ipFamilyPolicy="PreferDualStack")
    cluster.create_service("echo-close", trafficDistribution="PreferClose")
    # Local endpoints only on the first node: the LB health check tells them apart.
    first = cluster.pods_on(cluster.nodes[0], cluster._app)[0] if cluster._pods_per_node else None
    if first is not None:
        cluster.set_pod(first, labels={**first.labels, "local": "yes"})
    cluster.create_service("echo-local", selector={"app": cluster._app, "local": "yes"}, type="LoadBalancer",
                           externalTrafficPolicy="Local")


def _state(cluster: Cluster) -> dict[str, Any]:
    return {
        "suffix": cluster.suffix, "pid": os.getpid(), "workdir": str(cluster.workdir), "api": cluster.api.url,
        "client": {"netns": cluster.client.name, "ip4": CLIENT_IP4, "ip6": CLIENT_IP6},
        "nodes": [{"name": n.name, "zone": n.zone, "netns": n.netns.name, "ip4": n.ip4, "ip6": n.ip6} for n in cluster.nodes],
        "pods": {p.name: {"netns": p.netns.name, "node": p.node.name} for p in cluster.pods.values()},
    }


def cmd_up(args: argparse.Namespace) -> int:
    """Build the cluster, print how to use it, wait for Ctrl-C (or SIGTERM, SIGHUP), tear down."""
    if os.geteuid() != 0:
        print("dev cluster: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    state = STATE_DIR / "current.json"
    cluster = Cluster(args.nodes, args.zones, args.pods_per_node)
    try:
        print(f"building {args.nodes} nodes in {args.zones} zone(s), starting kproxy on each ...", flush=True)
        t0 = time.monotonic()
        cluster.build()
        _demo_services(cluster)
        for node in cluster.nodes:  # the demo Services programmed everywhere
            wait_until(lambda n=node: _ip_pattern(cluster.cluster_ip("echo-local")).search(n.kproxy.rules()), 30,
                       f"the demo Services on {node.name}")
        STATE_DIR.mkdir(exist_ok=True)
        state.write_text(json.dumps(_state(cluster), indent=1))
        print(f"ready in {time.monotonic() - t0:.1f}s")
        print(_usage(cluster, state), flush=True)
        reported: set[tuple[str, int]] = set()
        while True:
            time.sleep(1)
            cluster.control_loop_once()  # Services and pods changed by hand (kubectl) get their allocations and slices
            for node in cluster.nodes:
                daemon = node.kproxy
                if daemon is None or daemon.running or (node.name, daemon.starts) in reported:
                    continue
                reported.add((node.name, daemon.starts))
                print(f"kproxy on {node.name} exited (code {daemon.proc.returncode if daemon.proc else '?'}); "
                      f"its log: {daemon.log_path}. To start it again by hand:\n  "
                      f"cd {ROOT} && NODE_NAME={node.name} ip netns exec {node.netns.name} "
                      + " ".join(daemon.argv()) + f" >>{daemon.log_path} 2>&1 &", flush=True)
    except KeyboardInterrupt:
        print("\ntearing down ...", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not stop the teardown
            signal.signal(sig, signal.SIG_IGN)
        with contextlib.suppress(FileNotFoundError):
            if json.loads(state.read_text()).get("suffix") == cluster.suffix:
                state.unlink()
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()
        cluster.close()
        left = [n for n in cluster.ns_names() if (netbed.NETNS_RUN_DIR / n).exists()]
        print("left behind: " + (", ".join(left) if left else "nothing"), flush=True)
    return 0


def _load_state() -> dict[str, Any]:
    path = STATE_DIR / "current.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"no cluster is running ({path} is missing): start one with ./dev cluster") from None


def cmd_connect(args: argparse.Namespace) -> int:
    """Connections from a pod, a node or the external client; prints where each landed."""
    st = _load_state()
    where: str
    if args.source == "client":
        where = st["client"]["netns"]
    elif args.source in st["pods"]:
        where = st["pods"][args.source]["netns"]
    elif args.source in {n["name"] for n in st["nodes"]}:
        where = next(n["netns"] for n in st["nodes"] if n["name"] == args.source)
    else:
        raise SystemExit(f"unknown source {args.source!r}: 'client', a node or a pod ({', '.join(st['pods'])})")
    results = Netns(where).connect_many(args.dst, args.port, args.count, "udp" if args.udp else "tcp", args.timeout,
                                        parallel=1)
    nodes = {name: info["node"] for name, info in st["pods"].items()}
    for r in results:
        print(f"  {args.source} -> {args.dst}:{args.port}/{'udp' if args.udp else 'tcp'}: "
              + (f"{r.server} on {nodes.get(r.server or '', '?')}, saw source {r.peer}" if r.ok else f"FAILED {r.error}"))
    landed = collections.Counter(r.server for r in results if r.ok)
    print(f"{len(results)} connections: {dict(landed)}" + (f", {len(results.failed)} failed" if results.failed else ""))
    return 0 if results.all_ok else 1


def cmd_lb(args: argparse.Namespace) -> int:
    """The load balancer: health-check every node, then send only to the healthy ones."""
    st = _load_state()
    client = Netns(st["client"]["netns"])
    import urllib.error
    import urllib.request

    with client.entered():
        with urllib.request.urlopen(urllib.request.Request(f"{st['api']}/api/v1/namespaces/default/services/{args.service}"),
                                    timeout=5) as response:
            spec = json.load(response)["spec"]
    hc = spec.get("healthCheckNodePort") if spec.get("externalTrafficPolicy") == "Local" else None
    port = next(p["nodePort"] for p in spec["ports"] if p.get("protocol", "TCP") == "TCP" and "nodePort" in p)
    healthy = []
    for node in st["nodes"]:
        url = f"http://{node['ip4']}:{hc}/" if hc else f"http://{node['ip4']}:{HEALTHZ_PORT}/healthz"
        with client.entered():
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    status, body = response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read().decode()
            except OSError as exc:
                status, body = 0, str(exc)
        print(f"health check {url}: {status} {' '.join(body.split())[:120]}")
        if status == 200:
            healthy.append(node)
    if not healthy:
        print("no healthy node: the LB sends nothing")
        return 1
    total: collections.Counter[str] = collections.Counter()
    for i in range(args.count):
        node = healthy[i % len(healthy)]
        r = client.connect(node["ip4"], port, timeout=2.5)
        print(f"  via {node['name']} {node['ip4']}:{port}: " + (f"{r.server}, saw source {r.peer}" if r.ok else f"FAILED {r.error}"))
        total[r.server if r.ok else f"failed:{r.error}"] += 1
    print(f"{args.count} connections via {[n['name'] for n in healthy]}: {dict(total)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="build the cluster and keep it until Ctrl-C (the default)")
    for p in (parser, up):
        p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
        p.add_argument("--zones", type=int, default=2, help="number of zones, nodes assigned round-robin (default 2)")
        p.add_argument("--pods-per-node", type=int, default=2, help="app=web pods per node (default 2), plus a client pod")
    conn = sub.add_parser("connect", help="connections from a pod, node or 'client' of the running cluster")
    conn.add_argument("source")
    conn.add_argument("dst")
    conn.add_argument("port", type=int)
    conn.add_argument("--count", type=int, default=10)
    conn.add_argument("--udp", action="store_true")
    conn.add_argument("--timeout", type=float, default=2.0)
    lb = sub.add_parser("lb", help="send through the load balancer to a Service's NodePort")
    lb.add_argument("service")
    lb.add_argument("--count", type=int, default=12)
    args = parser.parse_args(argv)
    if args.command == "connect":
        return cmd_connect(args)
    if args.command == "lb":
        return cmd_lb(args)
    return cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
