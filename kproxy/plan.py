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

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Iterable

from kproxy.ruleset import TABLE, Chain, Element, Family, Ruleset, SetDecl, Table, comment

ELEMENT_BATCH = 1000
DIGEST_PREFIX = "kproxy-rules="


def rules_digest(rules: Iterable[str]) -> str:
    """A short digest of a chain's rule text."""
    data = "\n".join(rules).encode()
    return base64.b32encode(hashlib.sha256(data).digest())[:10].decode()


def chain_fingerprint(chain: Chain) -> tuple[str, int]:
    """(digest, number of rules); read-back chains carry it precomputed."""
    if chain.fingerprint is not None:
        return chain.fingerprint
    return rules_digest(chain.rules), len(chain.rules)


@dataclass(slots=True)
class Transaction:
    """An ordered list of nft commands; ``str()`` is exactly the script sent."""

    commands: list[str] = field(default_factory=list)
    operations: int = 0
    """Objects created, changed or deleted: rules, elements, chains, sets, flushes."""
    deferred_chain_deletes: list[tuple[Family, str]] = field(default_factory=list)
    """Chains flushed and dereferenced here, to delete in a later transaction."""

    def add(self, command: str, operations: int = 1) -> None:
        self.commands.append(command)
        self.operations += operations

    def extend(self, other: "Transaction") -> None:
        self.commands.extend(other.commands)
        self.operations += other.operations
        self.deferred_chain_deletes.extend(other.deferred_chain_deletes)

    def __str__(self) -> str:
        return "".join(c + "\n" for c in self.commands)

    def __bool__(self) -> bool:
        return bool(self.commands)


def _where(table: Table) -> str:
    return f"{table.family} {TABLE}"


def render_set(table: Table, decl: SetDecl) -> str:
    return f"add {decl.kind} {_where(table)} {decl.name} {{ {'; '.join(decl.body)}; }}"


def render_chain(table: Table, chain: Chain) -> str:
    parts = []
    if chain.base:
        parts.append(chain.base.rstrip(";") + ";")
    if chain.comment:
        parts.append(comment(chain.comment) + ";")
    body = " ".join(parts)
    return f"add chain {_where(table)} {chain.name} {{ {body} }}" if body else f"add chain {_where(table)} {chain.name}"


def _rule_commands(table: Table, chain: Chain) -> list[str]:
    prefix = f"add rule {_where(table)} {chain.name} "
    rules = list(chain.rules)
    if rules:
        rules[-1] = f"{rules[-1]} {comment(DIGEST_PREFIX + rules_digest(chain.rules))}"
    return [prefix + r for r in rules]


def _element_commands(verb: str, table: Table, set_name: str, elements: list[str]) -> list[str]:
    return [
        f"{verb} element {_where(table)} {set_name} {{ {', '.join(elements[i:i + ELEMENT_BATCH])} }}"
        for i in range(0, len(elements), ELEMENT_BATCH)
    ]


def _fill_chain(tx: Transaction, table: Table, chain: Chain) -> None:
    for command in _rule_commands(table, chain):
        tx.add(command)


def _add_elements(tx: Transaction, table: Table, set_name: str, elements: list[Element]) -> None:
    for command in _element_commands("add", table, set_name, [e.render() for e in elements]):
        tx.add(command, 0)
    tx.operations += len(elements)


def _delete_elements(tx: Transaction, table: Table, set_name: str, keys: list[str]) -> None:
    for command in _element_commands("delete", table, set_name, keys):
        tx.add(command, 0)
    tx.operations += len(keys)


def converge(table: Table) -> Transaction:
    """Bring an unknown kernel state to ``table`` without deleting anything."""
    tx = Transaction()
    tx.add(f"add table {_where(table)} {{ {comment(table.comment)}; }}" if table.comment else f"add table {_where(table)}")
    for decl in table.sets.values():
        tx.add(render_set(table, decl))
    for chain in table.chains.values():
        tx.add(render_chain(table, chain))
    for chain in table.chains.values():
        tx.add(f"flush chain {_where(table)} {chain.name}")
        _fill_chain(tx, table, chain)
    for decl in table.sets.values():
        if decl.dynamic:
            continue
        tx.add(f"flush {decl.kind} {_where(table)} {decl.name}")
        members = table.elements.get(decl.name, {})
        if members:
            _add_elements(tx, table, decl.name, list(members.values()))
    return tx


def diff(current: Table, desired: Table, delete_chains: bool = True) -> Transaction:
    """The minimal transaction from ``current`` to ``desired`` (same family)."""
    tx = Transaction()
    where = _where(desired)
    for name, decl in desired.sets.items():
        if name not in current.sets:
            tx.add(render_set(desired, decl))
    new_chains = [c for n, c in desired.chains.items() if n not in current.chains]
    changed_chains = [
        c
        for n, c in desired.chains.items()
        if n in current.chains and chain_fingerprint(current.chains[n]) != chain_fingerprint(c)
    ]
    removed_chains = [n for n in current.chains if n not in desired.chains]
    for chain in new_chains:
        tx.add(render_chain(desired, chain))
    for chain in changed_chains:
        tx.add(f"flush chain {where} {chain.name}")
    for chain in new_chains + changed_chains:
        _fill_chain(tx, desired, chain)

    for name, decl in desired.sets.items():
        if decl.dynamic:
            continue
        have = current.elements.get(name, {})
        want = desired.elements.get(name, {})
        stale = [key for key, element in have.items() if want.get(key) != element]
        fresh = [element for key, element in want.items() if have.get(key) != element]
        if stale:
            _delete_elements(tx, desired, name, stale)
        if fresh:
            _add_elements(tx, desired, name, fresh)

    for name in removed_chains:
        tx.add(f"flush chain {where} {name}")
    for name in removed_chains:
        if delete_chains:
            tx.add(f"delete chain {where} {name}")
        else:
            tx.deferred_chain_deletes.append((desired.family, name))
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
