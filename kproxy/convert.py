"""Conversion of Kubernetes manifests (plain dicts) into the typed model.

This is the only place where raw API objects are read. The file loader and the
watcher both hand their dicts to these functions. Every value that can reach the
nft script is validated here: a malformed object raises ``InvalidObject`` with a
short machine-readable reason (used as a metric label) and a message naming the
field, and the caller skips that object alone.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from kproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    HEADLESS_LABEL,
    RATE_LIMIT_ANNOTATION,
    RATE_LIMIT_BURST_ANNOTATION,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Node,
    Protocol,
    RateLimit,
    Service,
    ServiceKey,
    ServicePort,
    SliceKey,
)

log = logging.getLogger(__name__)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_RATE = re.compile(r"^([1-9][0-9]{0,8})/(second|minute)$")
_BURST = re.compile(r"^[0-9]{1,9}$")
_PROTOCOLS: dict[str, Protocol] = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_FAMILIES: dict[str, IPFamily] = {"IPv4": 4, "IPv6": 6}
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


class InvalidObject(ValueError):
    """An object kproxy must skip. ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotProxied(Exception):
    """A valid Service that kproxy deliberately leaves alone (headless, other proxy)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One skipped object, for the warning line and the metric."""

    kind: str
    key: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"skipping {self.kind} {self.key}: {self.message} (reason={self.reason})"


# --- small validators -------------------------------------------------------


def _name(value: Any, what: str, pattern: re.Pattern[str] = _DNS_LABEL, limit: int = 63) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not pattern.match(value):
        raise InvalidObject("invalid_name", f"{what} {_show(value)} is not a valid name")
    return value


def _show(value: Any) -> str:
    """A value for a log line: repr, cut short, so hostile input stays readable."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ip_family(address: str) -> IPFamily:
    return 6 if ":" in address else 4


_CANONICAL_V4 = re.compile(r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")


def _ip(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidObject("invalid_ip", f"{what} {_show(value)} is not an IP address")
    if _CANONICAL_V4.match(value):
        return value  # the common case, already in canonical form
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise InvalidObject("invalid_ip", f"{what} {_show(value)} is not an IP address") from None


def _cidr(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidObject("invalid_cidr", f"{what} {_show(value)} is not a CIDR")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise InvalidObject("invalid_cidr", f"{what} {_show(value)} is not a CIDR") from None


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidObject("invalid_port", f"{what} {_show(value)} is not a port in 1-65535")
    return value


def _protocol(value: Any, what: str) -> Protocol:
    if value is None:
        return "tcp"
    if value not in _PROTOCOLS:
        raise InvalidObject("unknown_protocol", f"{what} {_show(value)} is not TCP, UDP or SCTP")
    return _PROTOCOLS[value]


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidObject("malformed", f"{what} is not a mapping")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject("malformed", f"{what} is not a list")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value, what).items()}


def _bool(value: Any, default: bool, what: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject("malformed", f"{what} {_show(value)} is not a boolean")
    return value


# --- Services ---------------------------------------------------------------


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` as well as it can be read, for log lines about bad objects."""
    meta = obj.get("metadata") if type(obj) is dict or isinstance(obj, Mapping) else None
    meta = meta if type(meta) is dict or isinstance(meta, Mapping) else {}
    return f"{_safe(meta.get('namespace', ''))}/{_safe(meta.get('name', ''))}".lstrip("/")


_PLAIN = re.compile(r"[A-Za-z0-9._-]{0,80}")


def _safe(value: Any) -> str:
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text  # the common case: nothing to replace (this runs for every object)
    return "".join(c if c.isalnum() or c in "-._" else "?" for c in text[:80])


def is_proxied(obj: Mapping[str, Any]) -> bool:
    """False for Services another proxy owns, headless ones and ExternalName ones."""
    meta = _mapping(obj.get("metadata"), "metadata")
    labels = _mapping(meta.get("labels"), "metadata.labels")
    if SERVICE_PROXY_NAME_LABEL in labels or HEADLESS_LABEL in labels:
        return False
    spec = _mapping(obj.get("spec"), "spec")
    if spec.get("type") == "ExternalName":
        return False
    cluster_ip = spec.get("clusterIP")
    return cluster_ip not in (None, "", "None")


