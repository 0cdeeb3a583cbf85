"""The statements of kproxy's rules, as typed values, and their nft text. Pure.

A rule is a tuple of statements; the compiler builds them, and so does the
skeleton's parser (``kproxy.rules.skeleton``) from ``rules/kproxy.nft``.
Two renderers take them, and nothing else reads rules:

* ``render_rule`` writes nft text, for ``--dry-run``, golden files, digests and humans;
* ``kproxy.nft.expressions`` writes netlink expressions, for the kernel.

Only what kproxy writes is here: each class is one statement shape, and
``render`` writes it exactly as nft itself prints it back.

Values inside statements come from validated model values (canonical
addresses, ports, names that are DNS labels), so rendering never escapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Family = Literal["ip", "ip6"]
Protocol = Literal["tcp", "udp", "sctp"]

PROTOCOL_NUMBERS: dict[str, int] = {"tcp": 6, "udp": 17, "sctp": 132}

# -- what a statement reads (a key is a concatenation of these) ------------------------------------

PacketField = Literal["saddr", "daddr", "l4proto", "dport", "mark", "original-daddr", "original-saddr", "original-dport",
                      "direction"]
"""``ip saddr``/``ip daddr`` (per family), ``meta l4proto``, ``th dport``, ``meta mark``, ``ct original ip daddr``,
``ct original ip saddr``, ``ct original proto-dst`` and ``ct direction`` (the conntrack fields: every packet of a
connection, in both directions, reads the same original tuple)."""


@dataclass(frozen=True, slots=True)
class Numgen:
    """``numgen random mod MODULUS offset OFFSET`` (offset 0 is not written)."""

    modulus: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Const:
    """A literal in a dynamic set's key: an address, a protocol number or a port."""

    value: str
    kind: Literal["addr", "proto", "port"]


KeyPart = PacketField | Numgen | Const
Key = tuple[KeyPart, ...]


def render_part(part: KeyPart, family: Family) -> str:
    if isinstance(part, Numgen):
        return f"numgen random mod {part.modulus}" + (f" offset {part.offset}" if part.offset else "")
    if isinstance(part, Const):
        return part.value
    return _FIELDS[part].format(family=family)


_FIELDS: dict[str, str] = {
    "saddr": "{family} saddr",
    "daddr": "{family} daddr",
    "l4proto": "meta l4proto",
    "dport": "th dport",
    "mark": "meta mark",
    "original-daddr": "ct original {family} daddr",
    "original-saddr": "ct original {family} saddr",
    "original-dport": "ct original proto-dst",
    "direction": "ct direction",
}


@functools.lru_cache(maxsize=1 << 12)
def render_key(key: Key, family: Family) -> str:
    return " . ".join(render_part(part, family) for part in key)


# -- statements ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counter:
    """``counter name "NAME"``: a named counter object."""

    name: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """``accept``, ``drop``, ``return``, ``jump CHAIN`` or ``goto CHAIN``."""

    kind: Literal["accept", "drop", "return", "jump", "goto"]
    chain: str = ""


@dataclass(frozen=True, slots=True)
class MatchProtocol:
    """``meta l4proto tcp``."""

    protocol: Protocol


@dataclass(frozen=True, slots=True)
class NumgenIs:
    """``numgen random mod MODULUS 0``: true with probability 1/MODULUS."""

    modulus: int


@dataclass(frozen=True, slots=True)
class FromLocal:
    """``fib saddr type local``: the packet comes from this node."""


@dataclass(frozen=True, slots=True)
class NewConnection:
    """``ct state new``."""


@dataclass(frozen=True, slots=True)
class Translated:
    """``ct status dnat``: the connection's destination was translated."""


@dataclass(frozen=True, slots=True)
class MatchPrefix:
    """``ip saddr 10.244.0.0/16``: a source inside a CIDR."""

    field: PacketField
    cidr: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """``KEY @SET`` (``KEY != @SET`` when negated)."""

    key: Key
    set: str
    negate: bool = False


@dataclass(frozen=True, slots=True)
class VerdictMap:
    """``KEY vmap @MAP``: the verdict the map holds for the key, if any."""

    key: Key
    map: str


@dataclass(frozen=True, slots=True)
class MarkXor:
    """``meta mark set meta mark ^ 0xVALUE`` (an endpoint id, for affinity; the masquerade bit)."""

    value: int
    digits: int = 8
    """Hex digits written (an endpoint id is written with all 8)."""


@dataclass(frozen=True, slots=True)
class MarkOr:
    """``meta mark set meta mark | 0xVALUE``."""

    value: int


@dataclass(frozen=True, slots=True)
class MarkClear:
    """``meta mark & 0xMASK == 0``: none of the mask's bits is set."""

    mask: int


@dataclass(frozen=True, slots=True)
class Limit:
    """``limit rate over RATE/UNIT burst BURST packets`` (nft's default burst, 5, when None), or with ``bytes``:
    ``limit rate over RATE bytes/UNIT burst BURST bytes`` (RATE and BURST in bytes, written in the largest of
    bytes, kbytes, mbytes that divides them, as nft prints them; no burst when None)."""

    rate: int
    unit: Literal["second", "minute"]
    burst: int | None = None
    bytes: bool = False


