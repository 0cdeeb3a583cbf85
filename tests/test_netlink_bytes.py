"""kproxy's netlink encoder against the bytes nft itself sends, without root.

``kproxy.nft.netlink`` and ``kproxy.nft.expressions`` encode kproxy's commands
as nf_tables netlink messages themselves. ``tests/test_nfnetlink.py`` proves,
as root, that the kernel ends up with what nft makes of the same commands;
this module checks the bytes themselves, without root, against recordings
of what nft 1.0.6 sent for the same commands (``tests/data/netlink/``).

Regenerating the recordings (as root; nft, ``ip netns``)::

    python -m tests.harness.record_netlink

``tests/harness/record_netlink.py`` says which shapes are recorded and how
(``nft --debug=mnl`` in a network namespace of its own). Every fixture entry
holds the nft command as nft was given it, the kproxy command it is the text
of (a typed rule, an element, an object; JSON built from the typed values,
never from rule text), and nft's message: its type, and its payload after the
netlink header as hex (the nfgenmsg, then each attribute; expressions and
elements one per line). ``test_fixtures_are_what_nft_sends_today`` records
again (as root) and fails if anything changed, so the fixtures cannot rot.

What is compared, for each entry: the kproxy command is rebuilt from its
JSON, rendered as nft text (which must be the recorded command: the value is
the one nft was given) and encoded by ``kproxy.nft.netlink.encode``. Its one
message must have nft's message type and nfgenmsg (family, version,
resource id), and the same attributes: names as nft sent them, every rule
expression in order with its registers and values, elements' keys, data and
comments, chain, counter and table comments. The netlink header is not: the
dump shows only four of its flags, and kproxy asks for an ACK on a batch's
last message only (the root test shows the kernel takes the batches).

The comparison is byte for byte, after one normalization of both sides,
``canonical``, for what the kernel reads the same way (``EQUIVALENCES``):

* attribute order: nf_tables parses every attribute level into an array
  indexed by type (``nla_parse_nested``), so only the order of list members
  matters (expressions of a rule, elements of a message), and those all have
  one type (NFTA_LIST_ELEM): a stable sort by type at every level keeps them
  in order. The orders differ in four places: nft writes ``lookup`` as
  SREG (DREG) SET and kproxy as SET SREG (DREG); ``dynset`` as SREG_KEY OP
  (TIMEOUT) SET_NAME (EXPR) and kproxy as SET_NAME OP SREG_KEY (TIMEOUT or
  EXPR); ``fib`` as FLAGS RESULT DREG and kproxy as DREG RESULT FLAGS; a
  counter's declaration with its USERDATA before its DATA, kproxy after;
* set ids: nft also names a set by its transaction id (NFTA_LOOKUP_SET_ID,
  NFTA_DYNSET_SET_ID, NFTA_SET_ELEM_LIST_SET_ID), which the kernel uses only
  when no set has the name (``nft_set_lookup_global``); kproxy only sends to
  sets that exist (declared through libnftables first);
* defaults the kernel assumes when an attribute is absent: nft sends a
  table's flags 0 (``nf_tables_newtable``; on an existing table absent flags
  leave it alone, and kproxy never sets any) and a numgen offset 0
  (``nft_ng_random_init``); kproxy sends the bitwise operation BOOL (0) of ``ct
  state new`` and of a masked prefix, which nft leaves out
  (``nft_bitwise_init``; nft does send it for ``meta mark set ... ^ ...``);
* nft sends an empty NFTA_OBJ_DATA when it deletes a counter; the kernel
  reads only the table, name and type of a deleted object;
* the counter name of a ``counter name "..."`` statement (NFTA_OBJREF_IMM_NAME):
  libnftnl writes it without its terminating NUL, kproxy with; the kernel
  copies the name with ``nla_strscpy`` before looking it up (``nft_obj_lookup``),
  which takes either.

Nothing else may differ: any other difference fails the entry's test, and
``test_every_documented_equivalence_is_needed`` fails when one of these is no
longer needed (say, with a newer nft), so that this note cannot go stale.

"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kproxy.nft import expressions, statements
from kproxy.nft.netlink import encode, layout_of
from kproxy.nft.objects import Op, Transaction, with_digest
from kproxy.rules.skeleton import skeleton_table
from tests.harness import record_netlink
from tests.harness.record_netlink import Attr, Message, attributes, from_json, iter_entries, messages, op_from_json

DATA = Path(__file__).resolve().parent / "data" / "netlink"
ENTRIES: list[dict[str, Any]] = list(iter_entries(DATA))
MESSAGE_TYPES = {name: number for number, name in record_netlink.MESSAGE_NAMES.items()}


# -- what the kernel reads the same way ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """Attribute ``attr`` where ``where`` (a message, or an expression by name) is read the same with or without a change."""

    name: str
    where: tuple[str, ...]
    attr: int
    applies: Callable[[Attr], bool]
    strip_nul: bool = False
    """Strip a trailing NUL instead of dropping the attribute."""


def _zero(attr: Attr) -> bool:
    return attr.children is None and attr.payload == b"\0\0\0\0"


EQUIVALENCES = (
    Equivalence("table flags 0", ("NEWTABLE",), 2, _zero),
    Equivalence("set id", ("NEWSETELEM", "DELSETELEM"), 4, lambda attr: True),  # NFTA_SET_ELEM_LIST_SET_ID
    Equivalence("set id", ("lookup",), 4, lambda attr: True),  # NFTA_LOOKUP_SET_ID
    Equivalence("set id", ("dynset",), 2, lambda attr: True),  # NFTA_DYNSET_SET_ID
    Equivalence("numgen offset 0", ("numgen",), 4, _zero),  # NFTA_NG_OFFSET
    Equivalence("bitwise op BOOL", ("bitwise",), 6, _zero),  # NFTA_BITWISE_OP
    Equivalence("empty object data on delete", ("DELOBJ",), 4, lambda attr: attr.children == ()),  # NFTA_OBJ_DATA
    Equivalence("objref name NUL", ("objref",), 2, lambda attr: attr.payload.endswith(b"\0"), strip_nul=True),
)
ATTRIBUTE_ORDER = "attribute order"
_BY_PLACE = {(where, e.attr): e for e in EQUIVALENCES for where in e.where}

# Where a nested attribute's members are expressions (NFTA_LIST_ELEM of NFTA_RULE_EXPRESSIONS; NFTA_DYNSET_EXPR).
_LIST, _EXPRESSION = "list of expressions", "expression"
_INNER = {("NEWRULE", 4): _LIST, (_LIST, 1): _EXPRESSION, ("dynset", 7): _EXPRESSION}


def _normalized(attrs: tuple[Attr, ...], where: str, skip: str) -> tuple[Attr, ...]:
    """``attrs`` with ``EQUIVALENCES`` applied and sorted by type (stably), at every level, but for the one named ``skip``."""
    expression = ""
    if where == _EXPRESSION:
        expression = next((a.payload.rstrip(b"\0").decode() for a in attrs if a.type == 1 and a.children is None), "")
    out = []
    for attr in attrs:
        rule = _BY_PLACE.get((where, attr.type))
        if rule is not None and rule.name != skip and rule.applies(attr):
            if not rule.strip_nul:
                continue
            attr = dataclasses.replace(attr, payload=attr.payload[:-1])
        if attr.children is not None:
            inner = _INNER.get((where, attr.type), f"{where}/{attr.type}")
            if where == _EXPRESSION and attr.type == 2:  # NFTA_EXPR_DATA: the attributes of the expression named
                inner = expression
            attr = dataclasses.replace(attr, children=_normalized(attr.children, inner, skip))
        out.append(attr)
    return tuple(out) if skip == ATTRIBUTE_ORDER else tuple(sorted(out, key=lambda a: a.type))


def canonical(message: Message, skip: str = "") -> bytes:
    """The message's payload as the kernel reads it (see the module docstring), without the equivalence named ``skip``."""
    return message.payload[:4] + b"".join(attr.encode() for attr in _normalized(message.attributes, message.name, skip))