def service_from_manifest(obj: Mapping[str, Any]) -> Service:
    """Convert a v1 Service. Raises NotProxied or InvalidObject."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace", "default"), "namespace")
    name = _name(meta.get("name"), "name", _DNS_1035_LABEL)
    if not is_proxied(obj):
        raise NotProxied(f"{namespace}/{name}")
    spec = _mapping(obj.get("spec"), "spec")
    svc_type = spec.get("type") or "ClusterIP"
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise InvalidObject("malformed", f"spec.type {_show(svc_type)} is not supported")

    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or [spec.get("clusterIP")]
    cluster_ips = tuple(_ip(ip, "spec.clusterIPs[]") for ip in raw_ips)
    if spec.get("clusterIP") is not None and _ip(spec["clusterIP"], "spec.clusterIP") != cluster_ips[0]:
        raise InvalidObject("malformed", "spec.clusterIP is not the first of spec.clusterIPs")
    families = _list(spec.get("ipFamilies"), "spec.ipFamilies")
    if families:
        if len(families) != len(cluster_ips) or any(f not in _FAMILIES for f in families):
            raise InvalidObject("family_mismatch", f"spec.ipFamilies {_show(families)} does not match spec.clusterIPs")
        for fam, ip in zip(families, cluster_ips):
            if _FAMILIES[fam] != ip_family(ip):
                raise InvalidObject("family_mismatch", f"cluster IP {ip} is not of family {fam}")
    if len({ip_family(ip) for ip in cluster_ips}) != len(cluster_ips):
        raise InvalidObject("family_mismatch", "spec.clusterIPs has two addresses of one family")

    ports: list[ServicePort] = []
    seen: set[tuple[str, str]] = set()
    raw_ports = _list(spec.get("ports"), "spec.ports")
    for i, raw in enumerate(raw_ports):
        raw = _mapping(raw, f"spec.ports[{i}]")
        pname = raw.get("name") or ""
        if pname:
            _name(pname, f"spec.ports[{i}].name")
        elif len(raw_ports) > 1:
            raise InvalidObject("invalid_name", f"spec.ports[{i}] has no name but the Service has several ports")
        protocol = _protocol(raw.get("protocol"), f"spec.ports[{i}].protocol")
        if (pname, protocol) in seen:
            raise InvalidObject("malformed", f"spec.ports[{i}] repeats port name {pname!r}")
        seen.add((pname, protocol))
        node_port = raw.get("nodePort")
        if svc_type == "ClusterIP" or node_port in (None, 0):
            node_port = None
        else:
            node_port = _port(node_port, f"spec.ports[{i}].nodePort")
        ports.append(ServicePort(pname, protocol, _port(raw.get("port"), f"spec.ports[{i}].port"), node_port))

    external_ips = tuple(_ip(ip, "spec.externalIPs[]") for ip in _list(spec.get("externalIPs"), "spec.externalIPs"))
    lb_ips: tuple[str, ...] = ()
    if svc_type == "LoadBalancer":
        status = _mapping(_mapping(obj.get("status"), "status").get("loadBalancer"), "status.loadBalancer")
        ingress = _list(status.get("ingress"), "status.loadBalancer.ingress")
        # ipMode Proxy: the load balancer proxies to the nodes itself, so the
        # LB IP must not be short-circuited on the node (as upstream, KEP-1860).
        lb_ips = tuple(
            _ip(entry["ip"], "status.loadBalancer.ingress[].ip")
            for entry in (_mapping(i, "status.loadBalancer.ingress[]") for i in ingress)
            if entry.get("ip") and entry.get("ipMode", "VIP") != "Proxy"
        )
    ranges = _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    annotations = _str_map(meta.get("annotations"), "metadata.annotations")
    if not ranges and annotations.get("service.beta.kubernetes.io/load-balancer-source-ranges"):
        ranges = annotations["service.beta.kubernetes.io/load-balancer-source-ranges"].split(",")
    source_ranges = tuple(_cidr(r, "spec.loadBalancerSourceRanges[]") for r in ranges if str(r).strip())

    affinity_timeout = None
    if spec.get("sessionAffinity") == "ClientIP":
        config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
        timeout = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP").get("timeoutSeconds")
        if timeout is None:
            timeout = DEFAULT_AFFINITY_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
            raise InvalidObject("malformed", f"sessionAffinityConfig timeoutSeconds {_show(timeout)} is not in 1-86400")
        affinity_timeout = timeout
    elif spec.get("sessionAffinity") not in (None, "None"):
        raise InvalidObject("malformed", f"spec.sessionAffinity {_show(spec.get('sessionAffinity'))} is unknown")

    externally_accessible = svc_type in ("NodePort", "LoadBalancer") or bool(external_ips)
    etp = spec.get("externalTrafficPolicy")
    itp = spec.get("internalTrafficPolicy")
    for field_name, value in (("externalTrafficPolicy", etp), ("internalTrafficPolicy", itp)):
        if value not in (None, "Cluster", "Local"):
            raise InvalidObject("malformed", f"spec.{field_name} {_show(value)} is not Cluster or Local")
    hc_port = spec.get("healthCheckNodePort")
    external_local = externally_accessible and etp == "Local"
    health_check_node_port = _port(hc_port, "spec.healthCheckNodePort") if external_local and hc_port else None
    distribution = spec.get("trafficDistribution")
    if distribution is not None and not (isinstance(distribution, str) and _LABEL_VALUE.match(distribution)):
        raise InvalidObject("malformed", f"spec.trafficDistribution {_show(distribution)} is malformed")

    return Service(
        namespace=namespace,
        name=name,
        type=svc_type,
        cluster_ips=cluster_ips,
        ports=tuple(ports),
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=source_ranges,
        affinity_timeout=affinity_timeout,
        external_policy_local=external_local,
        internal_policy_local=itp == "Local",
        traffic_distribution=distribution,
        health_check_node_port=health_check_node_port,
        rate_limit=_rate_limit(annotations),
    )


def _rate_limit(annotations: Mapping[str, str]) -> RateLimit | None:
    rate = annotations.get(RATE_LIMIT_ANNOTATION)
    burst = annotations.get(RATE_LIMIT_BURST_ANNOTATION)
    if rate is None:
        if burst is not None:
            raise InvalidObject("invalid_annotation", f"{RATE_LIMIT_BURST_ANNOTATION} is set without {RATE_LIMIT_ANNOTATION}")
        return None
    match = _RATE.match(rate.strip())
    if not match:
        raise InvalidObject(
            "invalid_annotation", f"{RATE_LIMIT_ANNOTATION} {_show(rate)} is not '<n>/second' or '<n>/minute'"
        )
    burst_value = None
    if burst is not None:
        if not _BURST.match(burst.strip()):
            raise InvalidObject("invalid_annotation", f"{RATE_LIMIT_BURST_ANNOTATION} {_show(burst)} is not a count")
        burst_value = int(burst.strip())
    unit = "second" if match.group(2) == "second" else "minute"
    return RateLimit(int(match.group(1)), unit, burst_value)


# --- EndpointSlices ---------------------------------------------------------


def slice_from_manifest(obj: Mapping[str, Any]) -> EndpointSlice:
    """Convert a discovery.k8s.io/v1 EndpointSlice. Raises InvalidObject."""
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace", "default"), "namespace")
    name = _name(meta.get("name"), "name", _DNS_SUBDOMAIN, 253)
    labels = _str_map(meta.get("labels"), "metadata.labels")
    service_name = _name(labels.get(SERVICE_NAME_LABEL), f"label {SERVICE_NAME_LABEL}", _DNS_1035_LABEL)
    address_type = obj.get("addressType")
    if address_type not in _FAMILIES:
        # FQDN slices are not used by proxies.
        raise InvalidObject("family_mismatch", f"addressType {_show(address_type)} is not IPv4 or IPv6")
    family = _FAMILIES[address_type]

    ports: list[EndpointPort] = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        raw = _mapping(raw, f"ports[{i}]")
        pname = raw.get("name") or ""
        if pname:
            _name(pname, f"ports[{i}].name")
        port = raw.get("port")
        if port is None:
            continue  # upstream ignores ports without a number
        ports.append(EndpointPort(pname, _protocol(raw.get("protocol"), f"ports[{i}].protocol"), _port(port, f"ports[{i}].port")))

    endpoints = [
        endpoint
        for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints"))
        if (endpoint := _endpoint(raw, i, family, address_type)) is not None
    ]
    annotations = _str_map(meta.get("annotations"), "metadata.annotations")
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=annotations.get(TRIGGER_TIME_ANNOTATION),
    )


_EMPTY: frozenset[str] = frozenset()
_NODE_NAMES: dict[str, bool] = {}
"""Node names already validated: a slice repeats a handful of names many times."""


def _hint_names(hints: Mapping[str, Any], key: str) -> frozenset[str]:
    raw = hints.get(key)
    if not raw:
        return _EMPTY
    return frozenset(n for n in (str(_mapping(h, f"hints.{key}[]").get("name", "")) for h in _list(raw, f"hints.{key}")) if n)


def _endpoint(raw: Any, i: int, family: IPFamily, address_type: str) -> Endpoint | None:
    """One endpoint of a slice (hot: 100k of them at 10k Services). Error texts are built only on error."""
    if type(raw) is not dict:
        raw = _mapping(raw, f"endpoints[{i}]")
    addresses = raw.get("addresses")
    if not addresses:
        return None
    if type(addresses) is not list:
        _list(addresses, f"endpoints[{i}].addresses")
    first = addresses[0]
    address = first if type(first) is str and _CANONICAL_V4.match(first) else _ip(first, f"endpoints[{i}].addresses[0]")
    if ip_family(address) != family:
        raise InvalidObject("family_mismatch", f"endpoint {address} is not of addressType {address_type}")
    cond = raw.get("conditions") or {}
    if type(cond) is not dict:
        cond = _mapping(cond, f"endpoints[{i}].conditions")
    ready = cond.get("ready")
    ready = True if ready is None else ready
    serving = cond.get("serving")
    serving = ready if serving is None else serving
    terminating = cond.get("terminating")
    terminating = False if terminating is None else terminating
    if type(ready) is not bool or type(serving) is not bool or type(terminating) is not bool:
        raise InvalidObject("malformed", f"endpoints[{i}].conditions has a value that is not a boolean")
    hints = raw.get("hints")
    zones = nodes = _EMPTY
    if hints:
        hints = _mapping(hints, f"endpoints[{i}].hints")
        zones, nodes = _hint_names(hints, "forZones"), _hint_names(hints, "forNodes")
    node_name = raw.get("nodeName")
    if node_name is not None and node_name not in _NODE_NAMES:
        _name(node_name, f"endpoints[{i}].nodeName", _DNS_SUBDOMAIN, 253)
        if len(_NODE_NAMES) < 100_000:
            _NODE_NAMES[node_name] = True
    zone = raw.get("zone")
    return Endpoint(address, ready, serving, terminating, node_name, zone if isinstance(zone, str) else None,
                    zones, nodes)


# --- Nodes ------------------------------------------------------------------


def node_from_manifest(obj: Mapping[str, Any]) -> Node:
    """Convert a v1 Node. Raises InvalidObject."""
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _name(meta.get("name"), "name", _DNS_SUBDOMAIN, 253)
    internal: list[str] = []
    external: list[str] = []
    for raw in _list(_mapping(obj.get("status"), "status").get("addresses"), "status.addresses"):
        raw = _mapping(raw, "status.addresses[]")
        kind = raw.get("type")
        if kind == "InternalIP":
            internal.append(_ip(raw.get("address"), "status.addresses[].address"))
        elif kind == "ExternalIP":
            external.append(_ip(raw.get("address"), "status.addresses[].address"))
    taints = _list(_mapping(obj.get("spec"), "spec").get("taints"), "spec.taints")
    deleting = bool(meta.get("deletionTimestamp")) or any(
        _mapping(t, "spec.taints[]").get("key") == TO_BE_DELETED_TAINT for t in taints
    )
    return Node(
        name=name,
        internal_ips=tuple(internal),
        external_ips=tuple(external),
        labels=_str_map(meta.get("labels"), "metadata.labels"),
        being_deleted=deleting,
    )


# --- whole inputs -----------------------------------------------------------


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects that never form cycles.

    Converting 10k Services allocates millions of objects; generational
    collections triggered by that alone more than double the time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def build_cluster(objects: Iterable[Mapping[str, Any]], node_name: str) -> tuple[Cluster, list[Problem]]:
    """Convert a bag of manifests. Bad objects are left out and reported."""
    with gc_paused():
        return _build_cluster(objects, node_name)


def _build_cluster(objects: Iterable[Mapping[str, Any]], node_name: str) -> tuple[Cluster, list[Problem]]:
    services: dict[ServiceKey, Service] = {}
    slices: dict[SliceKey, EndpointSlice] = {}
    node: Node | None = None
    problems: list[Problem] = []
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, Mapping) else None
        try:
            if kind == "Service":
                try:
                    svc = service_from_manifest(obj)
                except NotProxied:
                    log.debug("not proxying Service %s", object_key(obj))
                    continue
                services[svc.key] = svc
            elif kind == "EndpointSlice":
                eps = slice_from_manifest(obj)
                slices[eps.key] = eps
            elif kind == "Node":
                meta = _mapping(obj.get("metadata"), "metadata")
                if meta.get("name") == node_name:
                    node = node_from_manifest(obj)
            else:
                log.debug("ignoring object of kind %s", _safe(kind))
        except (InvalidObject, KeyError, TypeError, AttributeError) as exc:
            reason = exc.reason if isinstance(exc, InvalidObject) else "malformed"
            problems.append(Problem(_safe(kind), object_key(obj), reason, str(exc)))
    return Cluster(services=services, slices=slices, node=node), problems
