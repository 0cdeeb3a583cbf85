"""Plain values for an nftables ruleset: tables, sets, maps, chains, elements.

A ``Ruleset`` is what the compiler returns and what the planner compares. Rule
bodies are nft text. ``comment()`` is the one way a comment string enters that
text, and it refuses any character outside a small safe alphabet, so no value
can ever close the string and inject syntax. Comments are built from validated
names and addresses, and ``fit_comment`` shortens the long ones (a 63-character
namespace and a 63-character name) to nft's 128 characters, so every legal
name compiles.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Literal

Family = Literal["ip", "ip6"]
TABLE = "kproxy"

COMMENT_MAX = 128
"""nft refuses a comment longer than this (NFTNL_UDATA_COMMENT_MAXLEN)."""
_SAFE_COMMENT = re.compile(r"[A-Za-z0-9 ./:_,()>+=-]{0,128}")


class UnsafeText(ValueError):
    """A value that would not be safe inside nft text."""


def comment(text: str) -> str:
    """``comment "<text>"`` for a rule, chain, set or element."""
    if not _SAFE_COMMENT.fullmatch(text):
        raise UnsafeText(f"refusing unsafe comment text {text!r}")
    return f'comment "{text}"'


def fit_comment(text: str) -> str:
    """``text`` if it fits nft's 128 characters, else its start, ``...`` and a stable 8-character hash of the whole.

    The hash keeps two long names that share a start apart.
    """
    if len(text) <= COMMENT_MAX:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8].upper()
    return f"{text[: COMMENT_MAX - 11]}...{digest}"


@dataclass(frozen=True, slots=True)
class SetDecl:
    """A named set or map of the skeleton."""

    kind: Literal["set", "map"]
    name: str
    body: tuple[str, ...]
    """Declaration lines: type, flags, size, timeout, comment."""

    @property
    def dynamic(self) -> bool:
        """Filled by the datapath (affinity, meters): never flushed or diffed."""
        return any(line.startswith("flags") and "dynamic" in line for line in self.body)

    @property
    def interval(self) -> bool:
        """Holds ranges or prefixes."""
        return any(line.startswith("flags") and "interval" in line for line in self.body)

    @property
    def type_line(self) -> str | None:
        """The ``type ...`` or ``typeof ...`` line of the declaration."""
        return next((line for line in self.body if line.startswith(("type ", "typeof "))), None)


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[str, ...]
    comment: str = ""
    base: str = ""
    """For a base chain: ``type nat hook prerouting priority dstnat; policy accept;``."""
    fingerprint: tuple[str, int] | None = None
    """(rules digest, rule count) of a chain read back from the kernel, whose
    ``rules`` are not kept; None for a compiled chain."""


@dataclass(frozen=True, slots=True)
class Element:
    key: str
    value: str = ""
    """A map element's value; empty for a set element."""
    comment: str = ""

    def render(self) -> str:
        text = self.key
        if self.comment:
            text += " " + comment(self.comment)
        if self.value:
            text += " : " + self.value
        return text


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """What one Service contributes to one family's table."""

    chains: tuple[Chain, ...]
    elements: tuple[tuple[str, Element], ...]
    """(set or map name, element)."""
    counters: tuple[tuple[str, str], ...] = ()
    """Named counters: (name, comment). ``conns-`` counts a port's new connections, ``drops-`` its rate-limit drops."""
    slots: tuple[tuple[str, int, tuple[tuple[str, Element], ...]], ...] = ()
    """Endpoint slots by frontend: (frontend, rank, ((``endpoints-C`` map, element), ...)). A
    frontend's slots belong together: they come into a table all from the one Service that
    dispatch reaches for that frontend (lowest rank, then first in key order), or not at all
    (see ``assembly.Assembly``)."""


@dataclass(slots=True)
class Table:
    """One family's table. Chains and elements are keyed by name for the planner."""

    family: Family
    comment: str = ""
    sets: dict[str, SetDecl] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    elements: dict[str, dict[str, Element]] = field(default_factory=dict)
    """set or map name -> element key -> element."""
    counters: dict[str, str] = field(default_factory=dict)
    """Named counter objects: name -> comment (``namespace/name:port``)."""

    @property
    def name(self) -> str:
        return TABLE

    def add_element(self, set_name: str, element: Element) -> bool:
        """Add an element unless its key is already there (first one wins)."""
        members = self.elements.setdefault(set_name, {})
        if element.key in members:
            return False
        members[element.key] = element
        return True

    def element_count(self) -> int:
        return sum(len(v) for v in self.elements.values())

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains.values())


@dataclass(slots=True)
class Ruleset:
    """Both families' tables, in the order they are written (ip, then ip6)."""

    tables: dict[Family, Table] = field(default_factory=dict)

    def table(self, family: Family) -> Table:
        return self.tables[family]
