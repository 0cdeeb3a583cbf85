"""Remove upstream kube-proxy's rules from this network namespace, once kproxy's are in place.

What goes, in one nftables transaction (the kernel applies all of it or none):

* kube-proxy's nftables-mode tables, ``ip kube-proxy`` and ``ip6 kube-proxy``;
* in the tables iptables-nft keeps (``ip``/``ip6`` ``filter``, ``nat``,
  ``mangle``), every ``KUBE-*`` chain of kube-proxy's iptables and IPVS modes:
  the rules that jump (or go) to them from the built-in chains are deleted by
  handle, the chains are flushed, then deleted.

What stays: every other table, chain and rule, and these ``KUBE-*`` chains,
which other components own (``PROTECTED``):

* kubelet's ``KUBE-FIREWALL`` (its anti-martian rule for ``route_localnet``),
  ``KUBE-KUBELET-CANARY`` and ``KUBE-IPTABLES-HINT`` (iptables-wrapper looks
  for the last two to choose between iptables-nft and iptables-legacy);
* kube-router's network-policy chains (``KUBE-ROUTER-*``, ``KUBE-POD-FW-*``,
  ``KUBE-NWPLCY-*``).

A ``KUBE-*`` chain still referenced from a chain that stays (other than a
built-in one) stays too, and the report says why.

Rules kube-proxy made with iptables-legacy are invisible to nftables and are
not touched; neither are IPVS virtual servers, the ``kube-ipvs0`` interface or
ipsets (docs/migration.md says how to remove those).

kproxy's own rules must already be in place in every family where something
would be removed: taking kube-proxy's rules away first would leave Services
unserved. In place means kproxy's table exists and is not halfway through its
first build. That build (``kproxy.rules.plan.create``) takes several transactions:
the first declares the table; then come the chains, then the Service ports'
elements, and the last fills the dispatch maps. So a table with Service
chains, endpoint slots or ``no-endpoint-*`` elements but empty ``service-ips``
and ``service-nodeports`` maps is still being built. (Between the first
transactions and the first elements, a table whose Services have no chains
of their own looks like an empty cluster's: a window of milliseconds, at the
start of the build.) ``force=True`` skips the check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kproxy.nft.backend import FAMILIES, open_libnftables
from kproxy.nft.objects import TABLE as KPROXY_TABLE
from kproxy.rules.plan import DISPATCH_MAPS, SERVICE_CHAIN_PREFIXES, UNSERVED_SETS

log = logging.getLogger(__name__)

KUBE_PROXY_TABLE = "kube-proxy"
"""kube-proxy's nftables-mode table name (in both the ip and ip6 families)."""
IPTABLES_TABLES = ("filter", "nat", "mangle")
"""The iptables-nft tables kube-proxy writes to."""
CHAIN_PREFIX = "KUBE-"
PROTECTED = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
"""kubelet's chains: left in place."""
PROTECTED_PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
"""kube-router's network-policy chains: left in place."""


class KubeProxyCleanupError(Exception):
    """The cleanup did not run, or the kernel refused it; nothing was changed."""


class KproxyNotReady(KubeProxyCleanupError):
    """kproxy's rules are not in place (table missing, or first build unfinished) where kube-proxy's would go."""


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What was removed (or, with nothing to do, that nothing was)."""

    tables: tuple[str, ...] = ()
    """Whole tables deleted: ``ip kube-proxy``."""
    chains: tuple[str, ...] = ()
    """iptables-nft chains deleted: ``ip nat KUBE-SERVICES``."""
    rules: tuple[str, ...] = ()
    """Jump rules deleted from built-in chains: ``ip nat PREROUTING handle 4 (jump KUBE-SERVICES)``."""
    kept: tuple[str, ...] = ()
    """``KUBE-*`` chains left in place, with the reason."""
    forced: bool = False

    @property
    def removed_anything(self) -> bool:
        return bool(self.tables or self.chains or self.rules)

    def lines(self) -> list[str]:
        """The report, one line per item, for the command line."""
        if not self.removed_anything:
            out = ["kproxy: no kube-proxy rules found; nothing removed"]
        else:
            out = [f"kproxy: removed table {t}" for t in self.tables]
            out += [f"kproxy: removed rule {r}" for r in self.rules]
            out += [f"kproxy: removed chain {c}" for c in self.chains]
        out += [f"kproxy: kept chain {k}" for k in self.kept]
        return out


@dataclass
class _Table:
    """One iptables-nft table as listed: chains, which are built-in, and every jump between chains."""

    family: str
    name: str
    chains: list[str] = field(default_factory=list)
    builtin: set[str] = field(default_factory=set)
    jumps: list[tuple[str, int, str, str]] = field(default_factory=list)
    """(from chain, rule handle, "jump" or "goto", target chain)."""


def is_kube_proxy_chain(name: str) -> bool:
    """A ``KUBE-*`` chain that is not kubelet's or kube-router's."""
    return (
        name.startswith(CHAIN_PREFIX)
        and name not in PROTECTED
        and not any(name.startswith(prefix) for prefix in PROTECTED_PREFIXES)
    )


def _verdicts(expr: Any) -> Iterable[tuple[str, str]]:
    """Every (jump|goto, target) anywhere inside a rule's expressions."""
    if isinstance(expr, dict):
        for key, value in expr.items():
            if key in ("jump", "goto") and isinstance(value, dict) and isinstance(value.get("target"), str):
                yield key, value["target"]
            else:
                yield from _verdicts(value)
    elif isinstance(expr, list):
        for item in expr:
            yield from _verdicts(item)


