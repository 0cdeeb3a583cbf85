"""The daemon's configuration: kube-proxy compatible flags and a KubeProxyConfiguration file.

``add_daemon_flags`` adds kube-proxy's flags (same names, same meanings) to a
parser; ``daemon_config`` turns the parsed flags, and the ``--config`` file if
one is given, into a ``DaemonConfig``. A flag given on the command line wins
over the file; the file wins over the defaults.

The file is a ``kubeproxy.config.k8s.io/v1alpha1`` ``KubeProxyConfiguration``,
the same file kube-proxy reads (kubeadm keeps it in the ``kube-proxy``
ConfigMap). Every field upstream defines is accepted and nothing is silent:
``FIELDS`` says, for each one, whether kproxy applies it, accepts only the
value it implements (any other stops it at startup), or ignores it with one
warning at startup that names the field and says why. As upstream's
defaulting does, a zero value in the file (``""``, ``0s``, ``null``, an empty
list) means "not set": kubeadm writes every field, most of them zero. A few
fields warn even when unset, because kube-proxy would apply a default there
that kproxy does not (the conntrack sysctls, localhost NodePorts). An unknown
field, a value of the wrong type or an invalid value is a ``ConfigError``
whose one-line message names the file and the field path.

Flags are stored as given (strings) and checked here, not by argparse, so a
bad flag also gives a ``ConfigError`` that names the flag.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from kproxy.cluster.manifests import ManifestError, load_yaml_file
from kproxy.cluster.model import DEFAULT_SERVICE_METRICS, SERVICE_METRICS
from kproxy.rules.compiler import ProxyConfig

log = logging.getLogger(__name__)

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"

DEFAULT_MIN_SYNC_PERIOD = 0.1
DEFAULT_SYNC_PERIOD = 30.0
DEFAULT_METRICS_PORT = 10249
DEFAULT_HEALTHZ_PORT = 10256
DEFAULT_METRICS_BIND_ADDRESS = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
DEFAULT_HEALTHZ_BIND_ADDRESS = f"0.0.0.0:{DEFAULT_HEALTHZ_PORT}"
LOG_FORMATS = ("text", "json")
DEBUG_VERBOSITY = 4
"""logging.verbosity at or above this (klog's debug convention) means log level "debug"."""


class ConfigError(ValueError):
    """Bad flags or a bad config file. The message is one line naming the flag or the file and field."""


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon is configured with, after merging flags, file and defaults."""

    node_name: str
    """--hostname-override / hostnameOverride; default: $NODE_NAME, else the hostname, lowercased."""
    cluster_cidrs: tuple[str, ...] = ()
    """--cluster-cidr / clusterCIDR: pod CIDRs, canonical (``10.244.0.0/16``)."""
    nodeport_addresses: tuple[str, ...] = ()
    """--nodeport-addresses / nodePortAddresses as CIDRs; empty means 'primary' (the node's primary IPs)."""
    masquerade_all: bool = False
    """--masquerade-all / nftables.masqueradeAll: masquerade all traffic to ClusterIPs."""
    min_sync_period: float = DEFAULT_MIN_SYNC_PERIOD
    """--min-sync-period / nftables.minSyncPeriod, seconds: the least time between two syncs."""
    sync_period: float = DEFAULT_SYNC_PERIOD
    """--sync-period / nftables.syncPeriod, seconds: a sync (of what changed) at least this often; the full
    resync, which reads the tables back and repairs them, is hourly (and at startup, after a failure, on SIGHUP)."""
    metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS
    """--metrics-bind-address / metricsBindAddress: ``HOST:PORT``, normalised; port 0 = any free port."""
    healthz_bind_address: str = DEFAULT_HEALTHZ_BIND_ADDRESS
    """--healthz-bind-address / healthzBindAddress: ``HOST:PORT``, normalised; port 0 = any free port."""
    kubeconfig: str | None = None
    """--kubeconfig / clientConnection.kubeconfig; None means the in-cluster configuration."""
    kubeconfig_source: str = field(default="", compare=False)
    """Where ``kubeconfig`` came from (``--kubeconfig``, or ``FILE: clientConnection.kubeconfig``), for errors."""
    log_format: str = "text"
    """--log-format / logging.format: "text" or "json"."""
    log_level: str = "info"
    """"info", or "debug" with -v (or logging.verbosity >= 4 in the file)."""
    service_metrics: str = DEFAULT_SERVICE_METRICS
    """--service-metrics (kproxy's own, no file field): which Services export per-Service series:
    "annotated" (``kproxy.io/metrics: "true"``), "all" or "none"."""
    expose_rules: bool = False
    """--expose-rules (kproxy's own, no file field): serve /rules and /skipped to any client, not only loopback."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """The --config file's ignored fields, one line each (FIELDS): logged at startup."""

    def nodeport_summary(self) -> str:
        """Which node addresses accept NodePorts, and why: the startup log says it."""
        if self.nodeport_addresses:
            return f"NodePorts answer on the node's addresses in {', '.join(self.nodeport_addresses)}"
        return ("NodePorts answer on the node's primary IPs only (nodePortAddresses unset means 'primary', as in "
                "kube-proxy's nftables mode; its iptables and IPVS modes answer on every local IP)")

    def proxy_config(self) -> ProxyConfig:
        """The subset the compiler needs."""
        return ProxyConfig(
            cluster_cidrs=self.cluster_cidrs,
            nodeport_addresses=self.nodeport_addresses,
            masquerade_all=self.masquerade_all,
            service_metrics=self.service_metrics,
        )


# --- small reusable validators ------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _show_yaml(value: Any) -> str:
    """A value as the file spells it (``true``, ``"30s"``, ``[1, 2]``), shortened."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


@contextmanager
def _field(label: str) -> Iterator[None]:
    """Prefix a ConfigError raised inside with the flag or field it is about."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None


_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "\u00b5s": 10**3,  # micro sign
    "\u03bcs": 10**3,  # Greek mu
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_MAX_DURATION_NS = 2**63 - 1


def parse_duration(text: str) -> float:
    """Seconds from a Go duration (``1s``, ``100ms``, ``1m30s``, ``1h``, ``0.5s``, ``0``); sign allowed, as in Go."""
    bad = ConfigError(f"invalid duration {_show(text)} (Go duration syntax, e.g. '100ms', '1s', '1m30s')")
    if not isinstance(text, str):
        raise bad
    rest, sign = text, 1
    if rest[:1] in ("+", "-"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise bad
    total = Decimal(0)
    pos = 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            raise bad
        total += Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    nanoseconds = int(total)  # Go truncates below a nanosecond
    if nanoseconds > _MAX_DURATION_NS:
        raise ConfigError(f"duration {text!r} is out of range (at most about 292 years)")
    return sign * nanoseconds / 1e9


def parse_bind_address(text: str) -> tuple[str, int]:
    """(host, port) from ``IP:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (host "" = all addresses); port 0 = any free port."""
    if not isinstance(text, str):
        raise ConfigError(f"expected HOST:PORT, got {_show(text)}")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(f"invalid address {text!r} (expected HOST:PORT, e.g. '[::1]:10249')")
        host, port = text[1:close], text[close + 2 :]
        if ":" not in host:
            raise ConfigError(f"invalid address {text!r}: brackets are for IPv6 addresses only")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ConfigError(f"invalid address {text!r} (expected HOST:PORT, e.g. '0.0.0.0:10256')")
        if ":" in host:
            raise ConfigError(f"invalid address {text!r}: put an IPv6 address in brackets, e.g. '[::1]:10249'")
    if host:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ConfigError(f"invalid address {text!r}: {host!r} is not an IP address") from None
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"invalid address {text!r}: port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def format_bind_address(host: str, port: int) -> str:
    """The inverse of parse_bind_address: ``1.2.3.4:80``, ``[::1]:80``, ``:80``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _normal_bind_address(text: str) -> str:
    return format_bind_address(*parse_bind_address(text))


def parse_cidr(text: str) -> str:
    """One CIDR, canonical (host bits cleared: ``10.0.0.1/8`` -> ``10.0.0.0/8``)."""
    if not isinstance(text, str) or "/" not in text:
        raise ConfigError(f"{_show(text)} is not a CIDR (expected e.g. '10.244.0.0/16')")
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ConfigError(f"{text!r} is not a CIDR (expected e.g. '10.244.0.0/16')") from None


def parse_cidrs(text: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (``--cluster-cidr``), canonical; empty parts are skipped."""
    if not isinstance(text, str):
        raise ConfigError(f"expected comma-separated CIDRs, got {_show(text)}")
    return tuple(parse_cidr(part) for part in (p.strip() for p in text.split(",")) if part)


def _nodeport_items(items: list[str]) -> tuple[str, ...]:
    """CIDRs and the keywords 'primary' and 'all' -> CIDRs; () means 'primary'."""
    items = [item.strip() for item in items if item.strip()]
    if "primary" in items:
        if len(items) > 1:
            raise ConfigError(f"{','.join(items)!r}: kproxy takes either 'primary' or a list of CIDRs, not both")
        return ()
    if "localhost" in items:
        raise ConfigError("'localhost': kproxy never serves NodePorts on loopback addresses")
    cidrs: list[str] = []
    for item in items:
        for cidr in ("0.0.0.0/0", "::/0") if item == "all" else (parse_cidr(item),):
            if cidr not in cidrs:
                cidrs.append(cidr)
    return tuple(cidrs)


def parse_nodeport_addresses(text: str) -> tuple[str, ...]:
    """``--nodeport-addresses``: comma-separated CIDRs, or 'all'; 'primary' (and "") give (), the default."""
    if not isinstance(text, str):
        raise ConfigError(f"expected CIDRs or 'primary', got {_show(text)}")
    return _nodeport_items(text.split(","))


def parse_bool(text: str) -> bool:
    """A Go flag boolean: true/false, 1/0, t/f (any case)."""
    value = text.strip().lower() if isinstance(text, str) else text
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise ConfigError(f"{_show(text)} is not a boolean (true or false)")


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def parse_node_name(text: str) -> str:
    """A node name, trimmed and lowercased as kube-proxy does; must be a DNS subdomain."""
    if not isinstance(text, str):
        raise ConfigError(f"expected a node name, got {_show(text)}")
    name = text.strip().lower()
    if not name:
        raise ConfigError("the node name is empty")
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ConfigError(f"{text!r} is not a valid node name (a DNS subdomain: a-z, 0-9, '-' and '.')")
    return name


def parse_log_format(text: str) -> str:
    """'text' or 'json'."""
    if text not in LOG_FORMATS:
        raise ConfigError(f"{_show(text)} is not a log format (text or json)")
    return text


# --- the KubeProxyConfiguration schema ----------------------------------------------------------

_UNSET = object()
"""A checker's answer for a zero value: upstream would default it, so the field counts as not set."""


def parse_service_metrics(text: str) -> str:
    """``--service-metrics``: none, annotated or all."""
    if text not in SERVICE_METRICS:
        raise ConfigError(f"{_show(text)} is not one of {', '.join(SERVICE_METRICS)}")
    return text


def _type_error(expected: str, value: Any) -> ConfigError:
    return ConfigError(f"expected {expected}, got {_show(value)}")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error("a string", value)
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error("true or false", value)
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error("an integer", value)
        if not low <= value <= high:
            raise ConfigError(f"{value} is out of range (from {low} to {high})")
        return value

    return check


_INT32 = _integer(-(2**31), 2**31 - 1)
_UINT32 = _integer(0, 2**32 - 1)
_NON_NEGATIVE_INT32 = _integer(0, 2**31 - 1)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error("a number", value)
    return float(value)


def _duration(value: Any) -> float:
    """A metav1.Duration: a string (a bare number is an error upstream too), not negative."""
    if not isinstance(value, str):
        raise _type_error("a duration string such as '30s'", value)
    seconds = parse_duration(value)
    if seconds < 0:
        raise ConfigError(f"duration {value!r} must not be negative")
    return seconds


def _duration_or_nanoseconds(value: Any) -> float:
    """logging.flushFrequency: a duration string, or an integer number of nanoseconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"duration {value} must not be negative")
        return value / 1e9
    return _duration(value)


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _type_error("a list of strings", value)
    return value


def _cidr_list(value: Any) -> tuple[str, ...]:
    return tuple(parse_cidr(item) for item in _string_list(value))


def _feature_gates(value: Any) -> dict[str, bool]:
    if not isinstance(value, dict):
        raise _type_error("a map of feature names to true/false", value)
    for name, enabled in value.items():
        if not isinstance(name, str) or not isinstance(enabled, bool):
            raise ConfigError(f"{_show(name)}: expected true or false, got {_show(enabled)}")
    return value


_QUANTITY = re.compile(r"\+?(\d+\.?\d*|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")


def _quantity(value: Any) -> Any:
    """A resource.Quantity such as ``0``, ``64Ki`` or ``1M``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _QUANTITY.fullmatch(value):
        return value
    raise _type_error("a quantity such as '0' or '64Ki'", value)


def _ip(value: Any) -> str:
    if _string(value) == "":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address") from None


def _one_of(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if _string(value) not in allowed:
            raise ConfigError(f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value

    return check


def _mode(value: Any) -> str:
    if _string(value) not in ("", "nftables"):
        raise ConfigError(f"{value!r}: kproxy is an nftables proxy; set mode to 'nftables' or leave it empty")
    return value


def _detect_local_mode(value: Any) -> str:
    _one_of("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")(value)
    if value not in ("", "ClusterCIDR"):
        # Running with another mode would treat pod traffic as external: short-circuits and
        # masquerade would differ from kube-proxy's. Refuse rather than differ.
        raise ConfigError(f"{value!r} is not supported: kproxy detects local (pod) traffic by clusterCIDR only; "
                          "set detectLocalMode: ClusterCIDR and clusterCIDR to the pod CIDRs")
    return value


# Checkers of the fields kproxy applies; each returns _UNSET for a zero value.


def _set_string(value: Any) -> Any:
    return _string(value) or _UNSET


def _set_node_name(value: Any) -> Any:
    return parse_node_name(value) if _string(value) else _UNSET


def _set_cidrs(value: Any) -> Any:
    return parse_cidrs(_string(value)) or _UNSET


def _set_nodeport_addresses(value: Any) -> Any:
    items = _string_list(value)
    return _nodeport_items(items) if items else _UNSET


def _set_true(value: Any) -> Any:
    return _boolean(value) or _UNSET


def _set_duration(value: Any) -> Any:
    return _duration(value) or _UNSET


def _set_bind_address(value: Any) -> Any:
    return _normal_bind_address(value) if _string(value) else _UNSET


def _set_log_format(value: Any) -> Any:
    return parse_log_format(value) if _string(value) else _UNSET


def _set_log_level(value: Any) -> Any:
    verbosity = _UINT32(value)
    return "debug" if verbosity >= DEBUG_VERBOSITY else _UNSET


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A scalar (or list, or map) field: its checker and, if kproxy applies it, the DaemonConfig field."""

    check: Callable[[Any], Any]
    target: str | None = None


@dataclass(frozen=True, slots=True)
class _ListOf:
    """A list of structs."""

    schema: Mapping[str, _Schema]


_Schema = _Leaf | _ListOf | Mapping[str, Any]

_MARK = "kproxy always marks packets to masquerade with bit 14 (0x4000), kube-proxy's default"


def _masquerade_bit(value: Any) -> int:
    bit = _integer(0, 31)(value)
    if bit != 14:
        raise ConfigError(f"{bit} is not supported: {_MARK}; a CNI that needs bit 14 cannot run beside kproxy")
    return bit


_OUTPUT_ROUTING = {"splitStream": _Leaf(_boolean), "infoBufferSize": _Leaf(_quantity)}

SCHEMA: Mapping[str, _Schema] = {
    "apiVersion": _Leaf(_string),
    "kind": _Leaf(_string),
    "featureGates": _Leaf(_feature_gates),
    "clientConnection": {
        "kubeconfig": _Leaf(_set_string, target="kubeconfig"),
        "acceptContentTypes": _Leaf(_string),
        "contentType": _Leaf(_string),
        "qps": _Leaf(_number),
        "burst": _Leaf(_INT32),
    },
    "logging": {
        "format": _Leaf(_set_log_format, target="log_format"),
        "flushFrequency": _Leaf(_duration_or_nanoseconds),
        "verbosity": _Leaf(_set_log_level, target="log_level"),
        "vmodule": _ListOf({"filePattern": _Leaf(_string), "verbosity": _Leaf(_UINT32)}),
        "options": {"text": _OUTPUT_ROUTING, "json": _OUTPUT_ROUTING},
    },
    "hostnameOverride": _Leaf(_set_node_name, target="node_name"),
    "bindAddress": _Leaf(_ip),
    "healthzBindAddress": _Leaf(_set_bind_address, target="healthz_bind_address"),
    "metricsBindAddress": _Leaf(_set_bind_address, target="metrics_bind_address"),
    "bindAddressHardFail": _Leaf(_boolean),
    "enableProfiling": _Leaf(_boolean),
    "showHiddenMetricsForVersion": _Leaf(_string),
    "mode": _Leaf(_mode),
    "iptables": {
        "masqueradeBit": _Leaf(_masquerade_bit),
        "masqueradeAll": _Leaf(_set_true, target="masquerade_all"),
        "localhostNodePorts": _Leaf(_boolean),
        "snatNodeInternalIP": _Leaf(_boolean),
        "syncPeriod": _Leaf(_duration),
        "minSyncPeriod": _Leaf(_duration),
    },
    "ipvs": {
        "syncPeriod": _Leaf(_duration),
        "minSyncPeriod": _Leaf(_duration),
        "scheduler": _Leaf(_string),
        "excludeCIDRs": _Leaf(_cidr_list),
        "strictARP": _Leaf(_boolean),
        "tcpTimeout": _Leaf(_duration),
        "tcpFinTimeout": _Leaf(_duration),
        "udpTimeout": _Leaf(_duration),
    },
    "nftables": {
        "masqueradeBit": _Leaf(_masquerade_bit),
        "masqueradeAll": _Leaf(_set_true, target="masquerade_all"),
        "syncPeriod": _Leaf(_set_duration, target="sync_period"),
        "minSyncPeriod": _Leaf(_set_duration, target="min_sync_period"),
    },
    "winkernel": {
        "networkName": _Leaf(_string),
        "sourceVip": _Leaf(_string),
        "enableDSR": _Leaf(_boolean),
        "rootHnsEndpointName": _Leaf(_string),
        "forwardHealthCheckVip": _Leaf(_boolean),
    },
    "detectLocalMode": _Leaf(_detect_local_mode),
    "detectLocal": {
        "bridgeInterface": _Leaf(_string),
        "interfaceNamePrefix": _Leaf(_string),
    },
    "clusterCIDR": _Leaf(_set_cidrs, target="cluster_cidrs"),
    "nodePortAddresses": _Leaf(_set_nodeport_addresses, target="nodeport_addresses"),
    "oomScoreAdj": _Leaf(_integer(-1000, 1000)),
    "conntrack": {
        "maxPerCore": _Leaf(_NON_NEGATIVE_INT32),
        "min": _Leaf(_NON_NEGATIVE_INT32),
        "tcpEstablishedTimeout": _Leaf(_duration),
        "tcpCloseWaitTimeout": _Leaf(_duration),
        "tcpBeLiberal": _Leaf(_boolean),
        "udpTimeout": _Leaf(_duration),
        "udpStreamTimeout": _Leaf(_duration),
    },
    "configSyncPeriod": _Leaf(_duration),
    "portRange": _Leaf(_string),
    "windowsRunAsService": _Leaf(_boolean),
}
"""Every field of upstream's v1alpha1 KubeProxyConfiguration, nested structs as dicts."""


def _is_zero(value: Any) -> bool:
    """A value upstream's defaulting treats as not set (``null``, ``""``, ``0``, ``0s``, ``false``, empty)."""
    return value is None or value in ("", "0", False, 0, "0s") or value == [] or value == {}


# --- what kproxy does with each field -------------------------------------------------------------

APPLIED = "applied"
"""The value takes effect (a zero value leaves kproxy's default, as upstream's defaulting does)."""
CHECKED = "checked"
"""Only the values kproxy implements are accepted; any other stops it at startup with one line naming the field."""
IGNORED = "ignored"
"""No effect; one warning at startup names the field and says why, when its value would matter to kube-proxy."""


def _set(value: Any, _doc: Mapping[str, Any]) -> bool:
    return not _is_zero(value)


def _not_zero_duration(value: Any, _doc: Mapping[str, Any]) -> bool:
    """Unset (null) makes kube-proxy apply its default; an explicit 0 leaves the sysctl alone, as kproxy does."""
    return value is None or (isinstance(value, str) and parse_duration(value) != 0)


def _conntrack_max(value: Any, _doc: Mapping[str, Any]) -> bool:
    return value != 0


def _conntrack_min(value: Any, doc: Mapping[str, Any]) -> bool:
    return not _is_zero(value) and _lookup(doc, "conntrack.maxPerCore") != 0


def _iptables_mode(doc: Mapping[str, Any]) -> bool:
    """The file is kube-proxy's for its iptables mode (the default when ``mode`` is empty)."""
    return doc.get("mode") in (None, "", "iptables")


def _localhost_nodeports(value: Any, doc: Mapping[str, Any]) -> bool:
    return value is True or (value is None and _iptables_mode(doc))


def _not_true(value: Any, _doc: Mapping[str, Any]) -> bool:
    return value is not True


def _specific_address(value: Any, _doc: Mapping[str, Any]) -> bool:
    return isinstance(value, str) and value not in ("", "0.0.0.0", "::")


def _nodeports_unset_in_iptables_mode(value: Any, doc: Mapping[str, Any]) -> bool:
    return _is_zero(value) and _iptables_mode(doc)


def _lookup(doc: Mapping[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What kproxy does with one KubeProxyConfiguration field."""

    effect: str
    """APPLIED, CHECKED or IGNORED."""
    what: str
    """What kproxy does, for the docs and the warning: "why" for an ignored field."""
    warn_if: Callable[[Any, Mapping[str, Any]], bool] | None = None
    """Whether this value (None for null) gets the startup warning; the whole file is the second argument."""
    example: Any = None
    """A value that shows the decision: it takes effect (APPLIED), is refused (CHECKED) or warns (IGNORED)."""


_WINDOWS = "kproxy runs on Linux only; Windows' kube-proxy (winkernel) settings have no meaning here"
_IPVS = "kproxy has no IPVS mode: it programs nftables only"
_LOGGING = "kproxy writes each log line to stderr at once (-v or logging.verbosity >= 4 for debug, logging.format)"
_CLIENT = ("kproxy only lists and watches (one list and one open watch per kind, re-made with a backoff), "
           "in JSON; it has no client-side rate limit or content type to set")
_CONNTRACK = ("kproxy does not set conntrack sysctls (it is not privileged: /proc/sys is read-only for it); "
              "the node keeps its own values. Set them with the node's sysctl configuration")

FIELDS: Mapping[str, FieldRule] = {
    "apiVersion": FieldRule(CHECKED, "must be kubeproxy.config.k8s.io/v1alpha1", example="kubeproxy.config.k8s.io/v1beta1"),
    "kind": FieldRule(CHECKED, "must be KubeProxyConfiguration", example="KubeletConfiguration"),
    "featureGates": FieldRule(IGNORED, "kproxy has no feature gates: what it does is fixed per release (CHANGELOG.md)",
                              _set, {"KubeProxyNFTablesLocalhostNodePorts": True}),
    "clientConnection.kubeconfig": FieldRule(APPLIED, "--kubeconfig; unset: the in-cluster configuration",
                                             example="/var/lib/kube-proxy/other.conf"),
    "clientConnection.acceptContentTypes": FieldRule(IGNORED, _CLIENT, _set, "application/json"),
    "clientConnection.contentType": FieldRule(IGNORED, _CLIENT, _set, "application/vnd.kubernetes.protobuf"),
    "clientConnection.qps": FieldRule(IGNORED, _CLIENT, _set, 50),
    "clientConnection.burst": FieldRule(IGNORED, _CLIENT, _set, 100),
    "logging.format": FieldRule(APPLIED, "--log-format: text or json", example="json"),
    "logging.flushFrequency": FieldRule(IGNORED, _LOGGING, _set, "5s"),
    "logging.verbosity": FieldRule(APPLIED, "4 or more: debug (as -v); less: info", example=4),
    "logging.vmodule": FieldRule(IGNORED, "kproxy has no per-file verbosity (-v or logging.verbosity >= 4 for debug)",
                                 _set, [{"filePattern": "proxier*", "verbosity": 4}]),
    "logging.options.text.splitStream": FieldRule(IGNORED, _LOGGING, _set, True),
    "logging.options.text.infoBufferSize": FieldRule(IGNORED, _LOGGING, _set, "64Ki"),
    "logging.options.json.splitStream": FieldRule(IGNORED, _LOGGING, _set, True),
    "logging.options.json.infoBufferSize": FieldRule(IGNORED, _LOGGING, _set, "64Ki"),
    "hostnameOverride": FieldRule(APPLIED, "--hostname-override; unset: $NODE_NAME, else the hostname", example="node-b"),
    "bindAddress": FieldRule(
        APPLIED, "an IPv6 address makes the default health and metrics addresses [::]:10256 and [::1]:10249, "
        "as upstream; it does not choose the node's primary IP, which kproxy takes from its Node object "
        "(a specific address is warned about)", _specific_address, "::"),
    "healthzBindAddress": FieldRule(APPLIED, "--healthz-bind-address (/healthz, /livez, /readyz)",
                                    example="0.0.0.0:10266"),
    "metricsBindAddress": FieldRule(APPLIED, "--metrics-bind-address (/metrics; /rules and /skipped answer loopback "
                                    "clients only, unless --expose-rules)", example="0.0.0.0:10249"),
    "bindAddressHardFail": FieldRule(
        IGNORED, "kproxy always exits when it cannot bind its health or metrics address, as kube-proxy does with "
        "true: a port in use means another proxy runs on this node", _not_true, False),
    "enableProfiling": FieldRule(IGNORED, "kproxy serves no /debug/pprof", _set, True),
    "showHiddenMetricsForVersion": FieldRule(IGNORED, "kproxy has no hidden metrics", _set, "1.30"),
    "mode": FieldRule(CHECKED, "'' or nftables: kproxy is an nftables proxy (iptables and ipvs are refused)",
                      example="ipvs"),
    "iptables.masqueradeBit": FieldRule(CHECKED, f"null or 14: {_MARK}", example=15),
    "iptables.masqueradeAll": FieldRule(
        APPLIED, "true turns on masquerade-all, as nftables.masqueradeAll does (a file from iptables mode keeps "
        "its masquerading)", example=True),
    "iptables.localhostNodePorts": FieldRule(
        IGNORED, "kproxy never answers NodePorts on 127.0.0.1 or ::1, as kube-proxy's nftables mode; kube-proxy's "
        "iptables mode does unless this is false. Use a node IP", _localhost_nodeports, True),
    "iptables.snatNodeInternalIP": FieldRule(
        IGNORED, "kproxy masquerades to the address of the interface a packet leaves by", _set, True),
    "iptables.syncPeriod": FieldRule(IGNORED, "kproxy reads nftables.syncPeriod (or --sync-period)", _set, "10s"),
    "iptables.minSyncPeriod": FieldRule(IGNORED, "kproxy reads nftables.minSyncPeriod (or --min-sync-period)",
                                        _set, "5s"),
    "ipvs.syncPeriod": FieldRule(IGNORED, _IPVS, _set, "10s"),
    "ipvs.minSyncPeriod": FieldRule(IGNORED, _IPVS, _set, "5s"),
    "ipvs.scheduler": FieldRule(IGNORED, _IPVS, _set, "lc"),
    "ipvs.excludeCIDRs": FieldRule(IGNORED, _IPVS, _set, ["10.200.0.0/16"]),
    "ipvs.strictARP": FieldRule(IGNORED, _IPVS, _set, True),
    "ipvs.tcpTimeout": FieldRule(IGNORED, _IPVS, _set, "900s"),
    "ipvs.tcpFinTimeout": FieldRule(IGNORED, _IPVS, _set, "120s"),
    "ipvs.udpTimeout": FieldRule(IGNORED, _IPVS, _set, "300s"),
    "nftables.masqueradeBit": FieldRule(CHECKED, f"null or 14: {_MARK}", example=15),
    "nftables.masqueradeAll": FieldRule(APPLIED, "--masquerade-all", example=True),
    "nftables.syncPeriod": FieldRule(APPLIED, "--sync-period", example="1m"),
    "nftables.minSyncPeriod": FieldRule(APPLIED, "--min-sync-period (kproxy's default: 100ms; upstream's: 1s)",
                                        example="1s"),
    "winkernel.networkName": FieldRule(IGNORED, _WINDOWS, _set, "l2bridge"),
    "winkernel.sourceVip": FieldRule(IGNORED, _WINDOWS, _set, "10.244.0.2"),
    "winkernel.enableDSR": FieldRule(IGNORED, _WINDOWS, _set, True),
    "winkernel.rootHnsEndpointName": FieldRule(IGNORED, _WINDOWS, _set, "cbr0"),
    "winkernel.forwardHealthCheckVip": FieldRule(IGNORED, _WINDOWS, _set, True),
    "windowsRunAsService": FieldRule(IGNORED, _WINDOWS, _set, True),
    "detectLocalMode": FieldRule(
        CHECKED, "'' or ClusterCIDR: kproxy tells pod traffic by clusterCIDR only (the other modes are refused)",
        example="NodeCIDR"),
    "detectLocal.bridgeInterface": FieldRule(
        IGNORED, "only used with detectLocalMode BridgeInterface, which kproxy refuses", _set, "cbr0"),
    "detectLocal.interfaceNamePrefix": FieldRule(
        IGNORED, "only used with detectLocalMode InterfaceNamePrefix, which kproxy refuses", _set, "veth"),
    "clusterCIDR": FieldRule(APPLIED, "--cluster-cidr", example="10.0.0.0/8"),
    "nodePortAddresses": FieldRule(
        APPLIED, "--nodeport-addresses; unset means 'primary' (the node's primary IPs), as in kube-proxy's nftables "
        "mode, where its iptables and IPVS modes use every local IP: unset in a file for iptables mode (mode '') "
        "is warned about. Set [0.0.0.0/0, '::/0'] for every address", _nodeports_unset_in_iptables_mode,
        ["192.168.0.0/16"]),
    "oomScoreAdj": FieldRule(
        IGNORED, "kproxy does not change its oom_score_adj (that takes CAP_SYS_RESOURCE, which it does not have); "
        "as a system-node-critical pod the kubelet gives it -997", _set, -999),
    "conntrack.maxPerCore": FieldRule(
        IGNORED, f"kube-proxy sets nf_conntrack_max to max(maxPerCore x CPUs, min), by default 32768 per CPU and "
        f"at least 131072, unless maxPerCore is 0. {_CONNTRACK}", _conntrack_max, 65536),
    "conntrack.min": FieldRule(IGNORED, f"see conntrack.maxPerCore. {_CONNTRACK}", _conntrack_min, 262144),
    "conntrack.tcpEstablishedTimeout": FieldRule(
        IGNORED, f"kube-proxy sets nf_conntrack_tcp_timeout_established, by default to 24h, unless this is 0s. "
        f"{_CONNTRACK}", _not_zero_duration, "12h"),
    "conntrack.tcpCloseWaitTimeout": FieldRule(
        IGNORED, f"kube-proxy sets nf_conntrack_tcp_timeout_close_wait, by default to 1h, unless this is 0s. "
        f"{_CONNTRACK}", _not_zero_duration, "30m"),
    "conntrack.tcpBeLiberal": FieldRule(IGNORED, f"kube-proxy sets nf_conntrack_tcp_be_liberal. {_CONNTRACK}",
                                        _set, True),
    "conntrack.udpTimeout": FieldRule(IGNORED, f"kube-proxy sets nf_conntrack_udp_timeout. {_CONNTRACK}",
                                      _set, "30s"),
    "conntrack.udpStreamTimeout": FieldRule(
        IGNORED, f"kube-proxy sets nf_conntrack_udp_timeout_stream. {_CONNTRACK}", _set, "300s"),
    "configSyncPeriod": FieldRule(
        IGNORED, "kproxy's watches have no informer resync; it reads its tables back every --sync-period and "
        "resyncs them fully every hour", _set, "5m"),
    "portRange": FieldRule(IGNORED, "unused by kube-proxy too (it was the userspace proxy's)", _set, "30000-32767"),
}
"""Every field of upstream's v1alpha1 KubeProxyConfiguration (dotted paths; ``logging.vmodule`` is one field):
what kproxy does with it. Only fields the file has are considered; the warning of an IGNORED field is logged once
at startup when ``warn_if`` holds for the value the file gives (None for null)."""


def _warning(path: str, where: str, value: Any, rule: FieldRule) -> str:
    shown = "null (kube-proxy's default)" if value is None else _show_yaml(value)
    return f"{path}: {where} = {shown} is ignored: {rule.what}"


def _walk(data: Any, schema: Mapping[str, _Schema], prefix: str, path: str, out: dict[str, Any],
          doc: Mapping[str, Any], warnings: list[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {prefix}: expected a mapping of fields, got {_show(data)}")
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown field {where!r}{hint}")
        if isinstance(spec, _Leaf | _ListOf):
            if value is not None:
                if isinstance(spec, _Leaf):
                    with _field(f"{path}: {where}"):
                        normal = spec.check(value)
                    if spec.target is not None and normal is not _UNSET:
                        out[spec.target] = normal
                else:
                    if not isinstance(value, list):
                        raise ConfigError(f"{path}: {where}: expected a list, got {_show(value)}")
                    for index, item in enumerate(value):
                        _walk(item, spec.schema, f"{where}[{index}]", path, out, doc, warnings)
            rule = FIELDS.get(where)
            if rule is not None and rule.warn_if is not None and rule.warn_if(value, doc):
                warnings.append(_warning(path, where, value, rule) if rule.effect == IGNORED
                                else f"{path}: {where} = {_show_yaml(value)}: {rule.what}")
        elif value is not None:  # null leaves a struct at its zero value: not set
            _walk(value, spec, where, path, out, doc, warnings)


def load_kube_proxy_configuration(path: str, warnings: list[str] | None = None) -> dict[str, Any]:
    """Read and check a KubeProxyConfiguration file.

    Returns the values kproxy applies, keyed by DaemonConfig field name, for
    the fields the file sets (zero values are not set). Raises ConfigError.
    The warnings of ignored fields (one line each, naming the file and the
    field) go to ``warnings`` when given, else to the log.
    """
    try:
        data = load_yaml_file(path)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a {KIND}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a {KIND} (a mapping), got {_show(data)}")
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if key not in data:
            raise ConfigError(f"{path}: {key}: missing; expected {expected!r}")
        if data[key] != expected:
            raise ConfigError(f"{path}: {key}: {_show(data[key])} is not supported; expected {expected!r}")
    values: dict[str, Any] = {}
    found: list[str] = []
    _walk(data, SCHEMA, "", path, values, data, found)
    bind = data.get("bindAddress")
    if isinstance(bind, str) and ":" in bind:  # upstream's defaults for an IPv6 bindAddress
        values.setdefault("healthz_bind_address", f"[::]:{DEFAULT_HEALTHZ_PORT}")
        values.setdefault("metrics_bind_address", f"[::1]:{DEFAULT_METRICS_PORT}")
    if warnings is None:
        for line in found:
            log.warning("%s", line)
    else:
        warnings.extend(found)
    log.debug("%s: applied %s", path, values)
    return values


# --- flags and merging -------------------------------------------------------------------------


def add_daemon_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add kube-proxy's flags to a parser or argument group (which must not have them yet).

    Every default is None, so ``daemon_config`` can tell a flag given on the
    command line (which overrides the --config file) from one that is not.
    Values are kept as strings; ``daemon_config`` checks them.
    """
    add = parser.add_argument
    add("--config", metavar="FILE", help="a KubeProxyConfiguration file; flags given here override it")
    add("--kubeconfig", metavar="FILE", help="kubeconfig of the API server (default: in-cluster configuration)")
    add(
        "--hostname-override",
        "--node-name",
        dest="hostname_override",
        metavar="NAME",
        help="this node's name (default: $NODE_NAME, else the hostname)",
    )
    add("--cluster-cidr", metavar="CIDR[,CIDR]", help="pod CIDRs; ClusterIP traffic from elsewhere is masqueraded")
    add(
        "--nodeport-addresses",
        metavar="CIDR[,CIDR]|primary",
        help="node addresses that accept NodePorts: CIDRs, 'all', or 'primary' (the default: the node's primary IPs)",
    )
    add(
        "--masquerade-all",
        nargs="?",
        const="true",
        metavar="true|false",
        help="masquerade all traffic to ClusterIPs (alone: true; default: false)",
    )
    add("--min-sync-period", metavar="DURATION",
        help="least time between syncs, e.g. 1s (default: 100ms; upstream's, and daemonset.yaml's, is 1s)")
    add("--sync-period", metavar="DURATION",
        help="a sync at least this often, and a check that kproxy's tables exist (default: 30s); a sync sends only "
        "what changed: the full resync, which reads the tables back and repairs them, runs at startup, hourly (as "
        "upstream's), after a failure, on SIGHUP and when another program changes the tables. /healthz, /livez and "
        "/readyz fail once a change has waited 2 x this")
    add(
        "--metrics-bind-address",
        metavar="HOST:PORT",
        help=f"where to serve /metrics, /rules and /skipped (default: {DEFAULT_METRICS_BIND_ADDRESS}; "
        "port 0 = any free port)",
    )
    add(
        "--healthz-bind-address",
        metavar="HOST:PORT",
        help=f"where to serve /healthz, /livez and /readyz (default: {DEFAULT_HEALTHZ_BIND_ADDRESS}; "
        "port 0 = any free port)",
    )
    add("--log-format", metavar="text|json", help="log format (default: text)")
    add(
        "--expose-rules",
        action="store_true",
        default=None,
        help="serve /rules (the whole ruleset) and /skipped on the metrics address to any client; without it they "
        "answer loopback clients only (kubectl exec, kproxy explain) and 403 others, while /metrics answers all; "
        "kproxy's own, not in --config",
    )
    add(
        "--service-metrics",
        metavar="|".join(SERVICE_METRICS),
        help="which Services export kproxy_service_new_connections_total: those annotated "
        f'kproxy.io/metrics: "true" (the default: {DEFAULT_SERVICE_METRICS}), all, or none '
        "(Services with a limit always export kproxy_limit_drops_total, and kproxy_rate_limit_drops_total for "
        "kproxy.io/rate-limit); kproxy's own, not in --config",
    )


_FLAGS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    # DaemonConfig field: (Namespace attribute, flag, parser)
    "node_name": ("hostname_override", "--hostname-override", parse_node_name),
    "cluster_cidrs": ("cluster_cidr", "--cluster-cidr", parse_cidrs),
    "nodeport_addresses": ("nodeport_addresses", "--nodeport-addresses", parse_nodeport_addresses),
    "masquerade_all": ("masquerade_all", "--masquerade-all", parse_bool),
    "min_sync_period": ("min_sync_period", "--min-sync-period", parse_duration),
    "sync_period": ("sync_period", "--sync-period", parse_duration),
    "metrics_bind_address": ("metrics_bind_address", "--metrics-bind-address", _normal_bind_address),
    "healthz_bind_address": ("healthz_bind_address", "--healthz-bind-address", _normal_bind_address),
    "kubeconfig": ("kubeconfig", "--kubeconfig", str),
    "log_format": ("log_format", "--log-format", parse_log_format),
    "service_metrics": ("service_metrics", "--service-metrics", parse_service_metrics),
}

_FILE_FIELDS = {
    "node_name": "hostnameOverride",
    "cluster_cidrs": "clusterCIDR",
    "nodeport_addresses": "nodePortAddresses",
    "masquerade_all": "nftables.masqueradeAll",
    "min_sync_period": "nftables.minSyncPeriod",
    "sync_period": "nftables.syncPeriod",
    "metrics_bind_address": "metricsBindAddress",
    "healthz_bind_address": "healthzBindAddress",
    "kubeconfig": "clientConnection.kubeconfig",
    "log_format": "logging.format",
    "log_level": "logging.verbosity",
}


def _default_node_name() -> tuple[str, str]:
    """(name, where it came from): $NODE_NAME, else the hostname."""
    if os.environ.get("NODE_NAME", "").strip():
        with _field("$NODE_NAME"):
            return parse_node_name(os.environ["NODE_NAME"]), "$NODE_NAME"
    with _field(f"the hostname {socket.gethostname()!r} (set --hostname-override)"):
        return parse_node_name(socket.gethostname()), "the hostname"


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """Merge defaults, the --config file (if any) and the flags given on the command line; raises ConfigError."""
    config_file = getattr(args, "config", None)
    warnings: list[str] = []
    from_file = load_kube_proxy_configuration(config_file, warnings) if config_file else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (attr, flag, parse) in _FLAGS.items():
        given = getattr(args, attr, None)
        if given is not None:
            with _field(flag):
                if given == "" and name not in ("cluster_cidrs", "nodeport_addresses"):
                    raise ConfigError("empty value")
                values[name] = parse(given)
            sources[name] = flag
        elif name in from_file:
            values[name] = from_file[name]
            sources[name] = f"{config_file}: {_FILE_FIELDS[name]}"
    if getattr(args, "verbose", 0):
        values["log_level"] = "debug"
    elif "log_level" in from_file:
        values["log_level"] = from_file["log_level"]
    if "node_name" not in values:
        values["node_name"], sources["node_name"] = _default_node_name()
    if getattr(args, "expose_rules", False):
        values["expose_rules"] = True
    if "kubeconfig" in values:
        values["kubeconfig_source"] = sources["kubeconfig"]
        if sources["kubeconfig"] != "--kubeconfig" and not os.path.exists(values["kubeconfig"]):
            warnings.append(
                f"{sources['kubeconfig']} = {values['kubeconfig']!r}: no such file here, and without it the daemon "
                "cannot start. kproxy's pod uses its ServiceAccount: remove the field (kube-proxy's configuration "
                "names kube-proxy's own kubeconfig, which kproxy's pod does not have)")

    config = DaemonConfig(**values, warnings=tuple(warnings))
    min_label = sources.get("min_sync_period", "the default min sync period")
    sync_label = sources.get("sync_period", "the default sync period")
    if config.min_sync_period < 0:
        raise ConfigError(f"{min_label}: must not be negative, got {config.min_sync_period:g}s")
    if config.sync_period <= 0:
        raise ConfigError(f"{sync_label}: must be greater than 0, got {config.sync_period:g}s")
    if config.min_sync_period > config.sync_period:
        raise ConfigError(
            f"{min_label} ({config.min_sync_period:g}s) must not exceed {sync_label} ({config.sync_period:g}s)"
        )
    log.debug("configuration: %s (from %s)", config, sources or "defaults")
    return config
