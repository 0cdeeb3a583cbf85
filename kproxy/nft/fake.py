"""An in-memory backend that applies transactions all-or-nothing, like the kernel. Pure.

For fast unit tests of anything that talks to a ``Backend``: it implements the
whole protocol (``kproxy.nft.kernel``). It keeps the tables in memory,
applies a transaction to a copy, checks what the kernel would check (objects
exist before they are used, a chain still referenced cannot be deleted, a map
key cannot silently change its value, every ``goto``/``jump`` target and
``@set`` exists), and only then swaps the copy in. Root tests run the same
transactions against the real kernel, which keeps this honest.

It can be seeded with a ruleset (``FakeBackend(seed)``: a node as some
earlier run left it) and dumped (``dump()``: the tables with every rule, for
``kproxy.nft.trace`` or a golden comparison).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.nft.kernel import Counters, NftError
from kproxy.nft.objects import (
    TABLE,
    Chain,
    Element,
    Family,
    Op,
    Ruleset,
    Table,
    Transaction,
    chain_fingerprint,
    comment,
    with_digest,
)
from kproxy.nft.statements import Rule, chains_it_reaches, counters_it_uses, render_rule, sets_it_reads


@dataclass(slots=True)
class ChainRules:
    """What the kernel holds in one chain: its rules, and the digest the last of them carries."""

    rules: list[Rule] = field(default_factory=list)
    digest: str = ""


class FakeBackend:
    """kproxy's tables, in memory."""

    def __init__(self, seed: Ruleset | None = None) -> None:
        self.tables: dict[Family, Table] = {}
        self.rules: dict[tuple[Family, str], ChainRules] = {}
        for family, table in (seed.tables.items() if seed is not None else ()):
            self.tables[family] = Table(family=family, comment=table.comment, sets=dict(table.sets),
                                        counters=dict(table.counters))
            self.tables[family].elements = {name: dict(members) for name, members in table.elements.items()}
            for name, chain in table.chains.items():
                self.tables[family].chains[name] = Chain(name, (), chain.comment, chain.base)
                digest = chain_fingerprint(chain, family)[0] if chain.rules else ""
                self.rules[(family, name)] = ChainRules(list(chain.rules), digest)
        if seed is not None:
            self._check_references(self.tables, self.rules)
        self.transactions: list[Transaction] = []
        """Every transaction that was committed, in order."""
        self.commits = 0
        self.committers: set[int] = {os.getpid()}
        self.fail_next: NftError | None = None
        """Set to make the next apply fail with this error (nothing is changed)."""

    @property
    def last(self) -> Transaction | None:
        return self.transactions[-1] if self.transactions else None

    def apply(self, tx: Transaction) -> None:
        if not tx:
            return
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        tables = copy.deepcopy(self.tables)
        rules = copy.deepcopy(self.rules)
        for op in tx.ops:
            try:
                self._apply(tables, rules, op)
            except NftError as exc:
                raise NftError(exc.reason, op.render(), op=op) from None
        self._check_references(tables, rules)
        self.tables, self.rules = tables, rules
        self.transactions.append(tx)
        self.commits += 1

    def apply_in_order(self, transactions: Iterable[Transaction]) -> None:
        """Apply each transaction in turn; stop at the first refused."""
        for tx in transactions:
            self.apply(tx)

    def _apply(self, tables: dict[Family, Table], rules: dict[tuple[Family, str], ChainRules], op: Op) -> None:
        table = tables.get(op.family)
        if op.kind == "table":
            if op.verb == "add":
                if table is None:
                    tables[op.family] = Table(family=op.family, comment=op.comment)
                return
            if table is None:
                raise NftError("No such file or directory")
            if op.verb == "delete":
                del tables[op.family]
                for key in [k for k in rules if k[0] == op.family]:
                    del rules[key]
                return
            raise NftError(f"unsupported: {op.verb} table")
        if table is None:
            raise NftError("No such file or directory")
        if op.kind in ("set", "map"):
            if op.verb == "add":
                assert op.set_decl is not None
                table.sets.setdefault(op.name, op.set_decl)
                table.elements.setdefault(op.name, {})
            elif op.verb == "flush":
                self._need_set(table, op.name)
                table.elements[op.name] = {}
            elif op.verb == "delete":
                self._need_set(table, op.name)
                if any(op.name in sets_it_reads(r) for (fam, _), held in rules.items() if fam == op.family
                       for r in held.rules):
                    raise NftError(f"Device or resource busy ({op.kind} is still referenced)")
                del table.sets[op.name]
                table.elements.pop(op.name, None)
            else:
                raise NftError(f"unsupported: {op.verb} {op.kind}")
        elif op.kind == "chain":
            key = (op.family, op.name)
            if op.verb == "add":
                assert op.chain is not None
                table.chains.setdefault(op.name, Chain(op.name, (), op.chain.comment, op.chain.base))
                rules.setdefault(key, ChainRules())
            elif op.verb == "flush":
                self._need_chain(table, op.name)
                rules[key] = ChainRules()
            elif op.verb == "delete":
                self._need_chain(table, op.name)
                if rules.get(key, ChainRules()).rules:
                    raise NftError("Device or resource busy (chain is not empty)")
                if self._referenced(table, rules, op.family, op.name):
                    raise NftError("Device or resource busy (chain is still referenced)")
                del table.chains[op.name]
                del rules[key]
        elif op.kind == "counter":
            if op.verb == "add":
                table.counters.setdefault(op.name, op.comment)
            elif op.verb == "delete":
                if op.name not in table.counters:
                    raise NftError("No such file or directory (counter)")
                if any(op.name in counters_it_uses(r) for (fam, _), held in rules.items() if fam == op.family
                       for r in held.rules):
                    raise NftError("Device or resource busy (counter is still referenced)")
                del table.counters[op.name]
        elif op.kind == "rules":
            for chain in op.chains:
                self._need_chain(table, chain.name)
                held = rules[(op.family, chain.name)]
                held.rules.extend(chain.rules)
                if chain.rules:
                    held.digest = chain_fingerprint(chain, op.family)[0]
        elif op.kind == "element":
            self._need_set(table, op.name)
            members = table.elements.setdefault(op.name, {})
            for element in op.elements:
                if op.verb == "add":
                    existing = members.get(element.key)
                    if existing is not None and existing.value != element.value:
                        raise NftError("File exists (element with another value)")
                    members[element.key] = element
                elif op.verb == "delete":
                    if element.key not in members:
                        raise NftError("No such file or directory (element)")
                    del members[element.key]

    @staticmethod
    def _need_chain(table: Table, name: str) -> None:
        if name not in table.chains:
            raise NftError("No such file or directory (chain)")

    @staticmethod
    def _need_set(table: Table, name: str) -> None:
        if name not in table.sets:
            raise NftError("No such file or directory (set)")

    @staticmethod
    def _referenced(table: Table, rules: dict[tuple[Family, str], ChainRules], family: Family, name: str) -> bool:
        for (fam, _), held in rules.items():
            if fam == family and any(name in chains_it_reaches(r) for r in held.rules):
                return True
        return any(
            element.value.split(" ", 1)[-1] == name and element.value.startswith(("goto ", "jump "))
            for members in table.elements.values()
            for element in members.values()
        )

    @staticmethod
    def _check_references(tables: dict[Family, Table], rules: dict[tuple[Family, str], ChainRules]) -> None:
        for (family, chain), held in rules.items():
            table = tables[family]
            for rule in held.rules:
                where = f"add rule {family} kproxy {chain} {render_rule(rule, family)}"
                if any(target not in table.chains for target in chains_it_reaches(rule)):
                    raise NftError("No such file or directory (jump target)", where)
                if any(ref not in table.sets for ref in sets_it_reads(rule)):
                    raise NftError("No such file or directory (set)", where)
                if any(ref not in table.counters for ref in counters_it_uses(rule)):
                    raise NftError("No such file or directory (counter)", where)
        for family, table in tables.items():
            for name, members in table.elements.items():
                for element in members.values():
                    if element.value.startswith(("goto ", "jump ")) and element.value.split(" ", 1)[1] not in table.chains:
                        raise NftError("No such file or directory (verdict target)", f"add element {family} kproxy {name}")

    def read(self) -> Ruleset:
        """The tables as the real backend would read them back (fingerprints, not rules)."""
        ruleset = Ruleset()
        for family, table in self.tables.items():
            copy_ = Table(family=family, comment=table.comment, sets=dict(table.sets), counters=dict(table.counters))
            copy_.elements = {name: dict(members) for name, members in table.elements.items() if not table.sets[name].dynamic}
            for name in table.chains:
                held = self.rules.get((family, name), ChainRules())
                copy_.chains[name] = Chain(name, (), fingerprint=(held.digest, len(held.rules)))
            ruleset.tables[family] = copy_
        return ruleset

    def dump(self) -> Ruleset:
        """The tables with every rule, as a compiled ruleset holds them (what ``FakeBackend(seed)`` takes)."""
        ruleset = Ruleset()
        for family, table in self.tables.items():
            copy_ = Table(family=family, comment=table.comment, sets=dict(table.sets), counters=dict(table.counters))
            copy_.elements = {name: dict(members) for name, members in table.elements.items()}
            for name, chain in table.chains.items():
                copy_.chains[name] = Chain(name, tuple(self.rules[(family, name)].rules), chain.comment, chain.base)
            ruleset.tables[family] = copy_
        return ruleset

    def read_counters(self) -> Counters:
        """Every named counter: no packet crosses a fake, so all are zero."""
        return {(family, name): (0, 0) for family, table in self.tables.items() for name in table.counters}

    def read_named_counters(self, names: Iterable[tuple[Family, str]]) -> Counters:
        counters = self.read_counters()
        return {key: counters[key] for key in names if key in counters}

    def list_text(self, family: Family) -> str | None:
        """The table in nft's syntax, close to what ``nft list table`` prints."""
        table = self.tables.get(family)
        if table is None:
            return None
        lines = [f"table {family} {TABLE} {{"]
        if table.comment:
            lines.append(f"\t{comment(table.comment)}")
        for name, decl in table.sets.items():
            lines.append(f"\t{decl.kind} {name} {{")
            lines.extend(f"\t\t{line}" for line in decl.body)
            members = table.elements.get(name, {})
            if members:
                lines.append("\t\telements = { " + ",\n\t\t\t     ".join(e.render() for e in members.values()) + " }")
            lines.append("\t}")
        for name, note in table.counters.items():
            lines.append(f"\tcounter {name} {{" + (f" {comment(note)}" if note else "") + " }")
        for name, chain in table.chains.items():
            lines.append(f"\tchain {name} {{")
            if chain.comment:
                lines.append(f"\t\t{comment(chain.comment)}")
            if chain.base:
                lines.append(f"\t\t{chain.base}")
            held = Chain(name, tuple(self.rules[(family, name)].rules))
            lines.extend(f"\t\t{rule}" for rule in with_digest(held, family))
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def check_capabilities(self) -> None:
        """A fake can do everything."""

    def delete_tables(self) -> list[Family]:
        deleted: list[Family] = [family for family in ("ip", "ip6") if family in self.tables]
        self.apply(Transaction([Op("delete", "table", family) for family in deleted]))
        return deleted

    def chain_rules(self, family: Family, name: str) -> list[Rule]:
        """The rules of one chain, as the kernel holds them."""
        return list(self.rules[(family, name)].rules)

    def elements(self, family: Family, set_name: str) -> dict[str, Element]:
        return dict(self.tables[family].elements.get(set_name, {}))