def _parse_table(document: dict[str, Any], family: str, name: str) -> _Table:
    table = _Table(family, name)
    for item in document.get("nftables", []):
        if "chain" in item:
            chain = item["chain"]
            table.chains.append(chain["name"])
            if "hook" in chain:
                table.builtin.add(chain["name"])
        elif "rule" in item:
            rule = item["rule"]
            for verdict, target in _verdicts(rule.get("expr", [])):
                table.jumps.append((rule["chain"], int(rule["handle"]), verdict, target))
    return table


@dataclass
class _Plan:
    commands: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    families: set[str] = field(default_factory=set)
    """Families in which something is removed."""


def _plan_table(table: _Table, plan: _Plan) -> None:
    """Add the removal of one iptables-nft table's kube-proxy chains to the plan."""
    family, name = table.family, table.name
    remove = {c for c in table.chains if is_kube_proxy_chain(c) and c not in table.builtin}
    for chain in table.chains:
        if chain.startswith(CHAIN_PREFIX) and chain not in remove and chain not in table.builtin:
            plan.kept.append(f"{family} {name} {chain} (not kube-proxy's)")
    # A chain that stays and is not built-in keeps its targets: its owner's rules are not ours to edit.
    changed = True
    while changed:
        changed = False
        for source, _handle, _verdict, target in table.jumps:
            if target in remove and source not in remove and source not in table.builtin:
                remove.discard(target)
                plan.kept.append(f"{family} {name} {target} (referenced from {source})")
                changed = True
    if not remove:
        return
    plan.families.add(family)
    where = {"family": family, "table": name}
    for source, handle, verdict, target in table.jumps:
        if target in remove and source in table.builtin:
            plan.commands.append({"delete": {"rule": dict(where, chain=source, handle=handle)}})
            plan.rules.append(f"{family} {name} {source} handle {handle} ({verdict} {target})")
    ordered = [c for c in table.chains if c in remove]
    plan.commands += [{"flush": {"chain": dict(where, name=c)}} for c in ordered]
    plan.commands += [{"delete": {"chain": dict(where, name=c)}} for c in ordered]
    plan.chains += [f"{family} {name} {c}" for c in ordered]


