"""Conversion of Kubernetes manifests (plain dicts) into the typed model.

This is the only place where raw API objects are read. The file loader and the
watcher both hand their dicts to these functions. Manifests are untrusted:
any field may hold any type. Every value that can reach the nft script is
validated here with the API server's rules (``kproxy.cluster.validate``).

What is wrong decides what is skipped, and nothing else is:

* a value the whole object depends on (its name, ClusterIP, a traffic
  policy, the source ranges of its firewall) makes the object invalid:
  ``InvalidObject`` with a short machine-readable reason (a metric label) and
  a message naming the field;
* a value only one part depends on skips that part alone, with a note: a
  Service port, an external or load-balancer IP, a kproxy annotation, an
  endpoint, an EndpointSlice port, a Node address. The rest is programmed.

No other exception escapes: anything unforeseen in an object is reported as
``InvalidObject("malformed", ...)``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from kproxy.cluster import validate
from kproxy.cluster.conflicts import find_conflicts
from kproxy.cluster.model import (
    BANDWIDTH_LIMIT_ANNOTATION,
    BANDWIDTH_LIMIT_BURST_ANNOTATION,
    CONNECTION_LIMIT_ANNOTATION,
    DEFAULT_AFFINITY_TIMEOUT,
    HEADLESS_LABEL,
    KPROXY_ANNOTATION_PREFIX,
    LIMIT_ALLOWLIST_ANNOTATION,
    METRICS_ANNOTATION,
    RATE_LIMIT_ANNOTATION,
    RATE_LIMIT_BURST_ANNOTATION,
    RATE_LIMIT_TOTAL_ANNOTATION,
    RATE_LIMIT_TOTAL_BURST_ANNOTATION,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
    BandwidthLimit,
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    Node,
    Protocol,
    RateLimit,
    Service,
    ServiceCIDR,
    ServiceKey,
    ServicePort,
    SliceKey,
    union_of_cidrs,
)
from kproxy.cluster.validate import DNS_1035_LABEL, DNS_LABEL, DNS_SUBDOMAIN, FieldError, show
from kproxy.memory import gc_paused

log = logging.getLogger(__name__)

_RATE_UNITS = ("second", "minute")
_UNIT_NS = {"second": 10**9, "minute": 60 * 10**9}
_PROTOCOLS: dict[str, Protocol] = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_FAMILIES: dict[str, IPFamily] = {"IPv4": 4, "IPv6": 6}
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

Notes = list[tuple[str, str]]
"""(reason, message) for every part of an object that was skipped while the rest was kept."""
T = TypeVar("T")
P = ParamSpec("P")


class InvalidObject(ValueError):
    """An object kproxy must skip. ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotProxied(Exception):
    """A valid Service that kproxy deliberately leaves alone (headless, other proxy)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One skipped object, or one skipped part of an object, for the warning line and the metric."""

    kind: str
    key: str
    reason: str
    message: str
    part: bool = False
    """Only a part was skipped (a port, an endpoint, an annotation); the rest is programmed."""

    def __str__(self) -> str:
        what = "part of" if self.part else ""
        return f"skipping {what} {self.kind} {self.key}: {self.message} (reason={self.reason})".replace("  ", " ")


SHOWN_PER_OBJECT = 3
"""Problems of one object that are written out; the rest are counted in one more line."""


def summarize(problems: Iterable[Problem]) -> list[str]:
    """Warning lines for problems: at most SHOWN_PER_OBJECT per object, then how many more it has."""
    lines: list[str] = []
    by_object: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        by_object.setdefault((problem.kind, problem.key), []).append(problem)
    for (kind, key), found in by_object.items():
        lines += [str(p) for p in found[:SHOWN_PER_OBJECT]]
        if len(found) > SHOWN_PER_OBJECT:
            lines.append(f"{kind} {key}: {len(found) - SHOWN_PER_OBJECT} more problems like these")
    return lines


# --- small validators -------------------------------------------------------


def _name(value: Any, what: str, pattern: Any = DNS_LABEL, limit: int = 63) -> str:
    try:
        return validate.name(value, pattern, limit)
    except FieldError as exc:
        raise InvalidObject("invalid_name", f"{what}: {exc}") from None


def _ip(value: Any, what: str, special_ok: bool = True) -> str:
    try:
        return validate.ip(value, special_ok)
    except FieldError as exc:
        raise InvalidObject("invalid_ip", f"{what}: {exc}") from None


def _cidr(value: Any, what: str) -> str:
    try:
        return validate.cidr(value)
    except FieldError as exc:
        raise InvalidObject("invalid_cidr", f"{what}: {exc}") from None


