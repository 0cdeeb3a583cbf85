"""Hand this node back to kube-proxy: delete kproxy's tables once kube-proxy's rules serve what kproxy serves.

``kproxy --rollback-to-kube-proxy`` is ``--cleanup-kube-proxy`` in reverse.
Run it on a node whose kproxy pod is gone and where kube-proxy has started
again (docs/migration.md):

1. It reads kproxy's frontends from its own dispatch maps (``service-ips``:
   ClusterIPs, external and load-balancer IPs by protocol and port;
   ``service-nodeports``: NodePorts by protocol), per family.
2. It reads the frontends kube-proxy's rules serve, in whichever mode they
   are: its nftables tables (``ip``/``ip6 kube-proxy``: the maps
   ``service-ips``, ``no-endpoint-services``, ``service-nodeports`` and
   ``no-endpoint-nodeports``); its iptables chains through iptables-nft
   (``KUBE-SERVICES`` and ``KUBE-EXTERNAL-SERVICES`` in ``nat`` and
   ``filter``: destination, protocol and port; ``KUBE-NODEPORTS``, and the
   rules of ``KUBE-EXTERNAL-SERVICES`` without a destination: protocol and
   port); IPVS virtual servers (address, protocol, port; a NodePort is
   any virtual server on its port).
3. It waits (``--wait-for-kube-proxy``, polling every half second) until
   kube-proxy serves every frontend kproxy serves, in every family, then
   deletes ``ip kproxy`` and ``ip6 kproxy`` in one transaction. Packets of
   new connections then meet kube-proxy's rules only; established
   connections keep their conntrack entries (their NAT is decided already),
   so none is interrupted.
4. It checks that the tables stay gone for a moment: a kproxy daemon still
   running on the node would restore them at once (drift repair), and the
   rollback says so instead of reporting success.

If kube-proxy's rules do not cover kproxy's frontends by the deadline,
nothing is deleted and ``KubeProxyNotReady`` names what is missing.
``force=True`` deletes anyway. Rules made with iptables-legacy are invisible
to nftables, and iptables-nft writes an SCTP port match as an opaque ``xt``
expression, so such a node (or an SCTP Service under iptables mode) needs
``force``, after checking ``iptables-legacy-save`` or ``iptables-save`` by
hand.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.nft.backend import FAMILIES, open_libnftables
from kproxy.nft.objects import TABLE as KPROXY_TABLE
from kproxy.node.kubeproxy_cleanup import KUBE_PROXY_TABLE

log = logging.getLogger(__name__)

Frontend = tuple[str, str, str, int]
"""(family, address, protocol, port); the address is ``*`` for a NodePort."""
NODEPORT = "*"
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp"}
KUBE_PROXY_IP_MAPS = ("service-ips", "no-endpoint-services")
KUBE_PROXY_NODEPORT_MAPS = ("service-nodeports", "no-endpoint-nodeports")
IPTABLES_SERVICE_CHAINS = (("nat", "KUBE-SERVICES"), ("filter", "KUBE-SERVICES"),
                           ("filter", "KUBE-EXTERNAL-SERVICES"))
IPTABLES_NODEPORT_CHAINS = (("nat", "KUBE-NODEPORTS"), ("filter", "KUBE-NODEPORTS"),
                            ("filter", "KUBE-EXTERNAL-SERVICES"))
"""Rules without a destination match here are NodePorts (a NodePort without endpoints is rejected in
KUBE-EXTERNAL-SERVICES, matched by ``addrtype LOCAL``)."""


class RollbackError(Exception):
    """The rollback failed or was refused; the message says why and whether anything changed."""


class KubeProxyNotReady(RollbackError):
    """kube-proxy's rules do not serve every frontend kproxy serves; nothing was deleted."""