class _Nft:
    """The few libnftables calls this module makes."""

    def __init__(self) -> None:
        self._nft = open_libnftables(KubeProxyCleanupError)
        self._nft.set_handle_output(True)

    def tables(self) -> set[tuple[str, str]]:
        rc, out, err = self._json("list tables")
        if rc != 0:
            raise KubeProxyCleanupError(f"nft list tables failed: {_first_line(err)}")
        return {(i["table"]["family"], i["table"]["name"]) for i in out.get("nftables", []) if "table" in i}

    def table(self, family: str, name: str) -> dict[str, Any]:
        rc, out, err = self._json(f"list table {family} {name}")
        if rc != 0:
            raise KubeProxyCleanupError(f"nft list table {family} {name} failed: {_first_line(err)}")
        return out

    def chains(self, family: str, table: str) -> list[str]:
        """The names of a table's chains (``list chains`` lists no rules: cheap at any size)."""
        rc, out, err = self._json(f"list chains {family}")
        if rc != 0:
            raise KubeProxyCleanupError(f"nft list chains {family} failed: {_first_line(err)}")
        return [i["chain"]["name"] for i in out.get("nftables", []) if i.get("chain", {}).get("table") == table]

    def has_elements(self, family: str, table: str, name: str, kind: str = "map") -> bool:
        """Whether the set or map (``kind``) holds an element."""
        rc, out, err = self._json(f"list {kind} {family} {table} {name}")
        if rc != 0:
            raise KubeProxyCleanupError(f"nft list {kind} {family} {table} {name} failed: {_first_line(err)}")
        return any(i[kind].get("elem") for i in out.get("nftables", []) if kind in i)

    def _json(self, command: str) -> tuple[int, dict[str, Any], str]:
        self._nft.set_json_output(True)
        rc, out, err = self._nft.cmd(command)
        return rc, (json.loads(out) if rc == 0 and out.strip() else {}), err

    def apply(self, commands: list[dict[str, Any]]) -> None:
        rc, _out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise KubeProxyCleanupError(
                f"the kernel refused the cleanup transaction, nothing was changed: {_first_line(err)}"
                " (is kube-proxy still running on this node? stop it first)"
            )


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and "Warning:" not in line]
    error = next((line for line in lines if "Error:" in line), lines[0] if lines else "unknown error")
    return error.strip()


def _has_services(nft: _Nft, family: str) -> bool:
    """Whether a sync has put Services into the table, dispatch aside (a first sync fills dispatch last).

    Every Service port has a chain of its own, or its first endpoint's slot
    in ``endpoints-4``, or a ``no-endpoint-*`` element (no endpoint to pick).
    """
    if any(c.startswith(SERVICE_CHAIN_PREFIXES) for c in nft.chains(family, KPROXY_TABLE)):
        return True
    return nft.has_elements(family, KPROXY_TABLE, "endpoints-4") or any(
        nft.has_elements(family, KPROXY_TABLE, name, "set") for name in UNSERVED_SETS)


def _kproxy_not_ready(nft: _Nft, present: set[tuple[str, str]], family: str) -> str | None:
    """Why kproxy's rules are not in place in ``family`` yet, or None if they are."""
    if (family, KPROXY_TABLE) not in present:
        return f"kproxy's table {family} {KPROXY_TABLE} not found"
    # Dispatch first: a built table has it, and the other sets can be large (endpoints-4 at 30k Services).
    if not any(nft.has_elements(family, KPROXY_TABLE, name) for name in DISPATCH_MAPS) and _has_services(nft, family):
        return f"kproxy's table {family} {KPROXY_TABLE} is still being built (its first sync has not finished)"
    return None


def cleanup_kube_proxy(force: bool = False) -> CleanupReport:
    """Remove kube-proxy's nftables tables and iptables-nft chains from this network namespace.

    Raises KproxyNotReady (before changing anything) if kproxy's table is
    missing or still being built in a family where something would be removed,
    unless ``force``; KubeProxyCleanupError if the kernel refuses the
    transaction (nothing is changed then either).
    """
    nft = _Nft()
    present = nft.tables()
    plan = _Plan()
    for family in FAMILIES:
        if (family, KUBE_PROXY_TABLE) in present:
            plan.commands.append({"delete": {"table": {"family": family, "name": KUBE_PROXY_TABLE}}})
            plan.tables.append(f"{family} {KUBE_PROXY_TABLE}")
            plan.families.add(family)
        for name in IPTABLES_TABLES:
            if (family, name) in present:
                _plan_table(_parse_table(nft.table(family, name), family, name), plan)
    problems = [problem for family in sorted(plan.families) if (problem := _kproxy_not_ready(nft, present, family))]
    if problems and not force:
        raise KproxyNotReady(
            f"{'; '.join(problems)}: removing kube-proxy's rules now would leave Services unserved;"
            " wait until kproxy has synced on this node (or force it)"
        )
    if plan.commands:
        nft.apply(plan.commands)
        log.info("removed kube-proxy's rules: %d tables, %d chains, %d jump rules",
                 len(plan.tables), len(plan.chains), len(plan.rules))
    return CleanupReport(
        tables=tuple(plan.tables),
        chains=tuple(plan.chains),
        rules=tuple(plan.rules),
        kept=tuple(plan.kept),
        forced=force and bool(problems),
    )
