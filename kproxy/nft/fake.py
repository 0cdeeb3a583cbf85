"""An in-memory backend that applies transactions all-or-nothing, like the kernel.

For fast unit tests of anything that talks to ``Backend``. It keeps the tables
in memory, applies a transaction to a copy, checks what the kernel would check
(objects exist before they are used, a chain still referenced cannot be
deleted, a map key cannot silently change its value, every ``goto``/``jump``
target and ``@set`` exists), and only then swaps the copy in. Root tests run
the same transactions against the real kernel, which keeps this honest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

from kproxy.nft.backend import NftError
from kproxy.nft.objects import Chain, Element, Family, Op, Ruleset, Table, Transaction, chain_fingerprint
from kproxy.nft.statements import Rule, chains_it_reaches, counters_it_uses, render_rule, sets_it_reads


@dataclass(slots=True)
class ChainRules:
    """What the kernel holds in one chain: its rules, and the digest the last of them carries."""

    rules: list[Rule] = field(default_factory=list)
    digest: str = ""


class FakeBackend:
    """kproxy's tables, in memory."""

    def __init__(self) -> None:
        self.tables: dict[Family, Table] = {}
        self.rules: dict[tuple[Family, str], ChainRules] = {}
        self.transactions: list[Transaction] = []
        """Every transaction that was committed, in order."""
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
            for name, chain in table.chains.items():
                held = self.rules.get((family, name), ChainRules())
                copy_.chains[name] = Chain(name, (), fingerprint=(held.digest, len(held.rules)))
            ruleset.tables[family] = copy_
        return ruleset

    def delete_tables(self) -> list[Family]:
        deleted = [family for family in ("ip", "ip6") if family in self.tables]
        self.apply(Transaction([Op("delete", "table", family) for family in deleted]))  # type: ignore[arg-type]
        return deleted  # type: ignore[return-value]

    def chain_rules(self, family: Family, name: str) -> list[Rule]:
        """The rules of one chain, as the kernel holds them."""
        return list(self.rules[(family, name)].rules)

    def elements(self, family: Family, set_name: str) -> dict[str, Element]:
        return dict(self.tables[family].elements.get(set_name, {}))
