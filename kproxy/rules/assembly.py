"""The desired table of one family, assembled from per-Service parts and kept up to date.

A sync that changes one Service must not rebuild a table of 100k elements. The
assembly keeps each Service's compiled contribution, and for every element key
the Services that contribute it (the first in key order wins, as in a full
compile). Replacing one Service's contribution returns exactly the chains and
element keys that may have changed, so the planner only looks at those. Pure.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.cluster.model import ServiceKey
from kproxy.nft.objects import Chain, Element, Family, ServiceRules, Table

BASE = ServiceKey("")
"""The owner of the skeleton's own chains and of node/config elements; sorts first."""


@dataclass(slots=True)
class Touched:
    """What a change may have altered: chain names and (set, key) pairs."""

    chains: set[str] = field(default_factory=set)
    elements: set[tuple[str, str]] = field(default_factory=set)
    counters: set[str] = field(default_factory=set)

    def update(self, other: Touched) -> None:
        self.chains |= other.chains
        self.elements |= other.elements
        self.counters |= other.counters

    def discard(self, other: Touched) -> None:
        """Leave out what ``other`` holds."""
        self.chains -= other.chains
        self.elements -= other.elements
        self.counters -= other.counters

    def __bool__(self) -> bool:
        return bool(self.chains or self.elements or self.counters)