@dataclass(frozen=True, slots=True)
class RollbackReport:
    frontends: int = 0
    """kproxy's frontends (Service IP ports and NodePorts, per family) checked."""
    sources: tuple[str, ...] = ()
    """Where kube-proxy's rules were found: ``nftables ip kube-proxy``, ``iptables-nft ip``, ``ipvs``."""
    deleted: tuple[str, ...] = ()
    """``ip kproxy``, ``ip6 kproxy``."""
    forced: bool = False
    missing: tuple[Frontend, ...] = ()
    """Frontends kube-proxy did not serve (only when forced)."""
    waited: float = 0.0

    def lines(self) -> list[str]:
        if not self.deleted:
            return ["kproxy: no kproxy tables on this node; nothing to roll back"]
        found = ", ".join(self.sources) or "no kube-proxy rules"
        out = [f"kproxy: kube-proxy's rules ({found}) serve "
               f"{self.frontends - len(self.missing)} of kproxy's {self.frontends} Service frontends"
               + (f" (after {self.waited:.1f}s)" if self.waited >= 0.05 else "")]
        if self.forced:
            out.append(f"kproxy: forced: {len(self.missing)} frontends were not served by kube-proxy: "
                       + describe(self.missing))
        out += [f"kproxy: deleted table {name}" for name in self.deleted]
        return out


