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

from collections.abc import Iterable

from kproxy.memory import gc_paused
from kproxy.nft.objects import Chain, Element, Op, Ruleset, Table, Transaction, Verb, chain_fingerprint

ELEMENT_BATCH = 1000
SERVICE_CHAIN_PREFIXES = ("svc-", "local-", "ext-", "bw-")
"""Chains the compiler generates per Service port."""
GENERATED_CHAIN_PREFIXES = (*SERVICE_CHAIN_PREFIXES, "pick-", "external-to-")
"""Every chain the compiler generates (Service ports', the shared pick chains and the shared external chains);
the rest are the skeleton's."""
DISPATCH_MAPS = ("service-ips", "service-nodeports")
"""The maps through which packets reach generated chains."""
UNSERVED_SETS = ("no-endpoint-reject", "no-endpoint-drop", "no-endpoint-nodeport-reject", "no-endpoint-nodeport-drop")
"""The Service ports without an endpoint to pick, by what becomes of their packets."""
LAST_SETS = (*DISPATCH_MAPS, "cluster-ips")
"""Filled last when a table is built: dispatch, and the ClusterIPs that ``cluster-ips-check``
rejects when no Service port matches (before dispatch, that would be every connection)."""
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
        tx.add(Op(verb, "element", table.family, set_name, set_decl=table.sets.get(set_name),
                  elements=tuple(elements[i : i + ELEMENT_BATCH])))


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

    Pieces 2 to 5 are what ``kproxy.nft.netlink`` sends, so the backend can encode
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
        elif chain_fingerprint(have, family) != chain_fingerprint(want, family):
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
            declared = desired.sets.get(name)
            if declared is None or declared.dynamic:
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
    if chains is None and elements is None:  # a whole comparison: sets an earlier skeleton had go, once nothing reads them
        for name, decl in current.sets.items():
            if name not in desired.sets:
                tx.add(Op("delete", decl.kind, family, name))
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
    with gc_paused():  # 25 MB of text in small strings at 10k Services: nothing cyclic
        return str(plan(None, ruleset))
