"""A packet tracer over kproxy's typed ruleset: where the first packet of a new connection goes. Pure.

What it is for: flow tests without root. Given a ``Ruleset`` that holds its
rules (a compiled one, or the fake backend's tables with their rules), a packet
and the node's own addresses, it walks the base chains the packet crosses, hook
by hook and in priority order, as the kernel does, and interprets every
statement of kproxy's rules. It returns the
exact distribution of outcomes, as ``Fraction`` probabilities that sum to 1:
whether the packet is accepted, dropped or rejected, where it was DNATed to,
and whether it was masqueraded, with the chains each outcome went through.

The walk, per origin (``rules/README.md`` has the packet path):

* ``forwarded`` (arriving on an interface): prerouting; then the routing
  decision on the (translated) destination: a node address goes to input,
  anything else to forward and postrouting;
* ``local`` (sent by the node itself): output, postrouting; a destination on
  this node then comes back through loopback: prerouting and input, where
  the nat chains do not run again (the kernel sets up a connection's NAT once
  per direction: destination at prerouting/output, source at postrouting/input).

So a forwarded packet DNATed to an address of this node (a host-network
endpoint) never crosses postrouting and is not masqueraded, whatever its mark
says: the kernel's behaviour, and upstream's.

Hooks and priorities are read from the base chains' declarations, never from
their names. Only the first packet of a connection is traced, so ``ct state
new`` always holds, the dynamic sets (affinity, rate-limit meters) are empty
(lookups miss, updates change nothing, ``limit rate over`` does not match),
and counters do nothing. ``numgen`` branches exactly: every value it can draw
is followed with its probability, and branches that end alike are merged.

Anything this module does not understand (a statement, a set type, an
element, a hook, a chain read back without its rules) is a ``TraceError``:
it never guesses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Literal

from kproxy.nft.objects import Chain, Element, Ruleset, SetDecl, Table
from kproxy.nft.statements import (
    PROTOCOL_NUMBERS,
    TERMINAL,
    Const,
    Counter,
    DnatFromMap,
    DnatTo,
    Family,
    FromLocal,
    Key,
    KeyPart,
    Lookup,
    MarkClear,
    MarkOr,
    MarkXor,
    Masquerade,
    MatchPrefix,
    MatchProtocol,
    NewConnection,
    Numgen,
    NumgenIs,
    PacketField,
    Protocol,
    Reject,
    Rule,
    SetUpdate,
    Statement,
    Translated,
    Verdict,
    VerdictMap,
)

Origin = Literal["forwarded", "local"]
"""``forwarded``: the packet arrives on an interface (a pod, an outside client); ``local``: the node sends it."""
FinalVerdict = Literal["accepted", "dropped", "rejected"]
Target = tuple[str, int]
"""A DNAT target: (address, port)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_DEPTH = 16
"""Nested jumps and gotos a branch may take (the kernel's jump stack holds 16)."""
MARK_BITS = 0xFFFFFFFF


class TraceError(ValueError):
    """The ruleset holds something the tracer does not understand, or the input is malformed."""


# --- what goes in ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a new connection."""

    source: str
    destination: str
    port: int
    """The destination port."""
    protocol: Protocol = "tcp"
    origin: Origin = "forwarded"
    mark: int = 0
    """The packet mark it starts with."""

    def __post_init__(self) -> None:
        source, destination = _address(self.source, "source"), _address(self.destination, "destination")
        if source.version != destination.version:
            raise TraceError(f"source {self.source} and destination {self.destination} are of different families")
        if self.protocol not in PROTOCOL_NUMBERS:
            raise TraceError(f"unknown protocol {self.protocol!r}")
        if not 0 <= self.port <= 0xFFFF:
            raise TraceError(f"port {self.port} out of range")
        if self.origin not in ("forwarded", "local"):
            raise TraceError(f"unknown origin {self.origin!r}")
        if not 0 <= self.mark <= MARK_BITS:
            raise TraceError(f"mark {self.mark:#x} out of range")

    @property
    def family(self) -> Family:
        return "ip6" if _address(self.destination, "destination").version == 6 else "ip"

    def __str__(self) -> str:
        return f"{self.protocol} {self.source} -> {_host_port(self.destination, self.port)} ({self.origin})"


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the ruleset cannot know about the node: its own addresses.

    They decide ``fib saddr type local`` and the routing decision (a
    destination on the node goes to input, any other is forwarded).
    Loopback addresses are always the node's.
    """

    addresses: tuple[str, ...]
    _parsed: frozenset[IPAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parsed", frozenset(_address(a, "node address") for a in self.addresses))

    def owns(self, address: IPAddress) -> bool:
        return address.is_loopback or address in self._parsed


# --- what comes out -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a connection ends on this node."""

    verdict: FinalVerdict
    target: Target | None = None
    """Where it was DNATed to, if it was."""
    masqueraded: bool = False

    def __str__(self) -> str:
        text: str = self.verdict
        if self.target is not None:
            text += f" -> {_host_port(*self.target)}"
        return text + (", masqueraded" if self.masqueraded else "")

    def sort_key(self) -> tuple[str, bool, str, int, bool]:
        address, port = self.target if self.target is not None else ("", 0)
        return self.verdict, self.target is not None, address, port, self.masqueraded


