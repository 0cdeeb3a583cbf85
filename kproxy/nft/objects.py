"""Plain values for an nftables ruleset: tables, sets, maps, chains, elements.

A ``Ruleset`` is what the compiler returns and what the planner compares. Rules
are typed statements (``kproxy.nft.statements``), rendered to text for scripts
and digests and to netlink for the kernel. ``comment()`` is the one way a comment string enters that
text, and it refuses any character outside a small safe alphabet, so no value
can ever close the string and inject syntax. Comments are built from validated
names and addresses, and ``fit_comment`` shortens the long ones (a 63-character
namespace and a 63-character name) to nft's 128 characters, so every legal
name compiles.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from kproxy.fastinit import quick_init
from kproxy.nft.statements import Family as Family  # re-exported: the family of a table
from kproxy.nft.statements import Rule, render_rule

TABLE = "kproxy"

COMMENT_MAX = 128
"""nft refuses a comment longer than this (NFTNL_UDATA_COMMENT_MAXLEN)."""
_SAFE_COMMENT = re.compile(r"[A-Za-z0-9 ./:_,()>+=-]{0,128}")


class UnsafeText(ValueError):
    """A value that would not be safe inside nft text."""


@functools.lru_cache(maxsize=1 << 14)
def comment(text: str) -> str:
    """``comment "<text>"`` for a rule, chain, set or element (the elements of one Service port share theirs)."""
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


@quick_init
@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]
    """Typed rules (``kproxy.nft.statements``): rendered as text or netlink, never parsed back."""
    comment: str = ""
    base: str = ""
    """For a base chain: ``type nat hook prerouting priority dstnat; policy accept;``."""
    fingerprint: tuple[str, int] | None = None
    """(rules digest, rule count) of a chain read back from the kernel, whose
    ``rules`` are not kept; None for a compiled chain."""


@quick_init
@dataclass(frozen=True, slots=True)
class Element:
    key: str
    value: str = ""
    """A map element's value; empty for a set element."""
    comment: str = ""

    def render(self) -> str:
        if self.comment:
            text = f"{self.key} {comment(self.comment)}"
            return f"{text} : {self.value}" if self.value else text
        return f"{self.key} : {self.value}" if self.value else self.key


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


# --- transactions: what is sent to the kernel -------------------------------------------------

DIGEST_PREFIX = "kproxy-rules="
RULE_FORMATS = ((" map @endpoints-", "pick rules v2"),)
"""Rules whose text is sent to the kernel differently than an older kproxy sent it: (a marker in
the rule, a version). A chain with such a rule has the version in its digest, so that the chains
an older kproxy wrote are rewritten once ("pick rules v2": the pick rules are sent over netlink,
for every protocol; nft 1.0.6 had made the first one of each batch TCP-only)."""


def rules_digest(texts: Iterable[str]) -> str:
    """A short digest of a chain's rule text (and of the ``RULE_FORMATS`` its rules use)."""
    texts = tuple(texts)
    versions = [version for marker, version in RULE_FORMATS if any(marker in text for text in texts)]
    data = "\n".join((*versions, *texts)).encode()
    return hashlib.sha256(data).hexdigest()[:12].upper()


def rule_texts(chain: Chain, family: Family) -> list[str]:
    """A chain's rules as nft text."""
    return [render_rule(rule, family) for rule in chain.rules]


def chain_fingerprint(chain: Chain, family: Family) -> tuple[str, int]:
    """(digest, number of rules); read-back chains carry it precomputed.

    An empty chain has no last rule to carry a digest: it is ("", 0), as it reads back.
    """
    if chain.fingerprint is not None:
        return chain.fingerprint
    if not chain.rules:
        return "", 0
    return _digest(chain.rules, family), len(chain.rules)


@functools.lru_cache(maxsize=1 << 15)
def _digest(rules: tuple[Rule, ...], family: Family) -> str:
    """Shared chains (the pick chains) and unchanged ones come back often: each is rendered once."""
    return rules_digest(render_rule(rule, family) for rule in rules)


Verb = Literal["add", "flush", "delete"]
Kind = Literal["table", "set", "map", "chain", "element", "counter", "rules"]


@quick_init
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
    """add chain: the declaration (its rules come in an ``add rules`` op)."""
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
        if self.kind == "rules":
            lines = [f"table {where} {{"]
            for chain in self.chains:
                lines.append(f"\tchain {chain.name} {{")
                lines.extend(f"\t\t{rule}" for rule in with_digest(chain, self.family))
                lines.append("\t}")
            lines.append("}")
            return "\n".join(lines)
        if self.kind == "element":
            items = (e.render() for e in self.elements) if self.verb == "add" else (e.key for e in self.elements)
            return f"{self.verb} element {where} {self.name} {{ {', '.join(items)} }}"
        if self.kind == "counter" and self.verb == "add":
            if self.comment:
                return f"add counter {where} {self.name} {{ {comment(self.comment)}; }}"
            return f"add counter {where} {self.name}"
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

    def extend(self, other: Transaction) -> None:
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


def digest_comment(chain: Chain, family: Family) -> str:
    return comment(DIGEST_PREFIX + chain_fingerprint(chain, family)[0])


def with_digest(chain: Chain, family: Family) -> list[str]:
    """The chain's rules as text, the last one carrying the digest comment."""
    texts = rule_texts(chain, family)
    if texts:
        digest = chain.fingerprint[0] if chain.fingerprint is not None else rules_digest(texts)  # rendered once
        texts[-1] = f"{texts[-1]} {comment(DIGEST_PREFIX + digest)}"
    return texts