@dataclass(frozen=True, slots=True)
class SetUpdate:
    """``update @SET { KEY timeout Ns }`` or ``update @SET { KEY limit rate over ... }``: a dynamic set;
    with ``connections``, ``add @SET { KEY ct count over N }`` (true when the key's conntrack list, this
    connection included, holds more than N connections)."""

    set: str
    key: Key
    timeout: int | None = None
    limit: Limit | None = None
    connections: int | None = None


@dataclass(frozen=True, slots=True)
class DnatTo:
    """``dnat to ADDRESS:PORT`` (after a ``meta l4proto`` match, as nft requires)."""

    address: str
    port: int


@dataclass(frozen=True, slots=True)
class DnatFromMap:
    """``dnat ip to KEY map @MAP``: to the ``address . port`` the map holds for the key."""

    key: Key
    map: str


@dataclass(frozen=True, slots=True)
class Masquerade:
    """``masquerade fully-random``."""


@dataclass(frozen=True, slots=True)
class Reject:
    """``reject``: ICMP port unreachable."""


Statement = (Counter | Verdict | MatchProtocol | NumgenIs | FromLocal | NewConnection | Translated | MatchPrefix
             | Lookup | VerdictMap | MarkXor | MarkOr | MarkClear | SetUpdate | DnatTo | DnatFromMap | Masquerade
             | Reject)
Rule = tuple[Statement, ...]

TERMINAL = (Verdict, VerdictMap, DnatTo, DnatFromMap, Masquerade, Reject)
"""Statements that may end a packet's path through a rule."""


_BYTE_UNITS = ((1024 * 1024, "mbytes"), (1024, "kbytes"), (1, "bytes"))


def render_bytes(amount: int) -> str:
    """An amount of bytes as nft prints it: in the largest unit that divides it."""
    for size, name in _BYTE_UNITS:
        if amount % size == 0:
            return f"{amount // size} {name}"
    raise AssertionError("unreachable")


def render_limit(limit: Limit) -> str:
    if limit.bytes:
        burst = f" burst {render_bytes(limit.burst)}" if limit.burst else ""
        return f"limit rate over {render_bytes(limit.rate)}/{limit.unit}{burst}"
    burst = f" burst {limit.burst} packets" if limit.burst else ""
    return f"limit rate over {limit.rate}/{limit.unit}{burst}"


def _render_update(s: SetUpdate, family: Family) -> str:
    if s.connections is not None:
        return f"add @{s.set} {{ {render_key(s.key, family)} ct count over {s.connections} }}"
    what = render_limit(s.limit) if s.limit is not None else f"timeout {s.timeout}s"
    return f"update @{s.set} {{ {render_key(s.key, family)} {what} }}"


def _render_dnat(s: DnatTo, family: Family) -> str:
    return f"dnat to [{s.address}]:{s.port}" if ":" in s.address else f"dnat to {s.address}:{s.port}"


# One writer per statement class (a dict lookup: rendering runs for every rule of a cold start's digests).
_WRITERS: dict[type, Callable[[Any, Family], str]] = {
    Counter: lambda s, f: f'counter name "{s.name}"',
    Verdict: lambda s, f: f"{s.kind} {s.chain}" if s.chain else s.kind,
    MatchProtocol: lambda s, f: f"meta l4proto {s.protocol}",
    NumgenIs: lambda s, f: f"numgen random mod {s.modulus} 0",
    FromLocal: lambda s, f: "fib saddr type local",
    NewConnection: lambda s, f: "ct state new",
    Translated: lambda s, f: "ct status dnat",
    MatchPrefix: lambda s, f: f"{render_part(s.field, f)} {s.cidr}",
    Lookup: lambda s, f: f"{render_key(s.key, f)} {'!= ' if s.negate else ''}@{s.set}",
    VerdictMap: lambda s, f: f"{render_key(s.key, f)} vmap @{s.map}",
    MarkXor: lambda s, f: f"meta mark set meta mark ^ 0x{s.value:0{s.digits}x}",
    MarkOr: lambda s, f: f"meta mark set meta mark | 0x{s.value:x}",
    MarkClear: lambda s, f: f"meta mark & 0x{s.mask:x} == 0",
    SetUpdate: _render_update,
    DnatTo: _render_dnat,
    DnatFromMap: lambda s, f: f"dnat {f} to {render_key(s.key, f)} map @{s.map}",
    Masquerade: lambda s, f: "masquerade fully-random",
    Reject: lambda s, f: "reject",
}


def render_statement(statement: Statement, family: Family) -> str:
    """One statement as nft writes it."""
    writer = _WRITERS.get(type(statement))
    if writer is None:
        raise TypeError(f"not a statement: {statement!r}")
    return writer(statement, family)


def render_rule(rule: Rule, family: Family) -> str:
    """A rule as nft text."""
    writers = _WRITERS
    return " ".join([writers[type(statement)](statement, family) for statement in rule])


def chains_it_reaches(rule: Rule) -> list[str]:
    """The chains a rule jumps or goes to."""
    return [s.chain for s in rule if isinstance(s, Verdict) and s.chain]


def sets_it_reads(rule: Rule) -> list[str]:
    """The sets and maps a rule reads or updates."""
    found = []
    for s in rule:
        if isinstance(s, (Lookup, SetUpdate)):
            found.append(s.set)
        elif isinstance(s, VerdictMap):
            found.append(s.map)
        elif isinstance(s, DnatFromMap):
            found.append(s.map)
    return found


def counters_it_uses(rule: Rule) -> list[str]:
    return [s.name for s in rule if isinstance(s, Counter)]