@dataclass(frozen=True, slots=True)
class Branch:
    """One way the packet goes: its outcome, its probability and the chains it went through, in order."""

    outcome: Outcome
    probability: Fraction
    chains: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Trace:
    """Every way the packet can go; the probabilities sum to 1."""

    packet: Packet
    branches: tuple[Branch, ...]
    """Merged by (outcome, chains), most likely first."""

    @property
    def outcomes(self) -> dict[Outcome, Fraction]:
        """The distribution of outcomes (branches that end alike merged)."""
        merged: dict[Outcome, Fraction] = {}
        for branch in self.branches:
            merged[branch.outcome] = merged.get(branch.outcome, Fraction(0)) + branch.probability
        return dict(sorted(merged.items(), key=lambda item: item[0].sort_key()))

    @property
    def targets(self) -> dict[Target | None, Fraction]:
        """The distribution of DNAT targets (None: not translated), whatever the verdict."""
        merged: dict[Target | None, Fraction] = {}
        for branch in self.branches:
            merged[branch.outcome.target] = merged.get(branch.outcome.target, Fraction(0)) + branch.probability
        return merged

    @property
    def only(self) -> Outcome:
        """The outcome, when there is exactly one (a ``TraceError`` otherwise)."""
        outcomes = self.outcomes
        if len(outcomes) != 1:
            raise TraceError(f"{len(outcomes)} outcomes, not one:\n{self}")
        return next(iter(outcomes))

    def chains_to(self, outcome: Outcome) -> list[tuple[str, ...]]:
        """The chain paths that lead to ``outcome``."""
        return [branch.chains for branch in self.branches if branch.outcome == outcome]

    def __str__(self) -> str:
        lines = [str(self.packet)]
        lines += [f"  {b.probability}: {b.outcome}  via {' > '.join(b.chains)}" for b in self.branches]
        return "\n".join(lines)


def trace_packet(ruleset: Ruleset, packet: Packet, node: NodeFacts) -> Trace:
    """Where ``packet`` goes through ``ruleset`` on ``node``."""
    return PacketTracer(ruleset, node).trace(packet)


# --- the table, read for tracing ------------------------------------------------------------------

Kind = Literal["addr", "proto", "port", "mark", "integer"]
Span = tuple[int, int]
"""A key part as an inclusive range of integers (a single value: low == high)."""

_TYPE_KINDS: dict[str, Kind] = {
    "ipv4_addr": "addr", "ipv6_addr": "addr", "inet_proto": "proto", "inet_service": "port", "mark": "mark",
    "integer": "integer", "ct_dir": "integer",
}
_TYPEOF_KINDS: tuple[tuple[re.Pattern[str], Kind], ...] = (
    (re.compile(r"(?:ct original )?(?:ip|ip6) [sd]addr"), "addr"),
    (re.compile(r"meta l4proto"), "proto"),
    (re.compile(r"(?:th|tcp|udp|sctp) dport"), "port"),
    (re.compile(r"meta mark"), "mark"),
    (re.compile(r"numgen random mod \d+(?: offset \d+)?"), "integer"),
)
_FIELD_KINDS: dict[str, Kind] = {
    "saddr": "addr", "daddr": "addr", "original-daddr": "addr", "original-saddr": "addr", "l4proto": "proto",
    "dport": "port", "original-dport": "port", "mark": "mark", "direction": "integer",
}
_ADDRESS_FIELDS = ("saddr", "daddr", "original-daddr", "original-saddr")


@dataclass(frozen=True, slots=True)
class _Shape:
    """A set's or map's declaration, as the tracer needs it."""

    name: str
    is_map: bool
    key: tuple[Kind, ...]
    data: tuple[Kind, ...] | Literal["verdict"] | None
    interval: bool
    dynamic: bool


