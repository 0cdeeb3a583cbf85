"""The node's own addresses, read from the current network namespace with pyroute2.

Used when the proxy's Node object is not available: NodePorts then answer on
the addresses of the namespace's interfaces. The primary address of a family
is the first global address on the interface that holds that family's default
route (or the first global address at all, if there is no default route).
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)

_SCOPE_UNIVERSE = 0


def interface_addresses() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(primary addresses, all global addresses) of this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addresses: list[tuple[int, int, str]] = []
        for msg in ipr.get_addr():
            if msg["scope"] != _SCOPE_UNIVERSE:
                continue
            address = msg.get_attr("IFA_ADDRESS")
            if address:
                addresses.append((msg["family"], msg["index"], address))
        default_oif: dict[int, int] = {}
        for route in ipr.get_default_routes():
            default_oif.setdefault(route["family"], route.get_attr("RTA_OIF"))
    primary: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        same_family = [(index, a) for fam, index, a in addresses if fam == family]
        on_default = [a for index, a in same_family if index == default_oif.get(family)]
        chosen = on_default or [a for _, a in same_family]
        if chosen:
            primary.append(chosen[0])
    every = tuple(a for _, _, a in addresses)
    log.debug("interface addresses: primary %s, all %s", primary, every)
    return tuple(primary), every
