"""Loads ``rules/kproxy.nft``, the static part of kproxy's tables.

The skeleton is a readable nft file written once for a generic family. This
module reads it (from the installed package, or from the source tree), parses
its rules into typed statements (``parse_rule``: the one place kproxy reads
rule text, and only this hand-written file's), and turns it into ``ruleset``
values for one family and one set of options, which the compiler then fills
in. The file is read once per process; after that
everything here is pure.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from kproxy.nft.objects import Chain, Family, SetDecl, Table
from kproxy.nft.statements import (
    FromLocal,
    Lookup,
    MarkClear,
    MarkOr,
    MarkXor,
    Masquerade,
    MatchProtocol,
    NewConnection,
    Reject,
    Rule,
    Statement,
    Translated,
    Verdict,
    VerdictMap,
)

ADDR_TYPES: dict[Family, str] = {"ip": "ipv4_addr", "ip6": "ipv6_addr"}
_CONDITION = re.compile(r"\s+#\s*if\s+([a-z-]+)\s*$")
_COMMENT = re.compile(r'^comment "([^"]*)"$')


class SkeletonError(ValueError):
    """The skeleton file does not have the shape this parser expects."""


@functools.cache
def skeleton_text() -> str:
    """The skeleton as shipped: inside the wheel, or in the source tree."""
    packaged = resources.files("kproxy").joinpath("rules/kproxy.nft")
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "rules" / "kproxy.nft").read_text()


@functools.cache
def _parse(text: str) -> tuple[str, tuple[SetDecl, ...], tuple[tuple[Chain, tuple[str | None, ...]], ...]]:
    """Parse the generic skeleton: (table comment, sets, chains with rule conditions)."""
    table_comment = ""
    sets: list[SetDecl] = []
    chains: list[tuple[Chain, tuple[str | None, ...]]] = []
    block: list[str] | None = None
    header: tuple[str, str] | None = None
    in_table = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_table:
            if line != "table @FAMILY@ kproxy {":
                raise SkeletonError(f"line {number}: expected the table header, got {line!r}")
            in_table = True
            continue
        if header is None:
            match = re.match(r"^(set|map|chain) ([a-z0-9-]+) \{$", line)
            if match:
                header, block = (match.group(1), match.group(2)), []
            elif _COMMENT.match(line):
                table_comment = _COMMENT.match(line).group(1)  # type: ignore[union-attr]
            elif line == "}":
                in_table = False
            else:
                raise SkeletonError(f"line {number}: unexpected {line!r}")
            continue
        assert block is not None
        if line != "}":
            block.append(line)
            continue
        kind, name = header
        if kind in ("set", "map"):
            sets.append(SetDecl(kind, name, tuple(block)))  # type: ignore[arg-type]
        else:
            base, chain_comment, rules, conditions = "", "", [], []
            for item in block:
                comment_match = _COMMENT.match(item)
                if item.startswith("type "):
                    base = item
                elif comment_match:
                    chain_comment = comment_match.group(1)
                else:
                    condition = _CONDITION.search(item)
                    rules.append(parse_rule(item[: condition.start()] if condition else item))
                    conditions.append(condition.group(1) if condition else None)
            chains.append((Chain(name, tuple(rules), chain_comment, base), tuple(conditions)))
        header, block = None, None
    if header is not None or in_table:
        raise SkeletonError("unterminated block at end of skeleton")
    return table_comment, tuple(sets), tuple(chains)


_FIELD_WORDS: dict[tuple[str, ...], str] = {
    ("@FAMILY@", "saddr"): "saddr",
    ("@FAMILY@", "daddr"): "daddr",
    ("meta", "l4proto"): "l4proto",
    ("th", "dport"): "dport",
    ("meta", "mark"): "mark",
    ("ct", "original", "@FAMILY@", "daddr"): "original-daddr",
}
_VERDICTS = ("accept", "drop", "return")


def parse_rule(text: str) -> Rule:
    """A skeleton rule (``@FAMILY@`` not yet replaced) as typed statements.

    The skeleton is written by hand, in the small vocabulary of its rules:
    keys of packet fields joined by ``.`` and looked up (``@set``, ``!= @set``,
    ``vmap @map``), ``ct state new``, ``ct status dnat``, ``fib saddr type
    local``, the mark operations, ``reject``, ``masquerade fully-random`` and
    verdicts. Anything else is a SkeletonError.
    """
    words = text.split()
    statements: list[Statement] = []
    i = 0

    def field_at(j: int) -> tuple[str, int] | None:
        for spelled, name in _FIELD_WORDS.items():
            if tuple(words[j:j + len(spelled)]) == spelled:
                return name, j + len(spelled)
        return None

    while i < len(words):
        word, rest = words[i], words[i + 1:]
        if words[i:i + 3] == ["ct", "state", "new"]:
            statements.append(NewConnection())
            i += 3
        elif words[i:i + 3] == ["ct", "status", "dnat"]:
            statements.append(Translated())
            i += 3
        elif words[i:i + 4] == ["fib", "saddr", "type", "local"]:
            statements.append(FromLocal())
            i += 4
        elif words[i:i + 6] == ["meta", "mark", "set", "meta", "mark", "|"] and len(words) > i + 6:
            statements.append(MarkOr(int(words[i + 6], 16)))
            i += 7
        elif words[i:i + 6] == ["meta", "mark", "set", "meta", "mark", "^"] and len(words) > i + 6:
            statements.append(MarkXor(int(words[i + 6], 16), len(words[i + 6]) - 2))
            i += 7
        elif words[i:i + 3] == ["meta", "mark", "&"] and words[i + 4:i + 6] == ["==", "0"]:
            statements.append(MarkClear(int(words[i + 3], 16)))
            i += 6
        elif words[i:i + 2] == ["meta", "l4proto"] and rest[1:2] and rest[1] in ("tcp", "udp", "sctp"):
            statements.append(MatchProtocol(rest[1]))  # type: ignore[arg-type]
            i += 3
        elif word == "reject":
            statements.append(Reject())
            i += 1
        elif words[i:i + 2] == ["masquerade", "fully-random"]:
            statements.append(Masquerade())
            i += 2
        elif word in _VERDICTS:
            statements.append(Verdict(word))  # type: ignore[arg-type]
            i += 1
        elif word in ("jump", "goto") and rest:
            statements.append(Verdict(word, rest[0]))  # type: ignore[arg-type]
            i += 2
        elif (found := field_at(i)) is not None:
            key = [found[0]]
            i = found[1]
            while i < len(words) and words[i] == "." and (more := field_at(i + 1)) is not None:
                key.append(more[0])
                i = more[1]
            op = words[i] if i < len(words) else ""
            if op.startswith("@"):
                statements.append(Lookup(tuple(key), op[1:]))  # type: ignore[arg-type]
                i += 1
            elif op == "!=" and words[i + 1:i + 2] and words[i + 1].startswith("@"):
                statements.append(Lookup(tuple(key), words[i + 1][1:], negate=True))  # type: ignore[arg-type]
                i += 2
            elif op == "vmap" and words[i + 1:i + 2] and words[i + 1].startswith("@"):
                statements.append(VerdictMap(tuple(key), words[i + 1][1:]))  # type: ignore[arg-type]
                i += 2
            else:
                raise SkeletonError(f"rule {text!r}: a key without a lookup at {' '.join(words[i:i + 3])!r}")
        else:
            raise SkeletonError(f"rule {text!r}: unexpected {' '.join(words[i:i + 3])!r}")
    return tuple(statements)


def _for_family(line: str, family: Family) -> str:
    return line.replace("@FAMILY@", family).replace("@ADDR@", ADDR_TYPES[family])


@functools.cache
def _skeleton(text: str, family: Family, options: frozenset[str]) -> tuple[str, dict[str, SetDecl], dict[str, Chain]]:
    table_comment, sets, chains = _parse(text)
    set_decls = {s.name: SetDecl(s.kind, s.name, tuple(_for_family(b, family) for b in s.body)) for s in sets}
    chain_map: dict[str, Chain] = {}
    for chain, conditions in chains:
        rules = tuple(
            rule for rule, condition in zip(chain.rules, conditions, strict=True) if condition is None or condition in options
        )
        chain_map[chain.name] = Chain(chain.name, rules, chain.comment, _for_family(chain.base, family))
    return table_comment, set_decls, chain_map


def skeleton_table(family: Family, options: frozenset[str] = frozenset(), text: str | None = None) -> Table:
    """A new Table holding the skeleton for ``family``; options switch '# if' rules on."""
    table_comment, sets, chains = _skeleton(text if text is not None else skeleton_text(), family, options)
    return Table(family=family, comment=table_comment, sets=dict(sets), chains=dict(chains))


def option_names(text: str | None = None) -> frozenset[str]:
    """Every option a '# if' in the skeleton mentions."""
    _, _, chains = _parse(text if text is not None else skeleton_text())
    return frozenset(c for _, conditions in chains for c in conditions if c)