def _shape(decl: SetDecl) -> _Shape:
    line = decl.type_line
    if line is None:
        raise TraceError(f"set {decl.name} declares no type")
    word, _, spec = line.partition(" ")
    key_text, _, data_text = (part.strip() for part in spec.partition(" : "))
    kind_of = _kind_of_type if word == "type" else _kind_of_typeof
    key = tuple(kind_of(part, decl.name) for part in key_text.split(" . "))
    data: tuple[Kind, ...] | Literal["verdict"] | None
    if decl.kind == "set":
        if data_text:
            raise TraceError(f"set {decl.name} declares data: {line!r}")
        data = None
    elif data_text == "verdict":
        data = "verdict"
    elif data_text:
        data = tuple(kind_of(part, decl.name) for part in data_text.split(" . "))
    else:
        raise TraceError(f"map {decl.name} declares no data: {line!r}")
    return _Shape(decl.name, decl.kind == "map", key, data, decl.interval, decl.dynamic)


def _kind_of_type(token: str, set_name: str) -> Kind:
    kind = _TYPE_KINDS.get(token)
    if kind is None:
        raise TraceError(f"set {set_name}: unknown type {token!r}")
    return kind


def _kind_of_typeof(expr: str, set_name: str) -> Kind:
    for pattern, kind in _TYPEOF_KINDS:
        if pattern.fullmatch(expr):
            return kind
    raise TraceError(f"set {set_name}: unknown typeof expression {expr!r}")


@dataclass(slots=True)
class _Members:
    """A set's elements, indexed by their parsed keys."""

    shape: _Shape
    exact: dict[tuple[int, ...], Element]
    """Sets without intervals: the key's values."""
    ranges: list[tuple[tuple[Span, ...], Element]]
    """Interval sets: each part's range."""

    def find(self, values: tuple[int, ...]) -> Element | None:
        if not self.shape.interval:
            return self.exact.get(values)
        for spans, element in self.ranges:
            if all(low <= value <= high for value, (low, high) in zip(values, spans, strict=True)):
                return element
        return None


def _members(shape: _Shape, elements: Mapping[str, Element], family: Family) -> _Members:
    members = _Members(shape, {}, [])
    if shape.dynamic:
        return members  # state of the datapath: empty for a first connection
    for element in elements.values():
        parts = element.key.split(" . ")
        if len(parts) != len(shape.key):
            raise TraceError(f"{shape.name}: element {element.key!r} does not have {len(shape.key)} parts")
        spans = tuple(_span(part, kind, family, shape) for part, kind in zip(parts, shape.key, strict=True))
        if shape.interval:
            members.ranges.append((spans, element))
            continue
        if any(low != high for low, high in spans):
            raise TraceError(f"{shape.name}: element {element.key!r} holds a range, and the set has no interval flag")
        members.exact[tuple(low for low, _ in spans)] = element
    return members


def _span(text: str, kind: Kind, family: Family, shape: _Shape) -> Span:
    try:
        if kind == "addr":
            if "/" in text:
                network = ipaddress.ip_network(text)
                _check_family(network.version, family, shape.name, text)
                return int(network.network_address), int(network.broadcast_address)
            low_text, _, high_text = text.partition("-")
            low = _address(low_text, shape.name)
            high = _address(high_text, shape.name) if high_text else low
            _check_family(low.version, family, shape.name, text)
            _check_family(high.version, family, shape.name, text)
            return int(low), int(high)
        low_text, _, high_text = text.partition("-")
        low_value = _scalar(low_text, kind)
        return low_value, (_scalar(high_text, kind) if high_text else low_value)
    except ValueError as exc:
        if isinstance(exc, TraceError):
            raise
        raise TraceError(f"{shape.name}: cannot read {text!r} as {kind}: {exc}") from None


def _scalar(text: str, kind: Kind) -> int:
    if kind == "proto":
        return PROTOCOL_NUMBERS[text] if text in PROTOCOL_NUMBERS else int(text)
    value = int(text, 0)
    if value < 0 or (kind == "port" and value > 0xFFFF) or value > MARK_BITS:
        raise ValueError(f"{value} out of range")
    return value


def _check_family(version: int, family: Family, where: str, text: str) -> None:
    if (version == 6) != (family == "ip6"):
        raise TraceError(f"{where}: {text!r} is not an address of family {family}")


