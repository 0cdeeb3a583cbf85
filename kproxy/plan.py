"""Plan the transaction that moves the kernel from one ruleset to another. Pure.

``plan(None, desired)`` is the converging transaction for an unknown kernel
state: it declares every object (``add`` is idempotent), then flushes and
refills every chain and every static set. It never deletes anything, so it is
what ``--dry-run`` prints and what a first sync sends.

``plan(current, desired)`` sends only the difference: chains whose rules
changed are flushed and refilled, elements are added and deleted one by one,
and unchanged objects cost nothing. Chains that are no longer wanted are
flushed, and deleted in the same transaction only when asked (upstream waits
a second before deleting a chain it just dereferenced).

Every chain's last rule carries a comment with a digest of the chain's rules,
so a ruleset read back from the kernel can be compared with a compiled one
without re-parsing nft's own formatting of each rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Literal

from kproxy.ruleset import (
    TABLE,
    Chain,
    Element,
    Family,
    Ruleset,
    SetDecl,
    Table,
    comment,
)

ELEMENT_BATCH = 1000
SERVICE_CHAIN_PREFIXES = ("svc-", "local-", "ext-")
"""Chains the compiler generates per Service port."""
GENERATED_CHAIN_PREFIXES = (*SERVICE_CHAIN_PREFIXES, "pick-")
"""Every chain the compiler generates (Service ports' and the shared pick chains); the rest are the skeleton's."""
DISPATCH_MAPS = ("service-ips", "service-nodeports")
"""The maps through which packets reach generated chains."""
LAST_SETS = (*DISPATCH_MAPS, "cluster-ips")
"""Filled last when a table is built: dispatch, and the ClusterIPs that ``cluster-ips-check``
rejects when no Service port matches (before dispatch, that would be every connection)."""
DIGEST_PREFIX = "kproxy-rules="
RULE_FORMATS = ((" map @endpoints-", "pick rules v2"),)
"""Rules whose text is sent to the kernel differently than an older kproxy sent it: (a marker in
the rule, a version). A chain with such a rule has the version in its digest, so that the chains
an older kproxy wrote are rewritten once ("pick rules v2": the pick rules are sent over netlink,
for every protocol; nft 1.0.6 had made the first one of each batch TCP-only)."""


def rules_digest(rules: Iterable[str]) -> str:
    """A short digest of a chain's rule text (and of the ``RULE_FORMATS`` its rules use)."""
    rules = tuple(rules)
    versions = [version for marker, version in RULE_FORMATS if any(marker in rule for rule in rules)]
    data = "\n".join((*versions, *rules)).encode()
    return hashlib.sha256(data).hexdigest()[:12].upper()


def chain_fingerprint(chain: Chain) -> tuple[str, int]:
    """(digest, number of rules); read-back chains carry it precomputed."""
    if chain.fingerprint is not None:
        return chain.fingerprint
    return rules_digest(chain.rules), len(chain.rules)


Verb = Literal["add", "flush", "delete"]
Kind = Literal["table", "set", "map", "chain", "rule", "element", "counter", "rules"]


@dataclass(frozen=True, slots=True)
class Op:
    """One nft command on one object of kproxy's tables."""

    verb: Verb
    kind: Kind
    family: Family
    name: str = ""
    """The set, map or chain; empty for the table itself."""
    comment: str = ""
    """add table: the table's comment."""
    set_decl: SetDecl | None = None
    """add set / add map: the declaration."""
    chain: Chain | None = None
    """add chain: the declaration (its rules are separate ``add rule`` ops)."""
    rule: str = ""
    """add rule: the rule text, digest comment included."""
    chains: tuple[Chain, ...] = ()
    """add rules: chains whose rules are appended, written as one table block (fast to parse)."""
    elements: tuple[Element, ...] = ()
    """add / delete element."""

    @property
    def weight(self) -> int:
        """How many kernel objects this command creates, changes or deletes."""
        if self.kind == "element":
            return len(self.elements)
        if self.kind == "rules":
            return sum(len(c.rules) for c in self.chains)
        return 1

    def render(self) -> str:
        where = f"{self.family} {TABLE}"
        if self.kind == "table":
            if self.verb == "add" and self.comment:
                return f"add table {where} {{ {comment(self.comment)}; }}"
            return f"{self.verb} table {where}"
        if self.kind in ("set", "map") and self.verb == "add":
            assert self.set_decl is not None
            return f"add {self.kind} {where} {self.name} {{ {'; '.join(self.set_decl.body)}; }}"
        if self.kind == "chain" and self.verb == "add":
            assert self.chain is not None
            return render_chain(where, self.chain)
        if self.kind == "rule":
            return f"add rule {where} {self.name} {self.rule}"
        if self.kind == "rules":
            lines = [f"table {where} {{"]
            for chain in self.chains:
                lines.append(f"\tchain {chain.name} {{")
                lines.extend(f"\t\t{rule}" for rule in with_digest(chain))
                lines.append("\t}")
            lines.append("}")
            return "\n".join(lines)
        if self.kind == "element":
            items = (e.render() for e in self.elements) if self.verb == "add" else (e.key for e in self.elements)
            return f"{self.verb} element {where} {self.name} {{ {', '.join(items)} }}"
        if self.kind == "counter" and self.verb == "add":
            return f"add counter {where} {self.name} {{ {comment(self.comment)}; }}" if self.comment else f"add counter {where} {self.name}"
        return f"{self.verb} {self.kind} {where} {self.name}"


@dataclass(slots=True)
class Transaction:
    """An ordered list of nft commands; ``str()`` is exactly the script sent."""

    ops: list[Op] = field(default_factory=list)
    deferred_chain_deletes: list[tuple[Family, str]] = field(default_factory=list)
    """Chains flushed and dereferenced here, to delete in a later transaction."""

    @property
    def operations(self) -> int:
        """Objects created, changed or deleted: rules, elements, chains, sets, flushes."""
        return sum(op.weight for op in self.ops)

    def add(self, op: Op) -> None:
        self.ops.append(op)

    def extend(self, other: "Transaction") -> None:
        self.ops.extend(other.ops)
        self.deferred_chain_deletes.extend(other.deferred_chain_deletes)

    def __str__(self) -> str:
        return "".join(op.render() + "\n" for op in self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)


def render_chain(where: str, chain: Chain) -> str:
    parts = []
    if chain.base:
        parts.append(chain.base.rstrip(";") + ";")
    if chain.comment:
        parts.append(comment(chain.comment) + ";")
    body = " ".join(parts)
    return f"add chain {where} {chain.name} {{ {body} }}" if body else f"add chain {where} {chain.name}"


def digest_comment(rules: tuple[str, ...]) -> str:
    return comment(DIGEST_PREFIX + rules_digest(rules))


def with_digest(chain: Chain) -> list[str]:
    """The chain's rules, the last one carrying the digest comment."""
    rules = list(chain.rules)
    if rules:
        rules[-1] = f"{rules[-1]} {digest_comment(chain.rules)}"
    return rules


def _fill_chains(tx: Transaction, table: Table, chains: list[Chain], max_rules: int = 20000) -> None:
    """Append the rules of (empty) chains, as table blocks of at most about ``max_rules`` rules."""
    batch: list[Chain] = []
    count = 0
    for chain in chains:
        if not chain.rules:
            continue
        batch.append(chain)
        count += len(chain.rules)
        if count >= max_rules:
            tx.add(Op("add", "rules", table.family, chains=tuple(batch)))
            batch, count = [], 0
    if batch:
        tx.add(Op("add", "rules", table.family, chains=tuple(batch)))


def _elements(tx: Transaction, verb: Verb, table: Table, set_name: str, elements: list[Element]) -> None:
    for i in range(0, len(elements), ELEMENT_BATCH):
        tx.add(Op(verb, "element", table.family, set_name, elements=tuple(elements[i : i + ELEMENT_BATCH])))


def _declare(table: Table, counters: bool = True, chains: Iterable[Chain] | None = None, sets: bool = True) -> Transaction:
    """Declare the table and its sets and maps, counters and chains (``add`` is idempotent); all of them by default."""
    family = table.family
    tx = Transaction()
    if sets:
        tx.add(Op("add", "table", family, comment=table.comment))
        for decl in table.sets.values():
            tx.add(Op("add", decl.kind, family, decl.name, set_decl=decl))
    if counters:
        for name, counter_comment in table.counters.items():
            tx.add(Op("add", "counter", family, name, comment=counter_comment))
    for chain in table.chains.values() if chains is None else chains:
        tx.add(Op("add", "chain", family, chain.name, chain=chain))
    return tx


def converge(table: Table) -> Transaction:
    """Bring an unknown kernel state to ``table`` without deleting anything."""
    tx = _declare(table)
    family = table.family
    for chain in table.chains.values():
        tx.add(Op("flush", "chain", family, chain.name))
    _fill_chains(tx, table, list(table.chains.values()))
    for decl in table.sets.values():
        if decl.dynamic:
            continue
        tx.add(Op("flush", decl.kind, family, decl.name))
        members = table.elements.get(decl.name, {})
        if members:
            _elements(tx, "add", table, decl.name, list(members.values()))
    return tx


def create(table: Table, max_rules: int = 8000, max_elements: int = 30000) -> list[Transaction]:
    """Transactions that build ``table`` from nothing, in bounded pieces, to apply in order.

    1. the table, its sets and maps, the skeleton's chains with their rules,
       and the elements of interval sets (libnftables);
    2. every counter and every (empty) generated chain;
    3. the generated chains' rules, in pieces of about ``max_rules`` rules;
    4. the other elements, in pieces of about ``max_elements``, but
    5. last, the dispatch maps' and the ClusterIPs' elements (``LAST_SETS``).

    Pieces 2 to 5 are what ``nfnetlink`` sends, so the backend can encode
    one while the kernel takes in the previous. Until the last piece no
    packet reaches a generated chain and no ClusterIP is rejected: traffic
    switches over atomically, to a table whose endpoints and firewall are
    already complete. Each piece is also cheap for the kernel to validate,
    because chains nothing jumps to yet are not walked.
    """
    skeleton = [c for c in table.chains.values() if c.base or not c.name.startswith(GENERATED_CHAIN_PREFIXES)]
    generated = [c for c in table.chains.values() if not c.base and c.name.startswith(GENERATED_CHAIN_PREFIXES)]
    first = _declare(table, counters=False, chains=skeleton)
    _fill_chains(first, table, skeleton, max_rules)
    declarations = _declare(table, chains=generated, sets=False)
    middle = Transaction()
    _fill_chains(middle, table, generated, max_rules)
    data, last = Transaction(), Transaction()
    for decl in table.sets.values():
        members = table.elements.get(decl.name, {})
        if members and not decl.dynamic:
            into = first if decl.interval else last if decl.name in LAST_SETS else data
            _elements(into, "add", table, decl.name, list(members.values()))
    pieces = [first, declarations, *(Transaction([op]) for op in middle.ops)]
    for op in data.ops:
        if len(pieces) == 2 + len(middle.ops) or pieces[-1].operations + op.weight > max_elements:
            pieces.append(Transaction())
        pieces[-1].add(op)
    return [*pieces, last]


def diff(
    current: Table,
    desired: Table,
    delete_chains: bool = True,
    chains: Iterable[str] | None = None,
    elements: Iterable[tuple[str, str]] | None = None,
    counters: Iterable[str] | None = None,
) -> Transaction:
    """The minimal transaction from ``current`` to ``desired`` (same family).

    ``chains`` and ``elements`` restrict the comparison to those chain names and
    (set, key) pairs, for partial syncs that know what they touched; by default
    everything is compared.
    """
    tx = Transaction()
    family = desired.family
    for name, decl in desired.sets.items():
        if name not in current.sets:
            tx.add(Op("add", decl.kind, family, name, set_decl=decl))
    counter_names = (
        list(desired.counters) + [n for n in current.counters if n not in desired.counters]
        if counters is None
        else sorted(counters)
    )
    for name in counter_names:
        if name in desired.counters and name not in current.counters:
            tx.add(Op("add", "counter", family, name, comment=desired.counters[name]))
    names = list(desired.chains) + [n for n in current.chains if n not in desired.chains] if chains is None else sorted(chains)
    new_chains: list[Chain] = []
    changed_chains: list[Chain] = []
    removed_chains: list[str] = []
    for name in names:
        want, have = desired.chains.get(name), current.chains.get(name)
        if want is None:
            if have is not None:
                removed_chains.append(name)
        elif have is None:
            new_chains.append(want)
        elif chain_fingerprint(have) != chain_fingerprint(want):
            changed_chains.append(want)
    for chain in new_chains:
        tx.add(Op("add", "chain", family, chain.name, chain=chain))
    for chain in changed_chains:
        tx.add(Op("flush", "chain", family, chain.name))
    _fill_chains(tx, desired, new_chains + changed_chains)

    stale: dict[str, list[Element]] = {}
    fresh: dict[str, list[Element]] = {}
    if elements is None:
        for name, decl in desired.sets.items():
            if decl.dynamic:
                continue
            have_members = current.elements.get(name, {})
            want_members = desired.elements.get(name, {})
            stale[name] = [e for key, e in have_members.items() if want_members.get(key) != e]
            fresh[name] = [e for key, e in want_members.items() if have_members.get(key) != e]
    else:
        for name, key in sorted(elements):
            decl = desired.sets.get(name)
            if decl is None or decl.dynamic:
                continue
            have_element = current.elements.get(name, {}).get(key)
            want_element = desired.elements.get(name, {}).get(key)
            if have_element == want_element:
                continue
            if have_element is not None:
                stale.setdefault(name, []).append(have_element)
            if want_element is not None:
                fresh.setdefault(name, []).append(want_element)
    for name, members in stale.items():
        if members:
            _elements(tx, "delete", desired, name, members)
    for name, members in fresh.items():
        if members:
            _elements(tx, "add", desired, name, members)

    for name in removed_chains:
        tx.add(Op("flush", "chain", family, name))
    for name in removed_chains:
        if delete_chains:
            tx.add(Op("delete", "chain", family, name))
        else:
            tx.deferred_chain_deletes.append((family, name))
    for name in counter_names:
        if name in current.counters and name not in desired.counters:
            tx.add(Op("delete", "counter", family, name))
    return tx


def plan(current: Ruleset | None, desired: Ruleset, delete_chains: bool = True) -> Transaction:
    """The transaction for every family of ``desired``; see the module docstring."""
    tx = Transaction()
    for family, table in desired.tables.items():
        have = current.tables.get(family) if current is not None else None
        tx.extend(converge(table) if have is None else diff(have, table, delete_chains))
    return tx


def render_ruleset(ruleset: Ruleset) -> str:
    """The complete script for ``ruleset`` (what ``--dry-run`` prints)."""
    return str(plan(None, ruleset))
