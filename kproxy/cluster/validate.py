"""Field rules as the Kubernetes API server applies them, for every value that can reach nft text.

Each function takes a raw value (any type: manifests are untrusted) and
returns it canonical, or raises ``FieldError`` with a message that names the
problem. Callers add the field path and the object (``kproxy.cluster.convert``), or
the flag (``kproxy.daemon.config``).

* Patterns are matched with ``fullmatch``: a trailing newline is not a match.
* Addresses are parsed as the API server parses them (``netutils.ParseIPSloppy``):
  IPv4 with leading zeros is read as decimal, as Go does; IPv6 zone ids
  (``fe80::1%eth0``), surrounding whitespace and IPv4-mapped IPv6 addresses
  are refused. The result is the one spelling nft prints (``inet_ntop``'s).
* ``special_ok=False`` refuses what upstream's ``ValidateNonSpecialIP`` and
  ``ValidateEndpointIP`` refuse (unspecified, loopback, link-local) and
  multicast, for external IPs, load-balancer IPs and endpoints.

Pure: no I/O, no logging.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SLOPPY_V4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_CANONICAL_V4 = re.compile(
    r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)
_V6_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


class FieldError(ValueError):
    """A value the API server would refuse (or that kproxy cannot use); the message says why."""


def show(value: Any, limit: int = 80) -> str:
    """A value for a message: repr, cut short, so hostile input stays one readable line."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def name(value: Any, pattern: re.Pattern[str] = DNS_LABEL, limit: int = 63) -> str:
    """A name matching ``pattern`` (a DNS label by default) of at most ``limit`` characters."""
    if not isinstance(value, str) or not value:
        raise FieldError(f"{show(value)} is not a name")
    if len(value) > limit:
        raise FieldError(f"{show(value)} is longer than {limit} characters")
    if not pattern.fullmatch(value):
        kind = {DNS_LABEL: "a DNS label", DNS_1035_LABEL: "a DNS-1035 label", DNS_SUBDOMAIN: "a DNS subdomain",
                LABEL_VALUE: "a label value"}
        raise FieldError(f"{show(value)} is not {kind.get(pattern, 'a valid name')}")
    return value


def ip(value: Any, special_ok: bool = True) -> str:
    """An IP address, canonical (``FD00:0::1`` -> ``fd00::1``, ``010.0.0.1`` -> ``10.0.0.1``)."""
    if not isinstance(value, str):
        raise FieldError(f"{show(value)} is not an IP address")
    if _CANONICAL_V4.fullmatch(value):
        if special_ok:
            return value  # the common case: nothing to build
        first, second, _ = value.split(".", 2)
        a = int(first)
        if a != 0 and a != 127 and not 224 <= a <= 239 and not (a == 169 and second == "254"):
            return value  # an endpoint's address (100k at 10k Services): no IPv4Address built
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(value)
        text = value
    else:
        address = _parse_ip(value)
        text = spell(address)
    if not special_ok:
        _not_special(address, value)
    return text


def spell(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The one spelling nft prints (inet_ntop's): Python writes ``::1.2.3.4`` as ``::102:304``, nft does not."""
    if address.version == 4:
        return str(address)
    return socket.inet_ntop(socket.AF_INET6, address.packed)


def spell_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"{spell(network.network_address)}/{network.prefixlen}"


def collapse(cidrs: Iterable[str]) -> list[str]:
    """Canonical CIDRs with overlaps merged (an interval set refuses overlapping elements), per family, sorted."""
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    if not networks:
        return []
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return [spell_network(n) for n in ipaddress.collapse_addresses(v4)] + [
        spell_network(n) for n in ipaddress.collapse_addresses(v6)]


def outside(cidrs: Iterable[str], within: Iterable[str]) -> list[str]:
    """The canonical CIDRs of ``cidrs`` not inside any CIDR of ``within``, of a family ``within`` has.

    A family ``within`` has no CIDR of is not checked (nothing to be inside of).
    """
    outer = [ipaddress.ip_network(c, strict=False) for c in within]
    result = []
    for c in cidrs:
        network = ipaddress.ip_network(c, strict=False)
        same = [o for o in outer if o.version == network.version]
        if same and not any(network.subnet_of(o) for o in same):  # type: ignore[arg-type]
            result.append(spell_network(network))
    return result


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    sloppy = _SLOPPY_V4.fullmatch(value)
    if sloppy:
        octets = [int(part) for part in sloppy.groups()]
        if all(octet <= 255 for octet in octets):
            return ipaddress.IPv4Address(".".join(map(str, octets)))
        raise FieldError(f"{show(value)} is not an IP address")
    if not _V6_CHARS.fullmatch(value):  # zone ids, whitespace, brackets, anything else
        raise FieldError(f"{show(value)} is not an IP address" + (" (zone ids are not allowed)" if "%" in value else ""))
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise FieldError(f"{show(value)} is not an IP address") from None
    if address.ipv4_mapped is not None:
        raise FieldError(f"{show(value)} is an IPv4-mapped IPv6 address; write the IPv4 address")
    return address


def _not_special(address: ipaddress.IPv4Address | ipaddress.IPv6Address, value: str) -> None:
    for test, what in (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
    ):
        if test:
            raise FieldError(f"{show(value)} is {what}, which a Service or endpoint may not use")


def cidr(value: Any) -> str:
    """A CIDR, canonical with host bits cleared (``10.0.0.1/8`` -> ``10.0.0.0/8``), as ParseCIDRSloppy reads it."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise FieldError(f"{show(value)} is not a CIDR (expected e.g. '10.0.0.0/8')")
    address_text, _, length = value.partition("/")
    if not length.isascii() or not length.isdigit() or len(length) > 3:
        raise FieldError(f"{show(value)} is not a CIDR (expected e.g. '10.0.0.0/8')")
    address = _parse_ip(address_text)
    try:
        return spell_network(ipaddress.ip_network(f"{address}/{int(length)}", strict=False))
    except ValueError:
        raise FieldError(f"{show(value)} is not a CIDR (prefix length out of range)") from None


def port(value: Any) -> int:
    """A port number, 1-65535 (an integer, never a string or a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise FieldError(f"{show(value)} is not a port in 1-65535")
    return value


def family_of(address: str) -> int:
    """4 or 6, for a canonical address or CIDR."""
    return 6 if ":" in address else 4