def _parse_verdict(text: str, map_name: str) -> Verdict:
    word, _, chain = text.partition(" ")
    if word in ("accept", "drop", "return") and not chain:
        return Verdict(word)  # type: ignore[arg-type]
    if word in ("jump", "goto") and chain and " " not in chain:
        return Verdict(word, chain)  # type: ignore[arg-type]
    raise TraceError(f"{map_name}: unknown verdict {text!r}")


def _parse_target(text: str, shape: _Shape, family: Family) -> Target:
    parts = text.split(" . ")
    if shape.data != ("addr", "port") or len(parts) != 2:
        raise TraceError(f"{shape.name}: DNAT data {text!r} is not an address . port")
    address = _address(parts[0], shape.name)
    _check_family(address.version, family, shape.name, text)
    try:
        port = _scalar(parts[1], "port")
    except ValueError:
        raise TraceError(f"{shape.name}: DNAT data {text!r} has no valid port") from None
    return str(address), port


# --- base chains ----------------------------------------------------------------------------------

Hook = Literal["prerouting", "input", "forward", "output", "postrouting"]
_HOOKS: tuple[Hook, ...] = ("prerouting", "input", "forward", "output", "postrouting")
_PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
"""nft's named priorities for the ip and ip6 families."""
_BASE = re.compile(
    r"type (?P<type>\w+) hook (?P<hook>\w+) priority (?P<priority>[^;]+);(?: policy (?P<policy>\w+);)?"
)
_PRIORITY = re.compile(r"(?P<base>-?\d+|[a-z]+)(?:\s*(?P<sign>[+-])\s*(?P<offset>\d+))?")
_DNAT_HOOKS = ("prerouting", "output")
"""The hooks where a connection's destination NAT is set up (its source NAT: postrouting and input)."""


@dataclass(frozen=True, slots=True)
class _BaseChain:
    name: str
    type: Literal["filter", "nat"]
    hook: Hook
    priority: int
    policy: Literal["accept", "drop"]

    @property
    def manip(self) -> Literal["dst", "src"]:
        return "dst" if self.hook in _DNAT_HOOKS else "src"


def _base_chain(chain: Chain) -> _BaseChain:
    match = _BASE.fullmatch(chain.base.strip())
    if match is None:
        raise TraceError(f"chain {chain.name}: cannot read its declaration {chain.base!r}")
    kind, hook, policy = match["type"], match["hook"], match["policy"] or "accept"
    if kind not in ("filter", "nat"):
        raise TraceError(f"chain {chain.name}: chain type {kind!r} is not traced")
    if hook not in _HOOKS:
        raise TraceError(f"chain {chain.name}: hook {hook!r} is not traced")
    if policy not in ("accept", "drop"):
        raise TraceError(f"chain {chain.name}: unknown policy {policy!r}")
    return _BaseChain(chain.name, kind, hook, _priority(match["priority"].strip(), chain.name), policy)  # type: ignore[arg-type]


def _priority(text: str, chain_name: str) -> int:
    match = _PRIORITY.fullmatch(text)
    if match is None:
        raise TraceError(f"chain {chain_name}: cannot read priority {text!r}")
    base = match["base"]
    if base.lstrip("-").isdigit():
        value = int(base)
    elif base in _PRIORITY_NAMES:
        value = _PRIORITY_NAMES[base]
    else:
        raise TraceError(f"chain {chain_name}: unknown priority name {base!r}")
    if match["offset"]:
        value += int(match["offset"]) * (-1 if match["sign"] == "-" else 1)
    return value


# --- the walk -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Flight:
    """The packet in flight: what the rules read and what they changed so far."""

    source: IPAddress
    destination: IPAddress
    port: int
    original_destination: IPAddress
    original_port: int
    mark: int
    target: Target | None = None
    masqueraded: bool = False
    nat_done: frozenset[str] = frozenset()
    """The NAT manipulations already set up for the connection ("dst", "src")."""
    chains: tuple[str, ...] = ()


Flow = Literal["break", "return", "accept", "drop", "reject"]
"""How a statement ends a rule: ``break`` goes on with the next rule (no match, a miss, a jump that returned)."""
ChainEnd = Literal["end", "accept", "drop", "reject"]
"""How a chain ends: ``end`` is its last rule or a ``return``, back to the caller."""
Weighted = dict[_Flight, Fraction]
Ways = list[tuple[_Flight, Fraction, Flow | None]]
"""The ways a statement can go: (the packet after it, probability, None to go on with the rule or how the rule ends)."""
Endings = list[tuple[_Flight, Fraction, ChainEnd]]