# -- the two sides -----------------------------------------------------------------------------------


def recorded(entry: dict[str, Any]) -> Message:
    """nft's message, from the fixture."""
    return Message(MESSAGE_TYPES[entry["message"]], 0, bytes.fromhex("".join(entry["payload"])))


def ours(op: Op) -> Message:
    """kproxy's message for the command (a fixture's command is one message)."""
    (message,) = messages(encode(Transaction([op])).data)
    return message


def nft_text(op: Op) -> str:
    """The command as kproxy writes it for nft: one rule (with its chain's digest comment), or ``Op.render``."""
    if op.kind == "rules":
        ((chain,),) = (op.chains,)
        (text,) = with_digest(chain, op.family)
        return f"add rule {op.family} kproxy {chain.name} {text}"
    return op.render()


def dump(attrs: tuple[Attr, ...], depth: int = 0) -> list[str]:
    """Attributes one per line, for a readable difference: type, flags, payload hex; expressions by name."""
    lines = []
    for attr in attrs:
        flags = ("N" if attr.children is not None else "") + ("B" if attr.flags & record_netlink.NLA_F_NET_BYTEORDER else "")
        if attr.children is None:
            lines.append(f"{'  ' * depth}{attr.type}{' ' + flags if flags else ''} {attr.payload.hex()}")
            continue
        names = [c.payload.rstrip(b"\0").decode(errors="replace") for c in attr.children if c.type == 1 and c.children is None]
        label = f" ({names[0]})" if len(attr.children) == 2 and names and names[0].isalpha() else ""
        lines.append(f"{'  ' * depth}{attr.type} {flags}{label}")
        lines.extend(dump(attr.children, depth + 1))
    return lines