def describe(frontends: Iterable[Frontend], limit: int = 5) -> str:
    items = sorted(frontends)
    text = ", ".join(f"{f} {proto} {'NodePort ' if a == NODEPORT else a + ':'}{port}"
                     for f, a, proto, port in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- reading what nftables holds ------------------------------------------------------------------


def _protocol(value: Any) -> str | None:
    if isinstance(value, int):
        return PROTOCOLS.get(value)
    if isinstance(value, str) and value.lower() in PROTOCOLS.values():
        return value.lower()
    return None


def _address(value: Any) -> str | None:
    if isinstance(value, dict) and "prefix" in value:
        prefix = value["prefix"]
        full = 32 if ":" not in str(prefix.get("addr", "")) else 128
        if prefix.get("len") != full:
            return None
        value = prefix.get("addr")
    try:
        return str(ipaddress.ip_address(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _key(element: Any) -> list[Any]:
    """A set or map element's key as a list of its concatenated parts."""
    if isinstance(element, list):  # a map element: [key, value]
        element = element[0]
    if isinstance(element, dict) and "elem" in element:  # an element with a comment or timeout
        element = element["elem"].get("val")
    if isinstance(element, dict) and "concat" in element:
        return list(element["concat"])
    return [element]


def frontends_in_map(document: dict[str, Any], family: str) -> set[Frontend]:
    """The frontends in ``nft -j list map`` of a dispatch map: ``addr . proto . port`` or ``proto . port``."""
    found: set[Frontend] = set()
    for item in document.get("nftables", []):
        declared = item.get("map") or item.get("set")
        if not declared:
            continue
        for element in declared.get("elem", []):
            parts = _key(element)
            if len(parts) == 3:
                address, proto, port = _address(parts[0]), _protocol(parts[1]), parts[2]
            elif len(parts) == 2:
                address, proto, port = NODEPORT, _protocol(parts[0]), parts[1]
            else:
                continue
            if address and proto and isinstance(port, int):
                found.add((family, address, proto, port))
    return found


def frontends_in_chain(document: dict[str, Any], family: str, nodeports: bool) -> set[Frontend]:
    """The (destination, protocol, port) each rule of an iptables-nft chain matches (``nft -j list chain``)."""
    found: set[Frontend] = set()
    for item in document.get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        address, proto, port, has_daddr = None, None, None, False
        for expr in rule.get("expr", []):
            match = expr.get("match") if isinstance(expr, dict) else None
            if not isinstance(match, dict) or match.get("op", "==") != "==":
                continue
            left, right = match.get("left"), match.get("right")
            payload = left.get("payload", {}) if isinstance(left, dict) else {}
            meta = left.get("meta", {}) if isinstance(left, dict) else {}
            if payload.get("field") == "daddr" and payload.get("protocol") in ("ip", "ip6"):
                address, has_daddr = _address(right), True
            elif payload.get("field") == "dport" and isinstance(right, int):
                proto, port = proto or _protocol(payload.get("protocol")), right
            elif meta.get("key") == "l4proto":
                proto = _protocol(right)
        if nodeports and not has_daddr and proto and port is not None:
            found.add((family, NODEPORT, proto, port))
        elif not nodeports and address and proto and port is not None:
            found.add((family, address, proto, port))
    return found


class _Nft:
    """The few libnftables reads and the one transaction the rollback makes."""

    def __init__(self) -> None:
        self._nft = open_libnftables(RollbackError)
        self._nft.set_json_output(True)

    def listing(self, what: str) -> dict[str, Any] | None:
        """``nft -j list WHAT``, or None if it does not exist."""
        rc, out, _ = self._nft.cmd(f"list {what}")
        if rc != 0:
            return None
        return json.loads(out) if out.strip() else {}

    def tables(self) -> set[tuple[str, str]]:
        document = self.listing("tables")
        if document is None:
            raise RollbackError("nft list tables failed")
        return {(i["table"]["family"], i["table"]["name"]) for i in document.get("nftables", []) if "table" in i}

    def delete_tables(self, tables: Sequence[tuple[str, str]]) -> None:
        commands = [{"delete": {"table": {"family": f, "name": n}}} for f, n in tables]
        rc, _, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            first = next((line for line in err.splitlines() if "Error" in line), err.strip()[:200])
            raise RollbackError(f"the kernel refused to delete kproxy's tables, nothing was changed: {first}")


def kproxy_frontends(nft: _Nft, present: set[tuple[str, str]]) -> set[Frontend]:
    found: set[Frontend] = set()
    for family in FAMILIES:
        if (family, KPROXY_TABLE) in present:
            for name in ("service-ips", "service-nodeports"):
                document = nft.listing(f"map {family} {KPROXY_TABLE} {name}")
                if document is not None:
                    found |= frontends_in_map(document, family)
    return found


def ipvs_frontends() -> set[Frontend] | None:
    """IPVS virtual servers as frontends (a NodePort as any server on its port), or None without IPVS."""
    try:
        from pyroute2 import IPVS

        ipvs = IPVS()
        try:
            services = list(ipvs.service("dump"))
        finally:
            ipvs.close()
    except Exception as exc:  # no ip_vs module, no generic netlink family: no IPVS rules either
        log.debug("IPVS not readable: %s", exc)
        return None
    return ipvs_services(services) or None


def ipvs_services(messages: Iterable[Any]) -> set[Frontend]:
    """Frontends from IPVS service messages (pyroute2's: ``IPVS_CMD_ATTR_SERVICE`` holding ``IPVS_SVC_ATTR_*``)."""
    found: set[Frontend] = set()
    for message in messages:
        service = message.get_attr("IPVS_CMD_ATTR_SERVICE")
        if service is None:
            continue
        address, port, proto = (service.get_attr(f"IPVS_SVC_ATTR_{name}") for name in ("ADDR", "PORT", "PROTOCOL"))
        name = PROTOCOLS.get(proto) if isinstance(proto, int) else None
        canonical = _address(address)
        if canonical and isinstance(port, int) and name:
            family = "ip6" if ":" in canonical else "ip"
            found.add((family, canonical, name, port))
            found.add((family, NODEPORT, name, port))
    return found


def kube_proxy_frontends(nft: _Nft, present: set[tuple[str, str]],
                         ipvs: Callable[[], set[Frontend] | None] = ipvs_frontends) -> tuple[set[Frontend], list[str]]:
    """What kube-proxy's rules serve now, and where they were found."""
    found: set[Frontend] = set()
    sources: list[str] = []
    for family in FAMILIES:
        if (family, KUBE_PROXY_TABLE) in present:
            sources.append(f"nftables {family} {KUBE_PROXY_TABLE}")
            for name in KUBE_PROXY_IP_MAPS + KUBE_PROXY_NODEPORT_MAPS:
                document = nft.listing(f"map {family} {KUBE_PROXY_TABLE} {name}")
                if document is not None:
                    found |= frontends_in_map(document, family)
        chains = 0
        for tables, nodeports in ((IPTABLES_SERVICE_CHAINS, False), (IPTABLES_NODEPORT_CHAINS, True)):
            for table, chain in tables:
                if (family, table) not in present:
                    continue
                document = nft.listing(f"chain {family} {table} {chain}")
                if document is not None:
                    chains += 1
                    found |= frontends_in_chain(document, family, nodeports)
        if chains:
            sources.append(f"iptables-nft {family} KUBE-SERVICES")
    virtual = ipvs()
    if virtual:
        sources.append("ipvs")
        found |= virtual
    return found, sources


@dataclass
class _Check:
    frontends: set[Frontend] = field(default_factory=set)
    missing: set[Frontend] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)
    present: set[tuple[str, str]] = field(default_factory=set)


def _check(nft: _Nft, ipvs: Callable[[], set[Frontend] | None]) -> _Check:
    present = nft.tables()
    mine = kproxy_frontends(nft, present)
    theirs, sources = kube_proxy_frontends(nft, present, ipvs)
    return _Check(mine, mine - theirs, sources, present)


def rollback_to_kube_proxy(
    wait: float = 0.0,
    force: bool = False,
    poll: float = 0.5,
    settle: float = 1.0,
    ipvs: Callable[[], set[Frontend] | None] = ipvs_frontends,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RollbackReport:
    """Delete kproxy's tables once kube-proxy's rules serve every frontend kproxy serves (see the module docstring).

    Waits up to ``wait`` seconds for kube-proxy; raises KubeProxyNotReady
    (nothing deleted) if it does not get there, unless ``force``. Raises
    RollbackError if the tables come back within ``settle`` seconds.
    """
    nft = _Nft()
    start = clock()
    while True:
        check = _check(nft, ipvs)
        mine = [(family, KPROXY_TABLE) for family in FAMILIES if (family, KPROXY_TABLE) in check.present]
        if not mine:
            return RollbackReport()
        if not check.missing or force or clock() - start >= wait:
            break
        sleep(poll)
    waited = clock() - start
    if check.missing and not force:
        found = ", ".join(check.sources) or "none at all"
        legacy = "" if check.sources else (" (rules kube-proxy wrote with iptables-legacy are invisible to nftables:"
                                           " check iptables-legacy-save yourself, then --force)")
        raise KubeProxyNotReady(
            f"kube-proxy's rules do not serve {len(check.missing)} of kproxy's {len(check.frontends)} Service "
            f"frontends on this node after {waited:.1f}s ({describe(check.missing)}; kube-proxy's rules found: "
            f"{found}){legacy}: deleting kproxy's tables now would leave them unserved, so nothing was deleted. "
            "Start kube-proxy on this node and wait until it has synced (--wait-for-kube-proxy), or --force"
        )
    nft.delete_tables(mine)
    deleted = tuple(f"{family} {name}" for family, name in mine)
    log.info("deleted %s; kube-proxy serves this node's Services", ", ".join(deleted))
    deadline = clock() + settle
    while clock() < deadline:
        sleep(min(0.1, settle))
        back = [f"{f} {n}" for f, n in mine if (f, n) in nft.tables()]
        if back:
            raise RollbackError(
                f"kproxy's tables were deleted, but {', '.join(back)} came back: a kproxy daemon still runs on this "
                "node and restored them. Take the node off kproxy's DaemonSet first (docs/migration.md), then "
                "run the rollback again")
    return RollbackReport(len(check.frontends), tuple(check.sources), deleted, force and bool(check.missing),
                          tuple(sorted(check.missing)), waited)