class PacketTracer:
    """Traces packets through one ruleset on one node; the sets are indexed once, on first use."""

    def __init__(self, ruleset: Ruleset, node: NodeFacts) -> None:
        self.ruleset = ruleset
        self.node = node
        self._members: dict[tuple[Family, str], _Members] = {}
        self._bases: dict[Family, dict[Hook, list[_BaseChain]]] = {}
        self._checked: set[Family] = set()

    def trace(self, packet: Packet) -> Trace:
        """Every way ``packet`` can go, with its probability."""
        return _Walk(self, packet).run()

    def table(self, family: Family) -> Table:
        table = self.ruleset.tables.get(family)
        if table is None:
            raise TraceError(f"the ruleset has no {family} table")
        if family not in self._checked:
            hollow = sorted(c.name for c in table.chains.values() if c.fingerprint and c.fingerprint[1] and not c.rules)
            if hollow:
                raise TraceError(f"{len(hollow)} chain(s) read back without their rules ({hollow[0]}, ...): "
                                 "trace a compiled ruleset, or one that holds the rules")
            self._checked.add(family)
        return table

    def base_chains(self, family: Family, hook: Hook) -> list[_BaseChain]:
        """The table's base chains on ``hook``, in the order the kernel runs them (priority, then name)."""
        if family not in self._bases:
            by_hook: dict[Hook, list[_BaseChain]] = {h: [] for h in _HOOKS}
            for chain in self.table(family).chains.values():
                if chain.base:
                    base = _base_chain(chain)
                    by_hook[base.hook].append(base)
            for chains in by_hook.values():
                chains.sort(key=lambda b: (b.priority, b.name))
            self._bases[family] = by_hook
        return self._bases[family][hook]

    def members(self, family: Family, name: str) -> _Members:
        found = self._members.get((family, name))
        if found is None:
            table = self.table(family)
            decl = table.sets.get(name)
            if decl is None:
                raise TraceError(f"no set or map {name} in the {family} table")
            found = _members(_shape(decl), table.elements.get(name, {}), family)
            self._members[(family, name)] = found
        return found


