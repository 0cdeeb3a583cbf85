"""UDP conntrack cleanup after a sync, as upstream kube-proxy does it.

UDP has no connection to tear down, so when a Service's endpoint goes away a
client that keeps sending from one socket (DNS, statsd) keeps hitting the
conntrack entry that DNATs it to the old endpoint, forever. After a successful
sync upstream (``pkg/proxy/conntrack/cleanup.go``) deletes, for every UDP
Service port with at least one serving endpoint, the entries

* whose original destination is one of the Service's IPs (ClusterIP,
  externalIPs, load-balancer IPs) and its port, or whose original destination
  is a NodePort address of this node and the Service's NodePort,
* and whose reply source is not one of the port's serving endpoints.

The next datagram then creates a fresh entry and is DNATed by the current
rules. A port without serving endpoints is left alone (its traffic is rejected
anyway, and deleting would gain nothing). Traffic policies, topology and the
terminating state are deliberately ignored: any serving endpoint keeps its
flows, as a TCP connection would keep going.

Two differences from upstream, both narrower:

* an endpoint is ``(ip, port)``, not just an IP, so a flow still DNATed to a
  port the endpoint no longer serves on is stale too;
* a NodePort entry must be addressed to one of the addresses that accept
  NodePorts here (``nodeport_addresses``), not to any address: only those are
  DNATed, and unrelated traffic that happens to use the same port is kept.

The second cleanup is kproxy's own: TCP connection attempts that went out
untranslated while kproxy's table was missing or flushed (a node's boot before
the first sync, ``nft flush ruleset`` or a firewalld reload before the drift
repair).
Each left a conntrack entry that has seen no reply and no DNAT. The client's
retransmissions of that SYN belong to the entry, and NAT is decided once per
entry, so they are never DNATed, even once the rules are back: the connect
hangs until it times out (about two minutes), where it would land on the
retransmission a second later. After a full sync that built or repaired a
family's table, ``cleanup_unanswered_tcp`` deletes the entries of that family that are
unanswered, untranslated and addressed to a Service frontend (an address and
port of a ClusterIP, external IP or load-balancer IP): the kernel lists only
those without a reply or a DNAT (a status filter, Linux 5.15+), so the
listing is small on most nodes; it is bounded (``_UNANSWERED_BUDGET``) on a
node where many connection attempts go unanswered.

Layers: ``udp_cleanup_targets``, ``stale_entries``, ``tcp_frontends`` and
``unanswered_to_frontends`` are pure; ``cleanup_stale_udp`` and
``cleanup_unanswered_tcp`` drive a ``Conntrack``, which is either the kernel
(``PyrouteConntrack``, through pyroute2's ctnetlink socket; the daemon's
``DeferredConntrack`` opens one on first use) or in memory (``FakeConntrack``).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from kproxy.cluster.model import Cluster, IPFamily, Service
from kproxy.memory import gc_running
from kproxy.rules.compiler import FAMILIES, NodeInfo, ProxyConfig, nodeport_addresses
from kproxy.rules.endpoints import port_endpoints

if TYPE_CHECKING:  # pragma: no cover
    from pyroute2.conntrack import Conntrack as _PyrouteCt

log = logging.getLogger(__name__)

IPPROTO_UDP = socket.IPPROTO_UDP
IPPROTO_TCP = socket.IPPROTO_TCP
_AF: dict[IPFamily, int] = {4: socket.AF_INET, 6: socket.AF_INET6}

EndpointAddr = tuple[str, int]
"""An endpoint as the reply direction of a conntrack entry shows it: (ip, port)."""


# --------------------------------------------------------------------------- targets


def _empty() -> Mapping[Any, frozenset[EndpointAddr]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FamilyTargets:
    """What is cleaned in one IP family."""

    frontends: Mapping[tuple[str, int], frozenset[EndpointAddr]] = field(default_factory=_empty)
    """(Service IP, port) -> the serving endpoints of that UDP Service port."""
    node_ports: Mapping[int, frozenset[EndpointAddr]] = field(default_factory=_empty)
    """NodePort -> the serving endpoints of that UDP Service port."""
    node_ips: frozenset[str] = frozenset()
    """The addresses that accept NodePorts here (a NodePort entry must be addressed to one)."""

    def __bool__(self) -> bool:
        return bool(self.frontends or self.node_ports)


@dataclass(frozen=True, slots=True)
class CleanupTargets:
    """Per IP family, which conntrack entries may stay: see the module docstring."""

    ipv4: FamilyTargets = FamilyTargets()
    ipv6: FamilyTargets = FamilyTargets()

    def family(self, family: IPFamily) -> FamilyTargets:
        return self.ipv6 if family == 6 else self.ipv4

    def __bool__(self) -> bool:
        return bool(self.ipv4 or self.ipv6)


def _family_of(address: str) -> IPFamily:
    return 6 if ":" in address else 4


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _frontend_addresses(service: Service, family: IPFamily) -> list[str]:
    """The Service's addresses in ``family``: its ClusterIP first, then external and load-balancer IPs; none
    without a ClusterIP in the family (the compiler programs nothing of it there)."""
    cluster_ip = next((ip for ip in service.cluster_ips if _family_of(ip) == family), None)
    if cluster_ip is None:
        return []
    others = service.external_ips + service.load_balancer_ips
    return [cluster_ip] + [ip for ip in others if _family_of(ip) == family]


def udp_cleanup_targets(cluster: Cluster, node: NodeInfo, config: ProxyConfig) -> CleanupTargets:
    """The frontends and NodePorts of UDP Service ports with serving endpoints, per family.

    A Service takes part in a family only if it has a ClusterIP there (as the
    compiler does). If two Services claim one frontend or NodePort, the one
    earlier in key order wins, as it does in the compiler.
    """
    by_service = cluster.slices_by_service()
    result: dict[IPFamily, FamilyTargets] = {}
    for family_name, fam in FAMILIES.items():
        frontends: dict[tuple[str, int], frozenset[EndpointAddr]] = {}
        node_ports: dict[int, frozenset[EndpointAddr]] = {}
        for key in sorted(cluster.services):
            service = cluster.services[key]
            addresses = _frontend_addresses(service, fam)
            if not addresses:
                continue
            slices = by_service.get(key, ())
            for port in service.ports:
                if port.protocol != "udp":
                    continue
                serving = frozenset(
                    (pe.address, pe.port) for pe in port_endpoints(port, slices, fam) if pe.endpoint.serving
                )
                if not serving:
                    continue  # upstream: a port without serving endpoints needs no cleanup
                for address in addresses:
                    frontends.setdefault((address, port.port), serving)
                if port.node_port:
                    node_ports.setdefault(port.node_port, serving)
        node_ips = frozenset(_canonical(a) for a in nodeport_addresses(node, config, family_name))
        result[fam] = FamilyTargets(MappingProxyType(frontends), MappingProxyType(node_ports), node_ips)
    return CleanupTargets(ipv4=result[4], ipv6=result[6])


def tcp_frontends(services: Iterable[Service], family: IPFamily) -> frozenset[tuple[str, int]]:
    """Every (address, port) of ``family`` at which kproxy's rules DNAT TCP: the Services' TCP ports at their
    ClusterIP, external IPs and load-balancer IPs."""
    return frozenset((address, port.port) for service in services for address in _frontend_addresses(service, family)
                     for port in service.ports if port.protocol == "tcp")


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class FlowEntry:
    """The parts of a conntrack entry the cleanup looks at.

    Addresses are canonical strings (``str(ipaddress.ip_address(...))``), as in
    the model. ``handle`` is whatever the ``Conntrack`` that listed the entry
    needs to delete exactly this entry; it takes no part in comparisons.
    """

    family: IPFamily
    proto: int
    """IP protocol number (``socket.IPPROTO_UDP``)."""
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    """Where the reply comes from: the endpoint, for a DNATed flow."""
    reply_sport: int
    handle: object = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        def at(address: str, port: int) -> str:
            return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

        return (
            f"{at(self.orig_src, self.orig_sport)} -> {at(self.orig_dst, self.orig_dport)} "
            f"(reply from {at(self.reply_src, self.reply_sport)})"
        )


def _is_stale(entry: FlowEntry, targets: FamilyTargets) -> bool:
    reply = (entry.reply_src, entry.reply_sport)
    serving = targets.frontends.get((entry.orig_dst, entry.orig_dport))
    if serving is not None and reply not in serving:
        return True
    if entry.orig_dst in targets.node_ips:
        serving = targets.node_ports.get(entry.orig_dport)
        if serving is not None and reply not in serving:
            return True
    return False


def unanswered_to_frontends(entries: Iterable[FlowEntry], frontends: Collection[tuple[str, int]]) -> list[FlowEntry]:
    """The TCP attempts among ``entries`` (unanswered ones) that went to a frontend untranslated: their reply
    would come from the frontend itself, which DNAT would have changed to an endpoint."""
    return [e for e in entries if e.proto == IPPROTO_TCP and (e.orig_dst, e.orig_dport) in frontends
            and (e.reply_src, e.reply_sport) == (e.orig_dst, e.orig_dport)]


def stale_entries(entries: Iterable[FlowEntry], targets: CleanupTargets) -> list[FlowEntry]:
    """The UDP entries addressed to a target whose reply source is not a serving endpoint."""
    return [e for e in entries if e.proto == IPPROTO_UDP and _is_stale(e, targets.family(e.family))]


# --------------------------------------------------------------------------- conntrack


class Conntrack(Protocol):
    """The conntrack table of one network namespace, as far as the cleanup needs it."""

    def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
        """The UDP entries of one family; with ``destinations``, those whose original destination is one of them
        (canonical addresses; a listing may hold more, never less)."""
        ...

    def list_unanswered_tcp(self, family: IPFamily) -> list[FlowEntry]:
        """The TCP entries of one family that have seen no reply and were not DNATed (a listing may hold more, never
        less); empty where the kernel cannot filter them out of the rest."""
        ...

    def delete(self, entry: FlowEntry) -> bool:
        """Delete one entry: True if deleted, False if it was already gone; OSError otherwise."""
        ...


def _current_netns() -> tuple[int, int]:
    """The identity (device, inode) of the calling thread's network namespace."""
    st = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino)