def _port(value: Any, what: str) -> int:
    if type(value) is int and 1 <= value <= 65535:
        return value  # the common case
    try:
        return validate.port(value)
    except FieldError as exc:
        raise InvalidObject("invalid_port", f"{what}: {exc}") from None


def ip_family(address: str) -> IPFamily:
    return 6 if ":" in address else 4


def _protocol(value: Any, what: str) -> Protocol:
    if value is None:
        return "tcp"
    if not isinstance(value, str) or value not in _PROTOCOLS:
        raise InvalidObject("unknown_protocol", f"{what}: {show(value)} is not TCP, UDP or SCTP")
    return _PROTOCOLS[value]


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidObject("malformed", f"{what}: {show(value)} is not a mapping")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject("malformed", f"{what}: {show(value)} is not a list")
    return value


def _string(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidObject("malformed", f"{what}: {show(value)} is not a string")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    """Labels or annotations: string keys and values (others are left out, as the API server refuses them)."""
    return {k: v for k, v in _mapping(value, what).items() if isinstance(k, str) and isinstance(v, str)}


def _bool(value: Any, default: bool, what: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject("malformed", f"{what}: {show(value)} is not a boolean")
    return value


def _part(notes: Notes | None, convert: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
    """``convert(*args, **kwargs)``: one part of an object; if it is invalid, note why and return None (the part is skipped)."""
    try:
        return convert(*args, **kwargs)
    except InvalidObject as exc:
        if notes is not None:
            notes.append((exc.reason, str(exc)))
        return None


@contextlib.contextmanager
def _whole_object() -> Iterator[None]:
    """Anything unforeseen inside one object's conversion makes that object invalid, never more."""
    try:
        yield
    except (InvalidObject, NotProxied):
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, OverflowError) as exc:
        raise InvalidObject("malformed", f"unexpected value ({type(exc).__name__}: {show(str(exc), 120)})") from None


# --- object keys --------------------------------------------------------------


def object_key(obj: Any) -> str:
    """``namespace/name`` as well as it can be read, for log lines about bad objects."""
    meta = obj.get("metadata") if type(obj) is dict else None
    if type(meta) is not dict:
        return ""
    namespace, name = meta.get("namespace", ""), meta.get("name", "")
    if type(name) is str and type(namespace) is str and _PLAIN.fullmatch(name) and _PLAIN.fullmatch(namespace):
        return f"{namespace}/{name}" if namespace else name  # the common case
    return f"{_safe(namespace)}/{_safe(name)}".lstrip("/") if namespace else _safe(name)


_PLAIN = re.compile(r"[a-z0-9][-a-z0-9.]{0,252}")


def _safe(value: Any) -> str:
    """A name for a log line: only name characters, at most 253 (anything else becomes '?')."""
    text = value if isinstance(value, str) else repr(value)
    if validate.DNS_SUBDOMAIN.fullmatch(text) and len(text) <= 253:
        return text  # the common case: nothing to replace (this runs for every object)
    return "".join(c if c.isascii() and (c.isalnum() or c in "-._") else "?" for c in text[:253])


# --- Services ---------------------------------------------------------------


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
    return not (cluster_ip is None or cluster_ip == "" or cluster_ip == "None")


def service_from_manifest(obj: Mapping[str, Any], notes: Notes | None = None) -> Service:
    """Convert a v1 Service. Raises NotProxied or InvalidObject; parts skipped go to ``notes``."""
    with _whole_object():
        return _service(obj, notes)


def _service(obj: Mapping[str, Any], notes: Notes | None) -> Service:
    if not isinstance(obj, dict):
        raise InvalidObject("malformed", f"the object is a {type(obj).__name__}, not a mapping")
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace", "default"), "metadata.namespace")
    name = _name(meta.get("name"), "metadata.name", DNS_1035_LABEL)
    if not is_proxied(obj):
        raise NotProxied(f"{namespace}/{name}")
    spec = _mapping(obj.get("spec"), "spec")
    svc_type = spec.get("type") or "ClusterIP"
    if not isinstance(svc_type, str) or svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise InvalidObject("malformed", f"spec.type: {show(svc_type)} is not ClusterIP, NodePort or LoadBalancer")

    cluster_ips = _cluster_ips(spec)
    ports = _service_ports(spec, svc_type, notes)
    external_ips = tuple(
        ip for i, raw in enumerate(_list(spec.get("externalIPs"), "spec.externalIPs"))
        if (ip := _part(notes, _ip, raw, f"spec.externalIPs[{i}]", special_ok=False))
    )
    lb_ips: tuple[str, ...] = ()
    if svc_type == "LoadBalancer":
        lb_ips = _load_balancer_ips(obj, notes)
    annotations = _mapping(meta.get("annotations"), "metadata.annotations")
    source_ranges = _source_ranges(spec)
    affinity_timeout = _affinity(spec)

    externally_accessible = svc_type in ("NodePort", "LoadBalancer") or bool(external_ips)
    policies = {}
    for field_name in ("externalTrafficPolicy", "internalTrafficPolicy"):
        value = spec.get(field_name)
        if value not in (None, "Cluster", "Local"):
            raise InvalidObject("malformed", f"spec.{field_name}: {show(value)} is not Cluster or Local")
        policies[field_name] = value
    external_local = externally_accessible and policies["externalTrafficPolicy"] == "Local"
    hc_port = spec.get("healthCheckNodePort")
    health_check_node_port = _port(hc_port, "spec.healthCheckNodePort") if external_local and hc_port else None
    distribution = _part(notes, lambda: _traffic_distribution(spec.get("trafficDistribution")))
    if any(isinstance(k, str) and k.startswith(KPROXY_ANNOTATION_PREFIX) for k in annotations):
        limits = _limits(_str_map(annotations, "metadata.annotations"), notes)
    else:
        limits = _NO_LIMITS

    return Service(
        namespace=namespace,
        name=name,
        type=svc_type,  # type: ignore[arg-type]
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=source_ranges,
        affinity_timeout=affinity_timeout,
        external_policy_local=external_local,
        internal_policy_local=policies["internalTrafficPolicy"] == "Local",
        traffic_distribution=distribution,
        health_check_node_port=health_check_node_port,
        **limits,
    )


_NO_LIMITS: dict[str, Any] = {"rate_limit": None, "rate_limit_total": None, "connection_limit": None,
                              "bandwidth_limit": None, "limit_allowlist": (), "metrics": False}
"""The Service fields read from kproxy's annotations, for a Service that has none (almost all)."""


def _limits(annotations: Mapping[str, str], notes: Notes | None) -> dict[str, Any]:
    """The Service fields read from kproxy's annotations; each bad one is noted and left unset."""
    return {
        "rate_limit": _part(notes, lambda: _rate_limit(annotations)),
        "rate_limit_total": _part(notes, lambda: _rate_limit(annotations, RATE_LIMIT_TOTAL_ANNOTATION,
                                                             RATE_LIMIT_TOTAL_BURST_ANNOTATION)),
        "connection_limit": _part(notes, lambda: _connection_limit(annotations)),
        "bandwidth_limit": _part(notes, lambda: _bandwidth_limit(annotations)),
        "limit_allowlist": _part(notes, lambda: _limit_allowlist(annotations)) or (),
        "metrics": bool(_part(notes, lambda: _metrics(annotations))),
    }


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...]:
    raw_ips = _list(spec.get("clusterIPs"), "spec.clusterIPs") or [spec.get("clusterIP")]
    cluster_ips = tuple(_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(raw_ips))
    if any(ip in ("0.0.0.0", "::") for ip in cluster_ips):
        raise InvalidObject("invalid_ip", "spec.clusterIPs: an unspecified address is not a ClusterIP")
    first = spec.get("clusterIP")
    if first is not None and first != raw_ips[0] and _ip(first, "spec.clusterIP") != cluster_ips[0]:
        raise InvalidObject("malformed", "spec.clusterIP is not the first of spec.clusterIPs")
    families = _list(spec.get("ipFamilies"), "spec.ipFamilies")
    if families:
        if len(families) != len(cluster_ips) or any(not isinstance(f, str) or f not in _FAMILIES for f in families):
            raise InvalidObject("family_mismatch", f"spec.ipFamilies: {show(families)} does not match spec.clusterIPs")
        for fam, ip in zip(families, cluster_ips, strict=False):
            if _FAMILIES[fam] != ip_family(ip):
                raise InvalidObject("family_mismatch", f"spec.ipFamilies: {fam} does not match spec.clusterIPs {ip}")
    if len({ip_family(ip) for ip in cluster_ips}) != len(cluster_ips):
        raise InvalidObject("family_mismatch", "spec.clusterIPs: two addresses of one family")
    return cluster_ips


def _service_ports(spec: Mapping[str, Any], svc_type: str, notes: Notes | None) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen: set[tuple[object, ...]] = set()
    raw_ports = _list(spec.get("ports"), "spec.ports")
    for i, raw in enumerate(raw_ports):
        port = _part(notes, _service_port, raw, i, svc_type, len(raw_ports) > 1)
        if port is None:
            continue
        # The API server refuses a repeated name, a repeated port and protocol, and a repeated
        # NodePort and protocol: the first one counts, the repeat is skipped and named.
        claims = [("name", port.name, port.protocol), ("port", port.port, port.protocol)]
        if port.node_port:
            claims.append(("nodePort", port.node_port, port.protocol))
        repeated = next((claim for claim in claims if claim in seen), None)
        if repeated is not None:
            if notes is not None:
                notes.append(("malformed", f"spec.ports[{i}]: repeats {repeated[0]} {repeated[1]!r} ({port.protocol}) "
                                           "of an earlier port; skipped"))
            continue
        seen.update(claims)
        ports.append(port)
    return tuple(ports)


def _service_port(raw: Any, i: int, svc_type: str, several: bool) -> ServicePort:
    where = f"spec.ports[{i}]"
    raw = _mapping(raw, where)
    pname = raw.get("name") or ""
    if pname:
        _name(pname, f"{where}.name")
    elif several:
        raise InvalidObject("invalid_name", f"{where}: has no name but the Service has several ports")
    protocol = _protocol(raw.get("protocol"), f"{where}.protocol")
    number = _port(raw.get("port"), f"{where}.port")
    node_port = raw.get("nodePort")
    if svc_type == "ClusterIP" or node_port is None or node_port == 0:
        node_port = None
    else:
        node_port = _port(node_port, f"{where}.nodePort")
    return ServicePort(pname, protocol, number, node_port)


def _load_balancer_ips(obj: Mapping[str, Any], notes: Notes | None) -> tuple[str, ...]:
    status = _mapping(_mapping(obj.get("status"), "status").get("loadBalancer"), "status.loadBalancer")
    ips = []
    for i, raw in enumerate(_list(status.get("ingress"), "status.loadBalancer.ingress")):
        entry = _part(notes, _mapping, raw, f"status.loadBalancer.ingress[{i}]")
        # ipMode Proxy: the load balancer proxies to the nodes itself, so the
        # LB IP must not be short-circuited on the node (as upstream, KEP-1860).
        if not entry or not entry.get("ip") or entry.get("ipMode", "VIP") == "Proxy":
            continue
        ip = _part(notes, _ip, entry["ip"], f"status.loadBalancer.ingress[{i}].ip", special_ok=False)
        if ip is not None:
            ips.append(ip)
    return tuple(ips)


def _source_ranges(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.loadBalancerSourceRanges. A bad range invalidates the Service: skipping it would open
    the load balancer wider than asked. (As upstream, the beta annotation of the same name is
    left to the cloud's load balancer.)"""
    ranges = _list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    # The API server validates each range with surrounding white space trimmed, and so does upstream.
    trimmed = [r.strip(_WHITE_SPACE) if isinstance(r, str) else r for r in ranges]
    return tuple(_cidr(r, f"spec.loadBalancerSourceRanges[{i}]") for i, r in enumerate(trimmed) if r != "")


_WHITE_SPACE = " \t\n\r\v\f"


def _affinity(spec: Mapping[str, Any]) -> int | None:
    affinity = spec.get("sessionAffinity")
    if affinity in (None, "None"):
        return None
    if affinity != "ClientIP":
        raise InvalidObject("malformed", f"spec.sessionAffinity: {show(affinity)} is not None or ClientIP")
    config = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    timeout = _mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP").get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
        raise InvalidObject(
            "malformed", f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {show(timeout)} is not in 1-86400"
        )
    return timeout


def _traffic_distribution(value: Any) -> str | None:
    """Any label-like value is kept (upstream ignores the ones it does not know)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 63 or not validate.LABEL_VALUE.fullmatch(value):
        raise InvalidObject("malformed", f"spec.trafficDistribution: {show(value)} is malformed; ignored")
    return value


def _count(text: str, what: str, low: int) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < low:
        raise InvalidObject("invalid_annotation", f"{what}: {show(text)} is not a whole number >= {low}; ignored")
    return int(text)


def _rate_limit(annotations: Mapping[str, str], name: str = RATE_LIMIT_ANNOTATION,
                burst_name: str = RATE_LIMIT_BURST_ANNOTATION) -> RateLimit | None:
    """``kproxy.io/rate-limit`` (or ``-total``) and its ``-burst``: ``<n>/second`` or ``<n>/minute``, a burst >= 1."""
    rate = annotations.get(name)
    burst = annotations.get(burst_name)
    if rate is None:
        if burst is not None:
            raise InvalidObject("invalid_annotation", f"{burst_name} is set without {name}; ignored")
        return None
    number, _, unit = rate.strip().partition("/")
    if unit not in _RATE_UNITS:
        raise InvalidObject("invalid_annotation", f"{name}: {show(rate)} is not '<n>/second' or '<n>/minute'; ignored")
    count = _count(number, name, 1)
    # nft has no burst of 0 (it stands for its default, 5): the smallest burst is 1.
    burst_value = _count(burst.strip(), burst_name, 1) if burst is not None else None
    # The kernel keeps (nanoseconds per unit / rate) x burst in 64 bits, and refuses the rule otherwise.
    if (_UNIT_NS[unit] // count) * (burst_value or 5) >= 2**64:
        raise InvalidObject("invalid_annotation", f"{burst_name}: {burst_value} is too large for "
                            f"{count}/{unit} (the kernel's bucket would overflow); ignored")
    return RateLimit(count, unit, burst_value)  # type: ignore[arg-type]


def _connection_limit(annotations: Mapping[str, str]) -> int | None:
    """``kproxy.io/limit-connections``: a whole number of concurrent connections per client, at least 1."""
    value = annotations.get(CONNECTION_LIMIT_ANNOTATION)
    return None if value is None else _count(value.strip(), CONNECTION_LIMIT_ANNOTATION, 1)


_BYTE_UNITS = {"bytes": 1, "kbytes": 1024, "mbytes": 1024 * 1024}
_BANDWIDTH = re.compile(r"([0-9]{1,9}) ?(bytes|kbytes|mbytes)/second")
_AMOUNT = re.compile(r"([0-9]{1,9}) ?(bytes|kbytes|mbytes)")


def _bandwidth_limit(annotations: Mapping[str, str]) -> BandwidthLimit | None:
    """``kproxy.io/bandwidth-limit``: ``<n> kbytes/second`` (bytes, kbytes or mbytes); ``-burst``: ``<n> kbytes``.

    nft's units: a kbyte is 1024 bytes, an mbyte 1024 kbytes.
    """
    rate = annotations.get(BANDWIDTH_LIMIT_ANNOTATION)
    burst = annotations.get(BANDWIDTH_LIMIT_BURST_ANNOTATION)
    if rate is None:
        if burst is not None:
            raise InvalidObject("invalid_annotation",
                                f"{BANDWIDTH_LIMIT_BURST_ANNOTATION} is set without {BANDWIDTH_LIMIT_ANNOTATION}; ignored")
        return None
    found = _BANDWIDTH.fullmatch(rate.strip())
    if found is None or int(found.group(1)) == 0:
        raise InvalidObject("invalid_annotation", f"{BANDWIDTH_LIMIT_ANNOTATION}: {show(rate)} is not "
                            "'<n> kbytes/second' or '<n> mbytes/second' (n >= 1); ignored")
    rate_bytes = int(found.group(1)) * _BYTE_UNITS[found.group(2)]
    burst_bytes = None
    if burst is not None:
        amount = _AMOUNT.fullmatch(burst.strip())
        if amount is None or int(amount.group(1)) == 0:
            raise InvalidObject("invalid_annotation", f"{BANDWIDTH_LIMIT_BURST_ANNOTATION}: {show(burst)} is not "
                                "'<n> kbytes' or '<n> mbytes' (n >= 1); ignored")
        burst_bytes = int(amount.group(1)) * _BYTE_UNITS[amount.group(2)]
        if burst_bytes >= 2**32:  # the kernel takes a burst of 32 bits
            raise InvalidObject("invalid_annotation", f"{BANDWIDTH_LIMIT_BURST_ANNOTATION}: {show(burst)} is 4 GiB "
                                "or more, more than the kernel takes; ignored")
    # The kernel keeps nanoseconds per second x (rate + burst) in 64 bits, and refuses the rule otherwise.
    if 10**9 * (rate_bytes + (burst_bytes or 0)) >= 2**64:
        raise InvalidObject("invalid_annotation", f"{BANDWIDTH_LIMIT_ANNOTATION}: {show(rate)} is more than the "
                            "kernel's bucket holds; ignored")
    return BandwidthLimit(rate_bytes, burst_bytes)


def _limit_allowlist(annotations: Mapping[str, str]) -> tuple[str, ...]:
    """``kproxy.io/limit-allowlist``: comma-separated CIDRs, each validated as loadBalancerSourceRanges are.

    One bad range skips the whole annotation (its clients are then limited like
    any other), never the Service.
    """
    value = annotations.get(LIMIT_ALLOWLIST_ANNOTATION)
    if value is None:
        return ()
    ranges = [r.strip(_WHITE_SPACE) for r in value.split(",")]
    try:
        return tuple(dict.fromkeys(validate.cidr(r) for r in ranges if r))
    except validate.FieldError as exc:
        raise InvalidObject("invalid_annotation", f"{LIMIT_ALLOWLIST_ANNOTATION}: {exc}; ignored") from None


def _metrics(annotations: Mapping[str, str]) -> bool:
    """``kproxy.io/metrics``: "true" opts the Service in to per-Service series; "false" or no annotation does not."""
    value = annotations.get(METRICS_ANNOTATION)
    if value is None or value == "false":
        return False
    if value != "true":
        raise InvalidObject("invalid_annotation", f"{METRICS_ANNOTATION}: {show(value)} is not \"true\" or \"false\"; "
                            "the Service exports no per-Service metrics")
    return True


# --- EndpointSlices ---------------------------------------------------------


def slice_from_manifest(obj: Mapping[str, Any], notes: Notes | None = None) -> EndpointSlice:
    """Convert a discovery.k8s.io/v1 EndpointSlice. Raises InvalidObject, or NotProxied for a slice
    proxies ignore (FQDN, or no Service label); parts skipped go to ``notes``."""
    with _whole_object():
        return _slice(obj, notes)


def _slice(obj: Mapping[str, Any], notes: Notes | None) -> EndpointSlice:
    if not isinstance(obj, dict):
        raise InvalidObject("malformed", f"the object is a {type(obj).__name__}, not a mapping")
    meta = _mapping(obj.get("metadata"), "metadata")
    namespace = _name(meta.get("namespace", "default"), "metadata.namespace")
    name = _name(meta.get("name"), "metadata.name", DNS_SUBDOMAIN, 253)
    # (the labels and annotations read, rather than copies of every string one: 100k slices at 30k Services)
    service_label = _mapping(meta.get("labels"), "metadata.labels").get(SERVICE_NAME_LABEL)
    if not isinstance(service_label, str):
        raise NotProxied(f"{namespace}/{name}: no {SERVICE_NAME_LABEL} label (a slice no Service owns)")
    if obj.get("addressType") == "FQDN":
        raise NotProxied(f"{namespace}/{name}: an FQDN slice (proxies do not use them)")
    service_name = _name(service_label, f"label {SERVICE_NAME_LABEL}", DNS_1035_LABEL)
    address_type = obj.get("addressType")
    if not isinstance(address_type, str) or address_type not in _FAMILIES:
        # FQDN slices are not used by proxies.
        raise InvalidObject("family_mismatch", f"addressType: {show(address_type)} is not IPv4 or IPv6")
    family = _FAMILIES[address_type]

    ports: list[EndpointPort] = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        port = _part(notes, _slice_port, raw, i)
        if port is not None:
            ports.append(port)
    endpoints = []
    for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        try:  # (inline rather than _part: this loop runs 100k times at 10k Services)
            endpoint = _endpoint(raw, i, family, address_type, notes)
        except InvalidObject as exc:
            if notes is not None:
                notes.append((exc.reason, str(exc)))
            continue
        if endpoint is not None:
            endpoints.append(endpoint)
    trigger_time = _mapping(meta.get("annotations"), "metadata.annotations").get(TRIGGER_TIME_ANNOTATION)
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=service_name,
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=trigger_time if isinstance(trigger_time, str) else None,
    )


def _slice_port(raw: Any, i: int) -> EndpointPort | None:
    raw = _mapping(raw, f"ports[{i}]")
    pname = raw.get("name") or ""
    if pname:
        _name(pname, f"ports[{i}].name")
    port = raw.get("port")
    if port is None:
        return None  # upstream ignores ports without a number
    return EndpointPort(pname, _protocol(raw.get("protocol"), f"ports[{i}].protocol"), _port(port, f"ports[{i}].port"))


_EMPTY: frozenset[str] = frozenset()
_NODE_NAMES: dict[str, bool] = {}
"""Node names already validated: a slice repeats a handful of names many times."""
_ENDPOINT_IPS: dict[str, str] = {}
"""Endpoint addresses already validated (canonical form): the same pods appear in every relist."""


def _hint_names(hints: Mapping[str, Any], key: str, where: str, notes: Notes | None) -> frozenset[str]:
    """Hint names (compared, never written into rules): zones are label values, nodes DNS subdomains.

    A bad name is left out alone; the endpoint is kept (it has fewer hints,
    which at worst turns topology off for its Service, as upstream does).
    """
    raw = hints.get(key)
    if not raw:
        return _EMPTY
    pattern, limit = (validate.LABEL_VALUE, 63) if key == "forZones" else (DNS_SUBDOMAIN, 253)
    names = set()
    for j, hint in enumerate(_list(raw, f"{where}.{key}")):
        value = _mapping(hint, f"{where}.{key}[{j}]").get("name")
        if value:
            name = _part(notes, _name, value, f"{where}.{key}[{j}].name", pattern, limit)
            if name is not None:
                names.add(name)
    return frozenset(names)


def _endpoint(raw: Any, i: int, family: IPFamily, address_type: str, notes: Notes | None = None) -> Endpoint | None:
    """One endpoint of a slice (hot: 100k of them at 10k Services). Error texts are built only on error."""
    if type(raw) is not dict:
        raw = _mapping(raw, f"endpoints[{i}]")
    addresses = raw.get("addresses")
    if not addresses:
        return None
    if type(addresses) is not list:
        _list(addresses, f"endpoints[{i}].addresses")
    first = addresses[0]
    address = _ENDPOINT_IPS.get(first) if type(first) is str else None
    if address is None:
        address = _ip(first, f"endpoints[{i}].addresses[0]", special_ok=False)
        if len(_ENDPOINT_IPS) >= 200_000:
            _ENDPOINT_IPS.clear()  # bounded: pods come and go
        _ENDPOINT_IPS[first] = address
    if ip_family(address) != family:
        raise InvalidObject("family_mismatch", f"endpoints[{i}].addresses[0]: {address} is not of addressType {address_type}")
    cond = raw.get("conditions") or {}
    if type(cond) is not dict:
        cond = _mapping(cond, f"endpoints[{i}].conditions")
    ready = cond.get("ready")
    ready = True if ready is None else ready
    serving = cond.get("serving")
    serving = True if serving is None else serving  # as upstream: an unset condition is true
    terminating = cond.get("terminating")
    terminating = False if terminating is None else terminating
    if type(ready) is not bool or type(serving) is not bool or type(terminating) is not bool:
        raise InvalidObject("malformed", f"endpoints[{i}].conditions: a condition is not a boolean")
    hints = raw.get("hints")
    zones = nodes = _EMPTY
    if hints:
        hints = _mapping(hints, f"endpoints[{i}].hints")
        zones = _hint_names(hints, "forZones", f"endpoints[{i}].hints", notes)
        nodes = _hint_names(hints, "forNodes", f"endpoints[{i}].hints", notes)
    node_name = raw.get("nodeName")
    if node_name is not None and (type(node_name) is not str or node_name not in _NODE_NAMES):
        _name(node_name, f"endpoints[{i}].nodeName", DNS_SUBDOMAIN, 253)
        if len(_NODE_NAMES) < 100_000:
            _NODE_NAMES[node_name] = True
    zone = raw.get("zone")
    return Endpoint(address, ready, serving, terminating, node_name, zone if isinstance(zone, str) else None,
                    zones, nodes)


# --- Nodes ------------------------------------------------------------------


def node_from_manifest(obj: Mapping[str, Any], notes: Notes | None = None) -> Node:
    """Convert a v1 Node. Raises InvalidObject; addresses skipped go to ``notes``."""
    with _whole_object():
        return _node(obj, notes)


def _node(obj: Mapping[str, Any], notes: Notes | None) -> Node:
    if not isinstance(obj, dict):
        raise InvalidObject("malformed", f"the object is a {type(obj).__name__}, not a mapping")
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _name(meta.get("name"), "metadata.name", DNS_SUBDOMAIN, 253)
    internal: list[str] = []
    external: list[str] = []
    for i, raw in enumerate(_list(_mapping(obj.get("status"), "status").get("addresses"), "status.addresses")):
        entry = _part(notes, _mapping, raw, f"status.addresses[{i}]")
        if not entry or entry.get("type") not in ("InternalIP", "ExternalIP"):
            continue
        # The API server does not validate node addresses; upstream skips the ones it cannot parse.
        address = _part(notes, _ip, entry.get("address"), f"status.addresses[{i}].address")
        if address is not None:
            (internal if entry["type"] == "InternalIP" else external).append(address)
    spec = _mapping(obj.get("spec"), "spec")
    taints = _list(spec.get("taints"), "spec.taints")
    # Only compared with clusterCIDR (a startup warning): a bad one is skipped alone, never the Node.
    if spec.get("podCIDRs"):
        listed = _part(notes, _list, spec["podCIDRs"], "spec.podCIDRs") or []
        entries = [(raw, f"spec.podCIDRs[{i}]") for i, raw in enumerate(listed)]
    else:
        entries = [(spec["podCIDR"], "spec.podCIDR")] if spec.get("podCIDR") else []
    pod_cidrs = [cidr for raw, what in entries if (cidr := _part(notes, _cidr, raw, what)) is not None]
    deleting = bool(meta.get("deletionTimestamp")) or any(
        _mapping(t, f"spec.taints[{i}]").get("key") == TO_BE_DELETED_TAINT for i, t in enumerate(taints)
    )
    return Node(
        name=name,
        internal_ips=tuple(internal),
        external_ips=tuple(external),
        labels=_str_map(meta.get("labels"), "metadata.labels"),
        being_deleted=deleting,
        pod_cidrs=tuple(pod_cidrs),
    )


# --- ServiceCIDRs -------------------------------------------------------------


def service_cidr_from_manifest(obj: Mapping[str, Any], notes: Notes | None = None) -> ServiceCIDR:
    """Convert a networking.k8s.io/v1 ServiceCIDR. Raises InvalidObject; a bad range is skipped alone."""
    with _whole_object():
        if not isinstance(obj, dict):
            raise InvalidObject("malformed", f"the object is a {type(obj).__name__}, not a mapping")
        meta = _mapping(obj.get("metadata"), "metadata")
        name = _name(meta.get("name"), "metadata.name", DNS_SUBDOMAIN, 253)
        cidrs = [
            cidr for i, raw in enumerate(_list(_mapping(obj.get("spec"), "spec").get("cidrs"), "spec.cidrs"))
            if (cidr := _part(notes, _cidr, raw, f"spec.cidrs[{i}]")) is not None
        ]
        return ServiceCIDR(name, tuple(cidrs))


# --- whole inputs -----------------------------------------------------------


def build_cluster(objects: Iterable[Mapping[str, Any]], node_name: str) -> tuple[Cluster, list[Problem]]:
    """Convert a bag of manifests. Bad objects are left out and reported, as are duplicates and conflicts."""
    with gc_paused():
        return _build_cluster(objects, node_name)


def _build_cluster(objects: Iterable[Mapping[str, Any]], node_name: str) -> tuple[Cluster, list[Problem]]:
    services: dict[ServiceKey, Service] = {}
    slices: dict[SliceKey, EndpointSlice] = {}
    service_cidrs: dict[str, ServiceCIDR] = {}
    node: Node | None = None
    problems: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if kind not in ("Service", "EndpointSlice", "Node", "ServiceCIDR"):
            log.debug("ignoring object of kind %s", _safe(kind))
            continue
        key = object_key(obj)
        notes: Notes = []
        try:
            if kind == "Service":
                try:
                    svc = service_from_manifest(obj, notes)
                except NotProxied:
                    log.debug("not proxying Service %s", key)
                    continue
                services[svc.key] = svc
                seen[("Service", svc.key)] = seen.get(("Service", svc.key), 0) + 1
            elif kind == "EndpointSlice":
                try:
                    eps = slice_from_manifest(obj, notes)
                except NotProxied as why:
                    log.debug("not using EndpointSlice %s", why)
                    continue
                slices[eps.key] = eps
                seen[("EndpointSlice", eps.key)] = seen.get(("EndpointSlice", eps.key), 0) + 1
            elif kind == "ServiceCIDR":
                cidr = service_cidr_from_manifest(obj, notes)
                service_cidrs[cidr.name] = cidr
            elif isinstance(_mapping(obj.get("metadata"), "metadata").get("name"), str) and obj["metadata"]["name"] == node_name:
                node = node_from_manifest(obj, notes)
                seen[("Node", node.name)] = seen.get(("Node", node.name), 0) + 1
        except InvalidObject as exc:
            problems.append(Problem(str(kind), key, exc.reason, str(exc)))
        problems.extend(Problem(str(kind), key, reason, message, part=True) for reason, message in notes)
    for (kind, key), count in sorted(seen.items()):
        if count > 1:
            problems.append(Problem(kind, key, "duplicate", f"defined {count} times in the input; the last one is used"))
    node_addresses = (node.internal_ips + node.external_ips) if node is not None else ()
    problems.extend(Problem("Service", str(c.loser), "conflict", str(c), part=True)
                    for c in find_conflicts(services, node_addresses))
    cluster = Cluster(services=services, slices=slices, node=node, service_cidrs=union_of_cidrs(service_cidrs.values()))
    return cluster, problems
