"""The daemon's configuration: kube-proxy compatible flags and a KubeProxyConfiguration file.

``add_daemon_flags`` adds kube-proxy's flags (same names, same meanings) to a
parser; ``daemon_config`` turns the parsed flags, and the ``--config`` file if
one is given, into a ``DaemonConfig``. A flag given on the command line wins
over the file; the file wins over the defaults.

The file is a ``kubeproxy.config.k8s.io/v1alpha1`` ``KubeProxyConfiguration``,
the same file kube-proxy reads (kubeadm keeps it in the ``kube-proxy``
ConfigMap). Every field upstream defines is accepted; kproxy applies the ones
it has a use for and logs the rest at debug level. As upstream's defaulting
does, a zero value in the file (``""``, ``0s``, ``null``, an empty list)
means "not set": kubeadm writes every field, most of them zero. An unknown
field, a value of the wrong type or an invalid value is a ``ConfigError``
whose one-line message names the file and the field path.

Flags are stored as given (strings) and checked here, not by argparse, so a
bad flag also gives a ``ConfigError`` that names the flag.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kproxy.cluster.manifests import ManifestError, load_yaml_file
from kproxy.observe.metrics import DEFAULT_SERVICE_METRICS, SERVICE_METRICS
from kproxy.rules.compiler import ProxyConfig

log = logging.getLogger(__name__)

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"

DEFAULT_MIN_SYNC_PERIOD = 0.1
DEFAULT_SYNC_PERIOD = 30.0
DEFAULT_METRICS_BIND_ADDRESS = "127.0.0.1:10249"
DEFAULT_HEALTHZ_BIND_ADDRESS = "0.0.0.0:10256"
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
    """--sync-period / nftables.syncPeriod, seconds: a full resync at least this often."""
    metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS
    """--metrics-bind-address / metricsBindAddress: ``HOST:PORT``, normalised; port 0 = any free port."""
    healthz_bind_address: str = DEFAULT_HEALTHZ_BIND_ADDRESS
    """--healthz-bind-address / healthzBindAddress: ``HOST:PORT``, normalised; port 0 = any free port."""
    kubeconfig: str | None = None
    """--kubeconfig / clientConnection.kubeconfig; None means the in-cluster configuration."""
    log_format: str = "text"
    """--log-format / logging.format: "text" or "json"."""
    log_level: str = "info"
    """"info", or "debug" with -v (or logging.verbosity >= 4 in the file)."""
    service_metrics: str = DEFAULT_SERVICE_METRICS
    """--service-metrics (kproxy's own, no file field): which Services export per-Service series:
    "annotated" (``kproxy.io/metrics: "true"``), "all" or "none"."""

    def proxy_config(self) -> ProxyConfig:
        """The subset the compiler needs."""
        return ProxyConfig(
            cluster_cidrs=self.cluster_cidrs,
            nodeport_addresses=self.nodeport_addresses,
            masquerade_all=self.masquerade_all,
        )


# --- small reusable validators ------------------------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
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
    used: bool = False
    """Checked and acted on here (like mode), though not a DaemonConfig field: not logged as ignored."""


@dataclass(frozen=True, slots=True)
class _ListOf:
    """A list of structs."""

    schema: Mapping[str, _Schema]


_Schema = _Leaf | _ListOf | Mapping[str, Any]

_OUTPUT_ROUTING = {"splitStream": _Leaf(_boolean), "infoBufferSize": _Leaf(_quantity)}

SCHEMA: Mapping[str, _Schema] = {
    "apiVersion": _Leaf(_string, used=True),
    "kind": _Leaf(_string, used=True),
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
    "mode": _Leaf(_mode, used=True),
    "iptables": {
        "masqueradeBit": _Leaf(_integer(0, 31)),
        "masqueradeAll": _Leaf(_boolean),
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
        "masqueradeBit": _Leaf(_integer(0, 31)),
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
    "detectLocalMode": _Leaf(_detect_local_mode, used=True),
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
    return value in ("", False, 0, "0s") or value == [] or value == {}


def _walk(data: Any, schema: Mapping[str, _Schema], prefix: str, path: str, out: dict[str, Any]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {prefix}: expected a mapping of fields, got {_show(data)}")
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown field {where!r}{hint}")
        if value is None:
            continue  # null leaves a Go field at its zero value: not set
        if isinstance(spec, _Leaf):
            with _field(f"{path}: {where}"):
                normal = spec.check(value)
            if spec.target is not None:
                if normal is not _UNSET:
                    out[spec.target] = normal
            elif not spec.used and not _is_zero(value):
                log.debug("%s: %s = %s is accepted but not used by kproxy", path, where, _show(value))
        elif isinstance(spec, _ListOf):
            if not isinstance(value, list):
                raise ConfigError(f"{path}: {where}: expected a list, got {_show(value)}")
            for index, item in enumerate(value):
                _walk(item, spec.schema, f"{where}[{index}]", path, out)
        else:
            _walk(value, spec, where, path, out)


def load_kube_proxy_configuration(path: str) -> dict[str, Any]:
    """Read and check a KubeProxyConfiguration file.

    Returns the values kproxy applies, keyed by DaemonConfig field name, for
    the fields the file sets (zero values are not set). Raises ConfigError.
    """
    try:
        data = load_yaml_file(path)
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a {KIND}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a {KIND} (a mapping), got {_show(data)}")
    for field, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if field not in data:
            raise ConfigError(f"{path}: {field}: missing; expected {expected!r}")
        if data[field] != expected:
            raise ConfigError(f"{path}: {field}: {_show(data[field])} is not supported; expected {expected!r}")
    values: dict[str, Any] = {}
    _walk(data, SCHEMA, "", path, values)
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
        help="masquerade all traffic to ClusterIPs",
    )
    add("--min-sync-period", metavar="DURATION", help="least time between syncs, e.g. 100ms (default: 100ms)")
    add("--sync-period", metavar="DURATION", help="full resync at least this often, e.g. 30s (default: 30s)")
    add(
        "--metrics-bind-address",
        metavar="HOST:PORT",
        help=f"where to serve /metrics (default: {DEFAULT_METRICS_BIND_ADDRESS}; port 0 = any free port)",
    )
    add(
        "--healthz-bind-address",
        metavar="HOST:PORT",
        help=f"where to serve /healthz (default: {DEFAULT_HEALTHZ_BIND_ADDRESS}; port 0 = any free port)",
    )
    add("--log-format", metavar="text|json", help="log format (default: text)")
    add(
        "--service-metrics",
        metavar="|".join(SERVICE_METRICS),
        help="which Services export kproxy_service_new_connections_total: those annotated "
        f'kproxy.io/metrics: "true" (the default: {DEFAULT_SERVICE_METRICS}), all, or none '
        "(rate-limited Services always export kproxy_rate_limit_drops_total); kproxy's own, not in --config",
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
    from_file = load_kube_proxy_configuration(config_file) if config_file else {}
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

    config = DaemonConfig(**values)
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