_FILTERED_DUMPS = 32
"""At most this many dumps filtered to one destination each, instead of one dump of every UDP entry."""
_FILTERED_WALK_BUDGET = 1_000_000
"""... and only while (destinations x entries in the table) stays under this.

The trade: pyroute2 parses a dumped entry in about 0.3 ms, so listing every
UDP entry of a node with 5,000 (DNS clients, say) took 1.6-2.3 s of the sync
thread after each sync that changed a UDP Service, where a dump filtered to
one address took 0.02 s. But a filtered dump still walks the whole table in
the kernel, every protocol's entries, about 0.4 us each: 32 of them over
50,000 TCP entries took 0.65 s, against 0.02 s for one dump of the few UDP
entries there. Under the budget, the filtered dumps cost at most about 0.4 s
of walking; over it, one dump of everything is taken."""


@functools.cache
def _kernel_at_least(major: int, minor: int) -> bool:
    """Whether this kernel's release is ``major.minor`` or later (False if it cannot be read)."""
    try:
        found = tuple(int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _kernel_filters_dumps() -> bool:
    """Whether the kernel filters a conntrack dump by tuple (CTA_FILTER, Linux 5.8): before that, pyroute2 alone does,
    after reading every entry, and a dump per destination would read the whole table each time."""
    return _kernel_at_least(5, 8)


def _kernel_filters_status() -> bool:
    """Whether the kernel filters a conntrack dump by status bits (CTA_STATUS with CTA_STATUS_MASK, Linux 5.15:
    "netfilter: ctnetlink: allow to filter dump by status bits"): before that, the status is ignored and the
    dump would hold every TCP entry of the table."""
    return _kernel_at_least(5, 15)


_UNANSWERED_BUDGET = 2_000
"""At most this many unanswered TCP entries are read per family and cleanup: pyroute2 parses one in about
0.4 ms, and the cleanup runs in the sync. A node where more attempts go unanswered (SYNs to dead hosts, scans)
keeps the rest until they time out, and the log says so."""


_IPS_SEEN_REPLY = 1 << 1
_IPS_DST_NAT = 1 << 5


@dataclass(frozen=True, slots=True)
class _KernelHandle:
    ct_id: int | None
    zone: int | None


class PyrouteConntrack:
    """The kernel's conntrack table, through pyroute2's ctnetlink socket.

    The table is the one of the network namespace the *constructing* thread is
    in. pyroute2 opens its netlink socket lazily, on the first request, and one
    per thread: constructed in a namespace but first used after leaving it, it
    would silently read the table of the namespace it is used in. So
    ``__init__`` forces this thread's sockets open (one per family: pyroute2
    fixes the address family per socket), and another thread may use the
    object only while it is in the same namespace (it gets its own sockets
    there); from any other namespace a call raises RuntimeError.
    """

    def __init__(self) -> None:
        from pyroute2.conntrack import Conntrack as PyrouteCt
        from pyroute2.netlink.exceptions import NetlinkError

        self._thread = threading.get_ident()
        self._netns = _current_netns()
        self.unanswered_messages = 0
        """How many entries the kernel sent for the last ``list_unanswered_tcp`` (its filters at work)."""
        self._sockets: dict[IPFamily, _PyrouteCt] = {}
        try:
            for family, af in _AF.items():
                sock = PyrouteCt(nfgen_family=af)
                self._sockets[family] = sock
                sock.count()  # opens the netlink socket now, in this namespace
        except NetlinkError as exc:
            self.close()
            raise OSError(exc.code, f"opening the conntrack netlink socket: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PyrouteConntrack:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        sockets, self._sockets = self._sockets, {}
        for sock in sockets.values():
            sock.close()

    def _socket(self, family: IPFamily) -> _PyrouteCt:
        if threading.get_ident() != self._thread and _current_netns() != self._netns:
            raise RuntimeError(
                "PyrouteConntrack used from a thread in another network namespace than the one it was created in"
            )
        try:
            return self._sockets[family]
        except KeyError:
            raise ValueError(f"no conntrack socket for family {family!r} (closed?)") from None

    def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
        """With a few IPv4 ``destinations``, one dump per destination, which the kernel filters (``_FILTERED_DUMPS``,
        ``_FILTERED_WALK_BUDGET``)."""
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        af = _AF[family]
        # IPv4 only: the kernel's filter inverts the IPv6 address comparison (ctnetlink_filter_match_tuple, since
        # 5.8: it returns the entries to every other address, which pyroute2's own check then drops).
        if (family == 4 and destinations is not None and len(destinations) <= _FILTERED_DUMPS
                and _kernel_filters_dumps() and len(destinations) * self._entries(family) <= _FILTERED_WALK_BUDGET):
            return [entry for address in sorted(destinations)
                    for entry in self._dump(family, NFCTAttrTuple(family=af, proto=IPPROTO_UDP, daddr=address))]
        return self._dump(family, NFCTAttrTuple(family=af, proto=IPPROTO_UDP))

    def _entries(self, family: IPFamily) -> int:
        """How many entries the conntrack table holds (every family and protocol: what a dump walks)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return int(self._socket(family).count() or 0)
        except NetlinkError as exc:
            raise OSError(exc.code, f"counting conntrack entries: {exc}") from exc

    def list_unanswered_tcp(self, family: IPFamily) -> list[FlowEntry]:
        """One dump, filtered in the kernel by protocol and by status: no reply seen, no DNAT."""
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_GET, NFCTAttrTuple, nfct_msg

        if not _kernel_filters_status():
            log.info("this kernel (%s) cannot list conntrack entries by status (Linux 5.15+): TCP attempts left "
                     "untranslated while kproxy's table was missing are not cleaned up", os.uname().release)
            return []
        sock = self._socket(family)
        match = NFCTAttrTuple(family=_AF[family], proto=IPPROTO_TCP)
        match.attrs()  # computes match.flags
        mask = _IPS_SEEN_REPLY | _IPS_DST_NAT
        request = nfct_msg.create_from(tuple_orig=match, cta_filter={"attrs": [["CTA_FILTER_ORIG_FLAGS", match.flags]]},
                                       status=0, status_mask=mask)
        # Message by message where pyroute2 allows it (its sync socket's own generator), so the budget bounds the
        # parsing; otherwise all at once.
        generate = getattr(sock, "_generate_with_cleanup", None)
        flags = NLM_F_REQUEST | NLM_F_DUMP
        messages = (generate(sock.asyncore.request, request, IPCTNL_MSG_CT_GET, msg_flags=flags) if generate
                    else iter(sock.request(request, IPCTNL_MSG_CT_GET, msg_flags=flags)))
        canon = _canonical if family == 6 else str
        entries = []
        self.unanswered_messages = 0
        try:
            for message in messages:
                self.unanswered_messages += 1
                if self.unanswered_messages > _UNANSWERED_BUDGET:
                    log.warning("more than %d unanswered TCP connection attempts in conntrack (IPv%d): the rest are "
                                "not looked at; any that went to a Service untranslated stay until they time out",
                                _UNANSWERED_BUDGET, family)
                    break
                status = message.get_attr("CTA_STATUS")
                if status is None or status & mask:
                    continue  # (the kernel filtered these out already)
                orig = NFCTAttrTuple.from_netlink(_AF[family], message.get_attr("CTA_TUPLE_ORIG"))
                reply = NFCTAttrTuple.from_netlink(_AF[family], message.get_attr("CTA_TUPLE_REPLY"))
                if orig.proto != IPPROTO_TCP:
                    continue
                entries.append(FlowEntry(
                    family=family, proto=orig.proto, orig_src=canon(orig.saddr), orig_dst=canon(orig.daddr),
                    orig_sport=orig.sport, orig_dport=orig.dport, reply_src=canon(reply.saddr),
                    reply_sport=reply.sport,
                    handle=_KernelHandle(message.get_attr("CTA_ID"), message.get_attr("CTA_ZONE")),
                ))
        except NetlinkError as exc:
            raise OSError(exc.code, f"listing unanswered TCP conntrack entries: {exc}") from exc
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()  # a generator left early: pyroute2's clean-up runs now
        return entries

    def _dump(self, family: IPFamily, match: Any) -> list[FlowEntry]:
        """The entries of one family whose original tuple matches ``match`` (an ``NFCTAttrTuple``)."""
        from pyroute2.netlink.exceptions import NetlinkError

        sock = self._socket(family)
        # Filtered in the kernel (CTA_FILTER, Linux 5.8+), and again by pyroute2.
        canon = _canonical if family == 6 else str
        entries = []
        try:
            for raw in sock.dump_entries(tuple_orig=match):
                orig, reply = raw.tuple_orig, raw.tuple_reply
                entries.append(
                    FlowEntry(
                        family=family,
                        proto=orig.proto,
                        orig_src=canon(orig.saddr),
                        orig_dst=canon(orig.daddr),
                        orig_sport=orig.sport,
                        orig_dport=orig.dport,
                        reply_src=canon(reply.saddr),
                        reply_sport=reply.sport,
                        handle=_KernelHandle(raw.id, raw.zone),
                    )
                )
        except NetlinkError as exc:
            raise OSError(exc.code, f"listing conntrack entries: {exc}") from exc
        return entries

    def delete(self, entry: FlowEntry) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        sock = self._socket(entry.family)
        orig = NFCTAttrTuple(
            family=_AF[entry.family],
            saddr=entry.orig_src,
            daddr=entry.orig_dst,
            proto=entry.proto,
            sport=entry.orig_sport,
            dport=entry.orig_dport,
        )
        request: dict[str, Any] = {"tuple_orig": orig}
        handle = entry.handle
        if isinstance(handle, _KernelHandle):
            # With the id the kernel deletes only this entry, never a newer one
            # with the same tuple (created after the listing, already DNATed right).
            if handle.ct_id is not None:
                request["id"] = handle.ct_id
            if handle.zone is not None:
                request["zone"] = handle.zone
        try:
            sock.entry("del", **request)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise OSError(exc.code, f"deleting conntrack entry {entry}: {exc}") from exc
        return True


class DeferredConntrack:
    """A ``PyrouteConntrack`` opened on first use, in the namespace of the thread that made this object.

    The daemon's first use is the cleanup after its first commit, so pyroute2's
    import (0.1-0.2 s, most of it modules kproxy never uses: its ndb, ipdb,
    ethtool, asyncio) is no longer on its cold start. The table is still the
    constructing thread's namespace's: the first use must come from a thread
    in that namespace (RuntimeError otherwise), and opens the sockets there. A
    failure to open is raised by that use (the proxier logs a failed cleanup)
    and tried again by the next.
    """

    def __init__(self, factory: Callable[[], Conntrack] | None = None) -> None:
        self._netns = _current_netns()
        self._factory = factory or PyrouteConntrack
        self._lock = threading.Lock()
        self._table: Conntrack | None = None

    def _opened(self) -> Conntrack:
        with self._lock:
            if self._table is None:
                if _current_netns() != self._netns:
                    raise RuntimeError("DeferredConntrack first used from a thread in another network namespace than "
                                       "the one it was created in")
                self._table = self._factory()
            return self._table

    @property
    def opened(self) -> bool:
        """Whether the kernel's table has been opened (by a first use)."""
        return self._table is not None

    def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
        return self._opened().list_udp(family, destinations)

    def list_unanswered_tcp(self, family: IPFamily) -> list[FlowEntry]:
        return self._opened().list_unanswered_tcp(family)

    def delete(self, entry: FlowEntry) -> bool:
        return self._opened().delete(entry)

    def close(self) -> None:
        with self._lock:
            table, self._table = self._table, None
        close = getattr(table, "close", None)
        if close is not None:
            close()


class FakeConntrack:
    """An in-memory conntrack table for unit tests; lists UDP only, like the kernel filter, or the TCP entries
    that are ``unanswered`` and not DNATed (their reply comes from their original destination)."""

    def __init__(self, entries: Iterable[FlowEntry] = (), unanswered: Iterable[FlowEntry] = ()) -> None:
        self.entries: list[FlowEntry] = list(entries) + list(unanswered)
        self.unanswered: list[FlowEntry] = list(unanswered)
        """The entries that have seen no reply."""
        self.deleted: list[FlowEntry] = []
        self.listed: list[tuple[IPFamily, frozenset[str] | None]] = []
        """Each listing: (family, destinations)."""
        self.listed_unanswered: list[IPFamily] = []

    def list_unanswered_tcp(self, family: IPFamily) -> list[FlowEntry]:
        self.listed_unanswered.append(family)
        return [e for e in self.unanswered if e in self.entries and e.family == family and e.proto == IPPROTO_TCP
                and (e.reply_src, e.reply_sport) == (e.orig_dst, e.orig_dport)]

    def list_udp(self, family: IPFamily, destinations: Collection[str] | None = None) -> list[FlowEntry]:
        self.listed.append((family, None if destinations is None else frozenset(destinations)))
        return [e for e in self.entries if e.family == family and e.proto == IPPROTO_UDP
                and (destinations is None or e.orig_dst in destinations)]

    def delete(self, entry: FlowEntry) -> bool:
        if entry not in self.entries:
            return False
        self.entries.remove(entry)
        self.deleted.append(entry)
        return True


# --------------------------------------------------------------------------- cleanup


def cleanup_stale_udp(conntrack: Conntrack, targets: CleanupTargets) -> int:
    """Delete the stale UDP entries; return how many were deleted.

    A family with nothing to clean is not even listed. An entry that is gone by
    the time it is deleted is not an error (and not counted). Other errors
    propagate: the next sync retries, since a stale entry stays stale.
    """
    deleted = 0
    families: tuple[IPFamily, ...] = (4, 6)
    with gc_running():  # listing leaves each entry's parsed message behind as a cycle of about 110 objects
        for family in families:
            family_targets = targets.family(family)
            if not family_targets:
                continue
            # Only entries to a frontend or, for NodePorts, to a node address can be stale.
            destinations = {address for address, _ in family_targets.frontends}
            if family_targets.node_ports:
                destinations |= family_targets.node_ips
            for entry in stale_entries(conntrack.list_udp(family, destinations), targets):
                if conntrack.delete(entry):
                    deleted += 1
                    log.debug("deleted stale UDP conntrack entry %s", entry)
                else:
                    log.debug("stale UDP conntrack entry %s was already gone", entry)
    if deleted:
        log.info("deleted %d stale UDP conntrack entries", deleted)
    return deleted


def cleanup_unanswered_tcp(conntrack: Conntrack, frontends: Mapping[IPFamily, Collection[tuple[str, int]]]) -> int:
    """Delete the TCP attempts that went to one of ``frontends`` untranslated and were never answered; return how
    many were deleted. A family without frontends is not listed. Errors propagate, as in ``cleanup_stale_udp``."""
    deleted = 0
    with gc_running():  # see cleanup_stale_udp
        for family, targets in frontends.items():
            if not targets:
                continue
            for entry in unanswered_to_frontends(conntrack.list_unanswered_tcp(family), targets):
                if conntrack.delete(entry):
                    deleted += 1
                    log.debug("deleted TCP conntrack entry %s, an attempt left untranslated", entry)
    if deleted:
        log.info("deleted %d TCP conntrack entries of connection attempts left untranslated while kproxy's table "
                 "was missing: their retransmissions are DNATed now", deleted)
    return deleted