class _Walk:
    """One packet's walk through the hooks."""

    def __init__(self, tracer: PacketTracer, packet: Packet) -> None:
        self.tracer = tracer
        self.packet = packet
        self.family: Family = packet.family
        self.table = tracer.table(self.family)
        self.protocol_number = PROTOCOL_NUMBERS[packet.protocol]

    def run(self) -> Trace:
        destination = _address(self.packet.destination, "destination")
        source = _address(self.packet.source, "source")
        start = _Flight(source, destination, self.packet.port, destination, self.packet.port, self.packet.mark)
        finished: list[tuple[_Flight, Fraction, FinalVerdict]] = []

        def through(hook: Hook, flights: Weighted) -> Weighted:
            alive, ended = self.hook(hook, flights)
            finished.extend(ended)
            return alive

        flights: Weighted = {start: Fraction(1)}
        if self.packet.origin == "forwarded":
            inbound, outbound = self.route(through("prerouting", flights))
            delivered = through("input", inbound)
            sent = through("postrouting", through("forward", outbound))
        else:
            inbound, sent = self.route(through("postrouting", through("output", flights)))
            delivered = through("input", through("prerouting", inbound))  # back through loopback
        for flight, probability in (*delivered.items(), *sent.items()):
            finished.append((flight, probability, "accepted"))
        return self.trace_of(finished)

    def trace_of(self, finished: list[tuple[_Flight, Fraction, FinalVerdict]]) -> Trace:
        merged: dict[tuple[Outcome, tuple[str, ...]], Fraction] = {}
        for flight, probability, verdict in finished:
            key = (Outcome(verdict, flight.target, flight.masqueraded), flight.chains)
            merged[key] = merged.get(key, Fraction(0)) + probability
        total = sum(merged.values(), Fraction(0))
        if total != 1:
            raise TraceError(f"internal error: the outcomes of {self.packet} sum to {total}")
        branches = [Branch(outcome, probability, chains) for (outcome, chains), probability in merged.items()]
        branches.sort(key=lambda b: (-b.probability, b.outcome.sort_key(), b.chains))
        return Trace(self.packet, tuple(branches))

    def route(self, flights: Weighted) -> tuple[Weighted, Weighted]:
        """The routing decision on the (translated) destination: (to this node, elsewhere)."""
        inbound = {f: p for f, p in flights.items() if self.tracer.node.owns(f.destination)}
        outbound = {f: p for f, p in flights.items() if f not in inbound}
        return inbound, outbound

    def hook(self, hook: Hook, flights: Weighted) -> tuple[Weighted, list[tuple[_Flight, Fraction, FinalVerdict]]]:
        """Run the base chains of one hook: (what goes on, what ended here)."""
        ended: list[tuple[_Flight, Fraction, FinalVerdict]] = []
        for base in self.tracer.base_chains(self.family, hook):
            alive: Weighted = {}
            for flight, probability in flights.items():
                if base.type == "nat":
                    if base.manip in flight.nat_done:
                        _accumulate(alive, flight, probability)  # NAT is set up once per connection
                        continue
                for after, weight, end in self.chain(base.name, flight, base, 0):
                    if base.type == "nat":
                        after = replace(after, nat_done=after.nat_done | {base.manip})
                    if end == "end":
                        end = base.policy
                    if end == "accept":
                        _accumulate(alive, after, probability * weight)
                    else:
                        ended.append((after, probability * weight, "dropped" if end == "drop" else "rejected"))
            flights = alive
        return flights, ended

    def chain(self, name: str, flight: _Flight, base: _BaseChain, depth: int) -> Endings:
        """Run one chain: how it can end, with the probability of each way."""
        if depth > MAX_DEPTH:
            raise TraceError(f"more than {MAX_DEPTH} nested jumps at chain {name}: a loop?")
        chain = self.table.chains.get(name)
        if chain is None:
            raise TraceError(f"no chain {name} in the {self.family} table")
        pending: Weighted = {replace(flight, chains=(*flight.chains, name)): Fraction(1)}
        ended: dict[tuple[_Flight, ChainEnd], Fraction] = {}
        for rule in chain.rules:
            following: Weighted = {}
            for current, probability in pending.items():
                for after, weight, flow in self.rule(rule, current, base, depth):
                    if flow == "break":
                        _accumulate(following, after, probability * weight)
                    else:
                        end: ChainEnd = "end" if flow == "return" else flow
                        ended[(after, end)] = ended.get((after, end), Fraction(0)) + probability * weight
            pending = following
            if not pending:
                break
        for current, probability in pending.items():
            ended[(current, "end")] = ended.get((current, "end"), Fraction(0)) + probability
        return [(f, p, end) for (f, end), p in ended.items()]

    def rule(self, rule: Rule, flight: _Flight, base: _BaseChain, depth: int) -> list[tuple[_Flight, Fraction, Flow]]:
        """Run one rule's statements in turn; a rule that runs to its end without a verdict goes on to the next rule."""
        if any(isinstance(statement, TERMINAL) for statement in rule[:-1]):
            raise TraceError(f"a statement after a verdict in rule {rule!r}")
        running: list[tuple[_Flight, Fraction]] = [(flight, Fraction(1))]
        ended: list[tuple[_Flight, Fraction, Flow]] = []
        for statement in rule:
            following: list[tuple[_Flight, Fraction]] = []
            for current, probability in running:
                for after, weight, flow in self.statement(statement, current, base, depth):
                    if flow is None:
                        following.append((after, probability * weight))
                    else:
                        ended.append((after, probability * weight, flow))
            running = following
        ended.extend((current, probability, "break") for current, probability in running)
        return ended

    def statement(self, s: Statement, flight: _Flight, base: _BaseChain, depth: int) -> Ways:
        """One statement: its effects, and whether the rule goes on (None) or ends (a Flow)."""
        one = Fraction(1)
        if isinstance(s, (Counter, NewConnection)):
            if isinstance(s, Counter) and s.name not in self.table.counters:
                raise TraceError(f"counter {s.name} is not declared in the {self.family} table")
            return [(flight, one, None)]
        if isinstance(s, Verdict):
            return self.verdict(s, flight, base, depth)
        if isinstance(s, MatchProtocol):
            return [(flight, one, _test(s.protocol == self.packet.protocol))]
        if isinstance(s, NumgenIs):
            return _numgen_is(s.modulus, flight)
        if isinstance(s, FromLocal):
            return [(flight, one, _test(self.tracer.node.owns(flight.source)))]
        if isinstance(s, Translated):
            return [(flight, one, _test(flight.target is not None))]
        if isinstance(s, MatchPrefix):
            return [(flight, one, _test(self.in_prefix(s, flight)))]
        if isinstance(s, Lookup):
            found = self.find(s.set, s.key, flight) is not None
            return [(flight, one, _test(found != s.negate))]
        if isinstance(s, VerdictMap):
            return self.verdict_map(s, flight, base, depth)
        if isinstance(s, MarkXor):
            return [(replace(flight, mark=(flight.mark ^ s.value) & MARK_BITS), one, None)]
        if isinstance(s, MarkOr):
            return [(replace(flight, mark=(flight.mark | s.value) & MARK_BITS), one, None)]
        if isinstance(s, MarkClear):
            return [(flight, one, _test(flight.mark & s.mask == 0))]
        if isinstance(s, SetUpdate):
            return [(flight, one, self.update(s, flight))]
        if isinstance(s, DnatTo):
            self.require_dnat(base, s)
            address = _address(s.address, "dnat")
            _check_family(address.version, self.family, "dnat", s.address)
            return [(self.translated(flight, (str(address), s.port)), one, "accept")]
        if isinstance(s, DnatFromMap):
            self.require_dnat(base, s)
            return self.dnat_from_map(s, flight)
        if isinstance(s, Masquerade):
            if base.type != "nat" or base.hook != "postrouting":
                raise TraceError(f"masquerade outside a nat postrouting chain (reached from {base.name})")
            return [(replace(flight, masqueraded=True), one, "accept")]
        if isinstance(s, Reject):
            if base.hook == "postrouting":
                raise TraceError(f"reject in a postrouting chain (reached from {base.name})")
            return [(flight, one, "reject")]
        raise TraceError(f"statement {s!r} is not understood")

    # -- statements that need more than a line ---------------------------------------------------

    def verdict(self, s: Verdict, flight: _Flight, base: _BaseChain, depth: int) -> Ways:
        if s.kind in ("accept", "drop", "return"):
            if s.chain:
                raise TraceError(f"verdict {s.kind} with a chain: {s!r}")
            return [(flight, Fraction(1), s.kind)]
        if s.kind not in ("jump", "goto") or not s.chain:
            raise TraceError(f"verdict {s!r} is not understood")
        results: Ways = []
        for after, weight, end in self.chain(s.chain, flight, base, depth + 1):
            if end == "end":  # back from the chain: a jump goes on after the rule, a goto leaves this chain too
                results.append((after, weight, "break" if s.kind == "jump" else "return"))
            else:
                results.append((after, weight, end))
        return results

    def verdict_map(self, s: VerdictMap, flight: _Flight, base: _BaseChain, depth: int) -> Ways:
        shape = self.tracer.members(self.family, s.map).shape
        if shape.data != "verdict":
            raise TraceError(f"vmap @{s.map}: not a verdict map")
        element = self.find(s.map, s.key, flight)
        if element is None:
            return [(flight, Fraction(1), "break")]
        return self.verdict(_parse_verdict(element.value, s.map), flight, base, depth)

    def update(self, s: SetUpdate, flight: _Flight) -> Flow | None:
        members = self.tracer.members(self.family, s.set)
        if not members.shape.dynamic:
            raise TraceError(f"update of @{s.set}, which is not a dynamic set")
        self.key_values(s.key, members.shape, flight)  # the key must fit the set
        if s.limit is not None or s.connections is not None:
            return "break"  # a first connection is under the limit: "limit rate over", "ct count over" do not match
        return None

    def dnat_from_map(self, s: DnatFromMap, flight: _Flight) -> Ways:
        """``dnat to KEY map @MAP``: every value a ``numgen`` in the key can draw, looked up; a miss ends the rule."""
        members = self.tracer.members(self.family, s.map)
        if not members.shape.is_map or members.shape.data != ("addr", "port"):
            raise TraceError(f"dnat map @{s.map}: its data is not an address . port")
        draws = [part for part in s.key if isinstance(part, Numgen)]
        if len(draws) > 1:
            raise TraceError(f"dnat map @{s.map}: more than one numgen in the key")
        self.check_key(s.key, members.shape)
        fixed = self.key_values(tuple(p for p in s.key if not isinstance(p, Numgen)), None, flight)
        if not draws:
            element = members.find(fixed)
            if element is None:
                return [(flight, Fraction(1), "break")]
            target = _parse_target(element.value, members.shape, self.family)
            return [(self.translated(flight, target), Fraction(1), "accept")]
        numgen = draws[0]
        if numgen.modulus < 1:
            raise TraceError(f"numgen with modulus {numgen.modulus}")
        at = s.key.index(numgen)
        hits: dict[Target, int] = {}
        for value in range(numgen.offset, numgen.offset + numgen.modulus):
            element = members.find((*fixed[:at], value, *fixed[at:]))
            if element is not None:
                target = _parse_target(element.value, members.shape, self.family)
                hits[target] = hits.get(target, 0) + 1
        results: Ways = [
            (self.translated(flight, target), Fraction(count, numgen.modulus), "accept")
            for target, count in hits.items()
        ]
        misses = numgen.modulus - sum(hits.values())
        if misses:
            results.append((flight, Fraction(misses, numgen.modulus), "break"))
        return results

    # -- helpers ----------------------------------------------------------------------------------

    def translated(self, flight: _Flight, target: Target) -> _Flight:
        return replace(flight, target=target, destination=_address(target[0], "dnat"), port=target[1])

    def require_dnat(self, base: _BaseChain, s: Statement) -> None:
        if base.type != "nat" or base.hook not in _DNAT_HOOKS:
            raise TraceError(f"{s!r} outside a nat prerouting or output chain (reached from {base.name})")

    def in_prefix(self, s: MatchPrefix, flight: _Flight) -> bool:
        if s.field not in _ADDRESS_FIELDS:
            raise TraceError(f"prefix match on {s.field}, which is not an address")
        try:
            network = ipaddress.ip_network(s.cidr)
        except ValueError as exc:
            raise TraceError(f"prefix match on {s.cidr!r}: {exc}") from None
        _check_family(network.version, self.family, "prefix match", s.cidr)
        return self.address_field(s.field, flight) in network

    def find(self, name: str, key: Key, flight: _Flight) -> Element | None:
        members = self.tracer.members(self.family, name)
        return members.find(self.key_values(key, members.shape, flight))

    def check_key(self, key: Key, shape: _Shape) -> None:
        kinds = tuple(_part_kind(part) for part in key)
        if kinds != shape.key:
            wanted = " . ".join(shape.key)
            raise TraceError(f"@{shape.name}: a key of {' . '.join(kinds)} does not fit the set's {wanted}")

    def key_values(self, key: Key, shape: _Shape | None, flight: _Flight) -> tuple[int, ...]:
        """The key's values for this packet (``shape``: the set it must fit, checked)."""
        if shape is not None:
            self.check_key(key, shape)
        values = []
        for part in key:
            if isinstance(part, Numgen):
                raise TraceError(f"numgen in a lookup key{f' of @{shape.name}' if shape else ''}: only dnat maps draw")
            if isinstance(part, Const):
                values.append(self.constant(part))
            else:
                values.append(self.field(part, flight))
        return tuple(values)

    def constant(self, part: Const) -> int:
        try:
            if part.kind == "addr":
                address = _address(part.value, "constant")
                _check_family(address.version, self.family, "constant", part.value)
                return int(address)
            return _scalar(part.value, part.kind)
        except (ValueError, KeyError):
            raise TraceError(f"constant {part!r} cannot be read") from None

    def field(self, name: PacketField, flight: _Flight) -> int:
        if name in _ADDRESS_FIELDS:
            return int(self.address_field(name, flight))
        if name == "l4proto":
            return self.protocol_number
        if name == "dport":
            return flight.port
        if name == "original-dport":
            return flight.original_port
        if name == "direction":
            return 0  # the first packet is in the original direction
        if name == "mark":
            return flight.mark
        raise TraceError(f"packet field {name!r} is not understood")

    def address_field(self, name: PacketField, flight: _Flight) -> IPAddress:
        if name == "saddr":
            return flight.source
        if name == "daddr":
            return flight.destination
        if name == "original-daddr":
            return flight.original_destination
        if name == "original-saddr":
            return _address(self.packet.source, "source")  # the client: only postrouting translates the source
        raise TraceError(f"packet field {name!r} is not an address")


def _part_kind(part: KeyPart) -> Kind:
    if isinstance(part, Numgen):
        return "integer"
    if isinstance(part, Const):
        return part.kind
    kind = _FIELD_KINDS.get(part)
    if kind is None:
        raise TraceError(f"packet field {part!r} is not understood")
    return kind


def _test(matches: bool) -> Flow | None:
    """A match: the rule goes on when it holds, and ends (on to the next rule) when it does not."""
    return None if matches else "break"


def _numgen_is(modulus: int, flight: _Flight) -> Ways:
    """``numgen random mod M 0``: holds with probability 1/M."""
    if modulus < 1:
        raise TraceError(f"numgen with modulus {modulus}")
    results: Ways = [(flight, Fraction(1, modulus), None)]
    if modulus > 1:
        results.append((flight, Fraction(modulus - 1, modulus), "break"))
    return results


def _accumulate(into: Weighted, flight: _Flight, probability: Fraction) -> None:
    into[flight] = into.get(flight, Fraction(0)) + probability


def _address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise TraceError(f"{what}: {text!r} is not an IP address") from None


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