def _difference(theirs: bytes, mine: bytes) -> str:
    return "\n".join(difflib.unified_diff(dump(attributes(theirs[4:])), dump(attributes(mine[4:])), "nft", "kproxy", lineterm=""))


# -- the comparison ----------------------------------------------------------------------------------


def _statements(value: Any) -> list[Any]:
    """Every statement and statement part (Numgen, Const, Limit) inside a typed value."""
    if dataclasses.is_dataclass(value):
        return [value, *(s for f in dataclasses.fields(value) for s in _statements(getattr(value, f.name)))]
    if isinstance(value, tuple):
        return [s for v in value for s in _statements(v)]
    return []


def _params() -> list[Any]:
    params = []
    for index, entry in enumerate(ENTRIES):
        params.append(pytest.param(entry, id=f"{index:03d}-{entry['message']}-{entry['op']['family']}"))
    return params


@pytest.mark.parametrize("entry", _params())
def test_encoder_sends_what_nft_sends(entry: dict[str, Any]) -> None:
    """kproxy's message for a command is nft's for the same command's text, byte for byte (as the kernel reads them)."""
    op = op_from_json(entry["op"])
    assert nft_text(op) == entry["nft"], "the fixture's kproxy value is not the one whose text nft was given"
    theirs, mine = recorded(entry), ours(op)
    assert (mine.name, mine.payload[:4].hex()) == (theirs.name, theirs.payload[:4].hex()), "message type or nfgenmsg"
    expected, actual = canonical(theirs), canonical(mine)
    assert actual == expected, f"{entry['nft']}\n{_difference(expected, actual)}"


def test_every_documented_equivalence_is_needed() -> None:
    """Without any one of the documented equivalences some fixture no longer matches: the note above is not stale.

    (With all of them every fixture matches: ``test_encoder_sends_what_nft_sends``.)
    Many entries need none, and are nft's bytes exactly: chain declarations,
    flushes and deletes, element deletes, and the rules made only of verdicts,
    protocol matches, ``dnat to``, mark xors and prefixes of whole bytes.
    """
    entries = ENTRIES
    pairs = [(recorded(e), ours(op_from_json(e["op"]))) for e in entries]
    for name in sorted({e.name for e in EQUIVALENCES} | {ATTRIBUTE_ORDER}):
        assert any(canonical(theirs, name) != canonical(mine, name) for theirs, mine in pairs), f"{name!r} is never needed"
    exact = 0
    for entry, (theirs, mine) in zip(entries, pairs, strict=True):
        rule = from_json(entry["op"]["rule"]) if entry["op"]["kind"] == "rules" else ()
        if theirs.name in ("NEWCHAIN", "DELRULE", "DELCHAIN", "DELSETELEM") or (rule and all(map(_plain, rule))):
            assert mine.payload == theirs.payload, entry["nft"]
            exact += 1
    assert exact >= 70


def _plain(statement: Any) -> bool:
    """A statement whose expressions are nft's exactly (no equivalence applies to them)."""
    if isinstance(statement, statements.MatchPrefix):
        return record_netlink.shape_of(statement.cidr).endswith(("bytes", "whole"))  # else a mask (bitwise), also for /0
    return isinstance(statement, (statements.Verdict, statements.MatchProtocol, statements.DnatTo, statements.MarkXor))