class Assembly:
    """One family's desired table; ``table`` is always current."""

    def __init__(self, base: Table) -> None:
        self.family: Family = base.family
        self.table = Table(family=base.family, comment=base.comment, sets=dict(base.sets))
        self._parts: dict[ServiceKey, ServiceRules] = {}
        self._owner: dict[str, dict[str, ServiceKey]] = {}
        """set name -> element key -> the one Service contributing it (most keys have one)."""
        self._contested: dict[tuple[str, str], list[tuple[ServiceKey, Element]]] = {}
        """(set, key) -> every contributor in key order, for keys that several Services contribute."""
        self._chain_users: dict[str, int] = {}
        """chain -> how many contributions have it (the pick chains are shared)."""
        self._frontends: dict[str, dict[tuple[int, ServiceKey], tuple[tuple[str, Element], ...]]] = {}
        """frontend -> the elements (endpoint slots, firewall) each Service gives it (see ``_set_slots``)."""
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

    def set_service(self, key: ServiceKey, rules: ServiceRules | None, track: bool = True) -> Touched:
        """Replace one Service's contribution (None removes it).

        Returns what may have changed, unless ``track`` is false (building a
        whole table, where nobody asks: 140k elements at 10k Services).
        """
        touched = Touched()
        old = self._parts.pop(key, None)
        if old is not None:
            for chain in old.chains:
                users = self._chain_users.get(chain.name, 1) - 1
                if users > 0:
                    self._chain_users[chain.name] = users
                    continue  # a shared pick chain other Services still use
                self._chain_users.pop(chain.name, None)
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
            chains = self.table.chains
            for chain in rules.chains:
                self._chain_users[chain.name] = self._chain_users.get(chain.name, 0) + 1
                existing = chains.get(chain.name)
                if existing is not chain and existing != chain:  # shared pick chains are the same object
                    chains[chain.name] = chain
                    touched.chains.add(chain.name)
            for name, counter_comment in rules.counters:
                self.table.counters[name] = counter_comment
                touched.counters.add(name)
            self._own_all(key, rules.elements)
            if track:
                touched.elements.update([(set_name, element.key) for set_name, element in rules.elements])
        self._set_slots(key, old, rules, touched, track)
        return touched

    def _set_slots(self, key: ServiceKey, old: ServiceRules | None, new: ServiceRules | None, touched: Touched,
                   track: bool) -> None:
        """Endpoint slots are owned per frontend, by the Service dispatch reaches: lowest rank, then key order."""
        before = {frontend: rank for frontend, rank, _ in old.slots} if old is not None else {}
        after = {frontend: (rank, items) for frontend, rank, items in new.slots} if new is not None else {}
        all_frontends = self._frontends
        elements = self.table.elements
        for frontend in [*after, *(f for f in before if f not in after)]:  # in order: the table's is deterministic
            contenders = all_frontends.get(frontend)
            shown: tuple[tuple[str, Element], ...]
            now: tuple[tuple[str, Element], ...]
            set_name: str
            element: Element
            if contenders is None and frontend in after:  # a frontend no Service had (the common case): its own
                rank, items = after[frontend]
                all_frontends[frontend] = {(rank, key): items}
                shown, now = (), items
            else:
                contenders = all_frontends.setdefault(frontend, {})
                shown = contenders[min(contenders)] if contenders else ()
                if frontend in before:
                    contenders.pop((before[frontend], key), None)
                if frontend in after:
                    rank, items = after[frontend]
                    contenders[(rank, key)] = items
                now = contenders[min(contenders)] if contenders else ()
                if not contenders:
                    del all_frontends[frontend]
                if now is shown:
                    continue  # another Service owns this frontend, before and after
                for set_name, element in shown:
                    elements.get(set_name, {}).pop(element.key, None)
            current_set = None
            members: dict[str, Element] = {}
            for set_name, element in now:
                if set_name != current_set:
                    current_set = set_name
                    members = elements.get(set_name) or elements.setdefault(set_name, {})
                members[element.key] = element
            if track:
                touched.elements.update([(set_name, element.key) for set_name, element in (*shown, *now)])

    def _own_all(self, key: ServiceKey, elements: Iterable[tuple[str, Element]]) -> None:
        """``_own`` for each element; a key no set holds yet (the common case) is added in place."""
        table, owner_maps = self.table.elements, self._owner
        members: dict[str, Element] | None = None
        owners: dict[str, ServiceKey] = {}
        current_set = None
        for set_name, element in elements:
            if set_name != current_set:  # a Service's elements come in runs of one set
                current_set = set_name
                members = table.get(set_name)
                if members is None:
                    members = table[set_name] = {}
                owners = owner_maps.get(set_name) or owner_maps.setdefault(set_name, {})
            assert members is not None
            element_key = element.key
            if element_key in members or element_key in owners:  # someone's already, or contested: see _own
                self._own(key, set_name, element)
            else:
                owners[element_key] = key
                members[element_key] = element

    def _own(self, key: ServiceKey, set_name: str, element: Element) -> None:
        members = self.table.elements.get(set_name)
        if members is None:
            members = self.table.elements[set_name] = {}
        contested = self._contested.get((set_name, element.key))
        if contested is not None:
            if any(owner == key for owner, _ in contested):
                return  # a Service contributing one key twice: its first element counts
            bisect.insort(contested, (key, element), key=lambda item: item[0])
            members[element.key] = contested[0][1]
            return
        owners = self._owner.setdefault(set_name, {})
        current = owners.get(element.key)
        if current is None:  # the common case: nobody else contributes this key
            owners[element.key] = key
            members[element.key] = element
        elif current != key:
            both = sorted([(current, members[element.key]), (key, element)], key=lambda item: item[0])
            self._contested[(set_name, element.key)] = both
            del owners[element.key]
            members[element.key] = both[0][1]

    def _disown(self, key: ServiceKey, set_name: str, element: Element) -> None:
        members = self.table.elements.setdefault(set_name, {})
        contested = self._contested.get((set_name, element.key))
        if contested is None:
            owners = self._owner.get(set_name, {})
            if owners.get(element.key) == key:
                del owners[element.key]
                members.pop(element.key, None)
            return
        contested[:] = [item for item in contested if item[0] != key]
        members[element.key] = contested[0][1]
        if len(contested) == 1:
            del self._contested[(set_name, element.key)]
            self._owner.setdefault(set_name, {})[element.key] = contested[0][0]

    def services(self) -> set[ServiceKey]:
        return {k for k in self._parts if k != BASE}

    def element_owner(self, set_name: str, key: str) -> ServiceKey | None:
        """The Service whose element the table holds for (set, key), if any."""
        return self._element_owners([(set_name, key)]).get((set_name, key))

    def _element_owners(self, wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], ServiceKey]:
        """The owners of these (set, key) pairs that the table holds.

        A frontend's elements (endpoint slots, firewall) are not indexed one by
        one: a full build adds 130k of them at 10k Services, and only blame
        asks who owns one. They are found by a walk of the frontends.
        """
        found: dict[tuple[str, str], ServiceKey] = {}
        unowned: set[tuple[str, str]] = set()
        for set_name, key in wanted:
            owner = self._contributor(set_name, key)
            if owner is not None:
                found[(set_name, key)] = owner
            else:
                unowned.add((set_name, key))
        if unowned:
            for contenders in self._frontends.values():
                rank_and_owner = min(contenders)
                for set_name, element in contenders[rank_and_owner]:
                    if (set_name, element.key) in unowned:
                        found[(set_name, element.key)] = rank_and_owner[1]
        return found

    def _contributor(self, set_name: str, key: str) -> ServiceKey | None:
        """The Service whose element of ``Service.elements`` the table holds for (set, key)."""
        contested = self._contested.get((set_name, key))
        return contested[0][0] if contested else self._owner.get(set_name, {}).get(key)

    def owners(self, chains: Iterable[str] = (), elements: Iterable[tuple[str, str]] = (),
               counters: Iterable[str] = ()) -> set[ServiceKey]:
        """The Services that decide these objects (for blaming a refused command). Shared chains have no owner."""
        found = set(self._element_owners(elements).values())
        chains, counters = set(chains), set(counters)
        if chains or counters:
            for key, rules in self._parts.items():
                if any(c.name in chains and self._chain_users.get(c.name) == 1 for c in rules.chains) or any(
                        name in counters for name, _ in rules.counters):
                    found.add(key)
        found.discard(BASE)
        return found

    def owned(self, key: ServiceKey) -> Touched:
        """What ``key`` alone decides now: its own chains and counters, the elements it wins, its frontends' elements.

        Shared chains (the pick chains) and elements another Service wins are left out:
        they are someone else's to send.
        """
        rules = self._parts.get(key)
        owned = Touched()
        if rules is None:
            return owned
        owned.chains = {chain.name for chain in rules.chains if self._chain_users.get(chain.name) == 1}
        owned.counters = {name for name, _ in rules.counters}
        owned.elements = {(s, e.key) for s, e in rules.elements if self._contributor(s, e.key) == key}
        for frontend, rank, items in rules.slots:
            contenders = self._frontends.get(frontend)
            if contenders and min(contenders) == (rank, key):
                owned.elements.update((s, e.key) for s, e in items)
        return owned

    def part(self, key: ServiceKey) -> ServiceRules | None:
        """What ``key`` contributes now (None if nothing)."""
        return self._parts.get(key)

    def names_of(self, key: ServiceKey) -> Touched:
        """The chains, element keys and counters ``key``'s contribution holds (shared ones included)."""
        rules = self._parts.get(key)
        if rules is None:
            return Touched()
        return Touched(
            chains={chain.name for chain in rules.chains},
            elements={(set_name, element.key) for set_name, element in rules.elements}
            | {(set_name, element.key) for _, _, items in rules.slots for set_name, element in items},
            counters={name for name, _ in rules.counters},
        )

    def chain(self, name: str) -> Chain | None:
        return self.table.chains.get(name)
