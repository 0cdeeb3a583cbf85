"""The desired table of one family, assembled from per-Service parts and kept up to date.

A sync that changes one Service must not rebuild a table of 100k elements. The
assembly keeps each Service's compiled contribution, and for every element key
the Services that contribute it (the first in key order wins, as in a full
compile). Replacing one Service's contribution returns exactly the chains and
element keys that may have changed, so the planner only looks at those. Pure.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from kproxy.compiler import ServiceRules
from kproxy.model import ServiceKey
from kproxy.ruleset import Chain, Element, Family, Table

BASE = ServiceKey("")
"""The owner of the skeleton's own chains and of node/config elements; sorts first."""


@dataclass(slots=True)
class Touched:
    """What a change may have altered: chain names and (set, key) pairs."""

    chains: set[str] = field(default_factory=set)
    elements: set[tuple[str, str]] = field(default_factory=set)
    counters: set[str] = field(default_factory=set)

    def update(self, other: "Touched") -> None:
        self.chains |= other.chains
        self.elements |= other.elements
        self.counters |= other.counters

    def __bool__(self) -> bool:
        return bool(self.chains or self.elements or self.counters)


class Assembly:
    """One family's desired table; ``table`` is always current."""

    def __init__(self, base: Table) -> None:
        self.family: Family = base.family
        self.table = Table(family=base.family, comment=base.comment, sets=dict(base.sets))
        self._parts: dict[ServiceKey, ServiceRules] = {}
        self._owners: dict[tuple[str, str], list[tuple[ServiceKey, Element]]] = {}
        self.set_base(base)

    def set_base(self, base: Table) -> Touched:
        """Replace the skeleton part (chains, node and config elements)."""
        rules = ServiceRules(
            tuple(base.chains.values()),
            tuple((name, e) for name, members in base.elements.items() for e in members.values()),
        )
        self.table.comment = base.comment
        self.table.sets = dict(base.sets)
        return self.set_service(BASE, rules)

    def set_service(self, key: ServiceKey, rules: ServiceRules | None) -> Touched:
        """Replace one Service's contribution (None removes it)."""
        touched = Touched()
        old = self._parts.pop(key, None)
        if old is not None:
            for chain in old.chains:
                self.table.chains.pop(chain.name, None)
                touched.chains.add(chain.name)
            for name, _ in old.counters:
                self.table.counters.pop(name, None)
                touched.counters.add(name)
            for set_name, element in old.elements:
                self._disown(key, set_name, element)
                touched.elements.add((set_name, element.key))
        if rules is not None:
            self._parts[key] = rules
            for chain in rules.chains:
                self.table.chains[chain.name] = chain
                touched.chains.add(chain.name)
            for name, counter_comment in rules.counters:
                self.table.counters[name] = counter_comment
                touched.counters.add(name)
            for set_name, element in rules.elements:
                self._own(key, set_name, element)
                touched.elements.add((set_name, element.key))
        return touched

    def _own(self, key: ServiceKey, set_name: str, element: Element) -> None:
        owners = self._owners.setdefault((set_name, element.key), [])
        if not owners:  # the common case: nobody else contributes this key
            owners.append((key, element))
            self.table.elements.setdefault(set_name, {})[element.key] = element
            return
        if any(owner == key for owner, _ in owners):
            return  # a Service contributing one key twice: its first element counts
        bisect.insort(owners, (key, element), key=lambda item: item[0])
        self.table.elements.setdefault(set_name, {})[element.key] = owners[0][1]

    def _disown(self, key: ServiceKey, set_name: str, element: Element) -> None:
        owners = self._owners.get((set_name, element.key))
        if not owners:
            return
        owners[:] = [item for item in owners if item[0] != key]
        members = self.table.elements.setdefault(set_name, {})
        if owners:
            members[element.key] = owners[0][1]
        else:
            del self._owners[(set_name, element.key)]
            members.pop(element.key, None)

    def services(self) -> set[ServiceKey]:
        return {k for k in self._parts if k != BASE}

    def chain(self, name: str) -> Chain | None:
        return self.table.chains.get(name)