def test_every_statement_the_encoder_handles_is_recorded() -> None:
    """Each statement class the encoder handles, and each of its forms, is in some rule fixture of each family."""
    for family in record_netlink.FAMILIES:
        found = [s for e in ENTRIES if e["op"]["kind"] == "rules" and e["op"]["family"] == family
                 for s in _statements(from_json(e["op"]["rule"]))]
        kinds = {type(s) for s in found}
        assert kinds >= set(expressions._ENCODED_HERE), (family, set(expressions._ENCODED_HERE) - kinds)
        assert {s.kind for s in found if isinstance(s, statements.Verdict)} == {"accept", "drop", "return", "jump", "goto"}
        updates = [s for s in found if isinstance(s, statements.SetUpdate)]
        assert any(u.timeout is not None for u in updates)
        assert {(u.limit.unit, u.limit.burst is not None) for u in updates if u.limit} >= {("second", False), ("minute", True)}
        # The limits of issue 19: connection counts, byte meters with and without a burst, negated interval lookups
        # (the allowlist) and the conntrack fields of the bandwidth chains.
        assert any(u.connections for u in updates)
        assert {u.limit.burst is not None for u in updates if u.limit and u.limit.bytes} == {True, False}
        assert any(isinstance(s, statements.Lookup) and s.negate and s.set == "limit-allow" for s in found)
        keys = {p for s in found if isinstance(s, (statements.Lookup, statements.SetUpdate)) for p in s.key}
        assert keys >= {"original-saddr", "original-daddr", "original-dport", "direction"}
        prefixes = {record_netlink.shape_of(s.cidr) for s in found if isinstance(s, statements.MatchPrefix)}
        version = 4 if family == "ip" else 6
        assert prefixes == {f"prefix{version}-{kind}" for kind in ("0", "bytes", "masked", "whole")}, prefixes
        assert {s.field for s in found if isinstance(s, statements.MatchPrefix)} == {"saddr", "daddr"}
        assert {s.protocol for s in found if isinstance(s, statements.MatchProtocol)} == {"tcp", "udp", "sctp"}
        assert any(isinstance(s, statements.Numgen) and s.offset for s in found)
        assert {type(p) for s in found if isinstance(s, statements.SetUpdate) for p in s.key} >= {str, statements.Const}
        assert {s.kind for s in found if isinstance(s, statements.Const)} == {"addr", "proto", "port"}


def test_every_set_and_object_kproxy_sends_is_recorded() -> None:
    """Adds and deletes of elements of every static set and map sent over netlink, with and without comments;
    chains, counters and tables with and without comments; flush and delete of chains, delete of counters."""
    elements = [e["op"] for e in ENTRIES if e["op"]["kind"] == "element"]
    for family in record_netlink.FAMILIES:
        sent = {name for name, decl in skeleton_table(family).sets.items() if layout_of(decl) is not None}
        for verb in ("add", "delete"):
            assert {o["name"] for o in elements if (o["verb"], o["family"]) == (verb, family)} == sent, (verb, family)
        added = [e for o in elements if (o["verb"], o["family"]) == ("add", family) for e in o["elements"]]
        assert {bool(e.get("comment")) for e in added} == {True, False}
        verdicts = {e["value"].split(" ")[0] for e in added if e.get("value") and " . " not in e["value"]}
        assert verdicts == {"goto", "jump", "drop"}
        objects = {(o["verb"], o["kind"], "comment" in o) for o in (e["op"] for e in ENTRIES)
                   if o["kind"] in ("table", "chain", "counter") and o["family"] == family}
        assert objects == {("add", "table", True), ("add", "table", False), ("add", "chain", True), ("add", "chain", False),
                           ("add", "counter", True), ("add", "counter", False), ("flush", "chain", False),
                           ("delete", "chain", False), ("delete", "counter", False)}


def test_fixture_payloads_are_whole_netlink_messages() -> None:
    """Each recorded payload is an nfgenmsg and attributes whose lengths add up, split on attribute boundaries."""
    for entry in ENTRIES:
        message = recorded(entry)
        assert record_netlink.payload_lines(message) == entry["payload"], entry["nft"]
        assert message.payload[0] in (2, 10) and message.payload[1:4] == b"\0\0\0"


@pytest.mark.root
def test_fixtures_are_what_nft_sends_today(tmp_path: Path) -> None:
    """Recording again gives the same fixtures: they are what this nft sends for what kproxy compiles today."""
    assert record_netlink.main(["--out", str(tmp_path)]) == 0
    for name in ("rules.json", "elements.json", "objects.json"):
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), (
            f"{name} changed: regenerate with python -m tests.harness.record_netlink and review the difference")
