"""kproxy's tables read back over netlink (``kproxy.nft.tabledump``, ``kproxy.nft.dump``) as ``parse_table`` reads nft's JSON.

Without root: the kernel's recorded answers (``tests/data/dump/NAME.json``,
recorded by ``python -m tests.harness.record_dump`` from the same kernel
states as ``tests/data/readback/NAME.json``: every entry of test_readback's
``RECORDINGS``) are replayed through ``TableDump``, and the Table must equal
what ``parse_table`` makes of nft's JSON for the same state, and, for the
compiled scenarios, what was compiled; hand-made messages show what is
refused. With root: for every recording, the reader and libnftables agree
in the kernel, the recordings still match what the kernel answers, and so
do a table of 1,000 Services and random interval sets.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import random
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kproxy.nft import tabledump
from kproxy.nft.backend import NftablesBackend
from kproxy.nft.dump import READ_ATTEMPTS, TableDump, Transport
from kproxy.nft.objects import Element, Family, Ruleset, Table, chain_fingerprint
from kproxy.nft.readback import parse_table
from kproxy.nft.tabledump import (
    NFNL_SUBSYS_NFTABLES,
    Answers,
    DumpError,
    TableParser,
    attribute,
)
from kproxy.rules.plan import diff
from tests.harness import record_dump
from tests.harness.record_dump import Replay, load
from tests.test_readback import COMPILED, GENERATED_CHAIN, NFT_FAMILIES, RECORDINGS, _elements
from tests.test_readback import _load as load_json

NAMES = sorted(RECORDINGS)


def replayed(name: str, per_recv: int = 1) -> Ruleset:
    """The recording read through ``TableDump``; every recorded request must be asked for."""
    replays: list[Replay] = []

    def opened() -> Transport:
        replays.append(Replay(load(name), per_recv))
        return replays[-1]

    ruleset = TableDump(opened).read()
    assert len(replays) == 1 and replays[0].unused == 0
    return ruleset


def listed(name: str) -> dict[Family, Table]:
    """What ``parse_table`` makes of nft's JSON for the same kernel state."""
    return {family: parse_table(document, family) for family, document in load_json(name).items()}


def without_comment(table: Table) -> Table:
    return dataclasses.replace(table, comment="")


# -- the recordings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_recording_reads_as_nft_prints_it(name: str) -> None:
    """Every set, element, chain fingerprint and counter of every recording reads as ``parse_table`` reads nft's
    JSON of the same kernel state; the table's comment (which nft 1.0.6 does not print) is the one kproxy wrote."""
    ruleset, expected = replayed(name), listed(name)
    assert set(ruleset.tables) == set(expected) == set(NFT_FAMILIES)
    recording = RECORDINGS[name]
    for family, table in ruleset.tables.items():
        assert without_comment(table) == expected[family]
        assert expected[family].comment == ""
        wrote = "" if recording.bare else recording.compiled().tables[family].comment
        assert table.comment == wrote


@pytest.mark.parametrize("family", NFT_FAMILIES)
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_tables_read_back_as_compiled(name: str, family: Family) -> None:
    """Elements, counters and chain fingerprints equal the compiled ones: the planner sees nothing to do."""
    compiled = RECORDINGS[name].compiled().tables[family]
    table = replayed(name).tables[family]
    assert _elements(table) == _elements(compiled)
    assert table.counters == compiled.counters
    assert {n: c.fingerprint for n, c in table.chains.items()} == {
        n: chain_fingerprint(c, family) for n, c in compiled.chains.items()}
    assert {n: (d.kind, d.dynamic, d.interval) for n, d in table.sets.items()} == {
        n: (d.kind, d.dynamic, d.interval) for n, d in compiled.sets.items()}
    assert diff(table, compiled).operations == 0


def test_drift_reads_as_it_is() -> None:
    """What kproxy did not write: chains without a digest (a rule after the digest rule, a chain never written, an
    empty one), elements without comments (one a range), a counter without a comment, a dynamic set's element."""
    table = replayed("drift").tables["ip"]
    compiled = RECORDINGS["drift"].compiled().tables["ip"]
    count = chain_fingerprint(compiled.chains[GENERATED_CHAIN], "ip")[1]
    assert table.chains[GENERATED_CHAIN].fingerprint == ("", count + 1)
    assert table.chains["stray"].fingerprint == ("", 0)
    assert table.chains["stray-rules"].fingerprint == ("", 1)
    assert table.elements["hairpin"]["10.244.9.9 . 10.244.9.9"] == Element("10.244.9.9 . 10.244.9.9")
    assert table.elements["service-cidrs"] == {"10.100.0.1-10.100.0.9": Element("10.100.0.1-10.100.0.9")}
    assert table.elements["no-endpoint-drop"]["10.96.9.9 . tcp . 80"] == Element("10.96.9.9 . tcp . 80")
    assert table.counters["stray-counter"] == ""
    assert table.sets["affinity"].dynamic and "affinity" not in table.elements


@pytest.mark.parametrize(("family", "set_name", "element"), [
    ("ip", "prefixes", Element("10.0.0.0/8", "", "a")),
    ("ip", "prefixes", Element("11.0.0.1-11.0.0.9", "", "b")),
    ("ip", "prefixes", Element("12.0.0.1")),
    ("ip", "prefixes", Element("13.0.1.0/24")),  # adjacent to 13.0.0.0/24: two elements, as nft prints them
    ("ip", "prefixes", Element("14.0.0.0/23")),
    ("ip", "prefixes", Element("14.0.2.0-14.0.2.254")),
    ("ip", "everything", Element("0.0.0.0/0", "", "all")),  # no interval end: runs to the largest address
    ("ip", "top", Element("255.255.255.255", "", "top")),
    ("ip", "open-range", Element("10.0.0.0-255.255.255.255", "", "open")),
    ("ip", "upper-half", Element("128.0.0.0/1", "", "half")),
    ("ip", "bottom", Element("0.0.0.0")),
    ("ip", "with-catchall", Element("*")),
    ("ip", "port-ranges", Element("1024-65535", "", "hi")),
    ("ip", "port-ranges", Element("0-63")),  # ports are never prefixes
    ("ip", "protocol-ranges", Element("6-17", "", "r")),  # protocols in ranges are numbers
    ("ip", "protocol-ranges", Element("sctp")),
    ("ip", "ranges", Element("10.0.0.0/8 . 80-90", "", "x")),
    ("ip", "ranges", Element("10.0.0.1-10.0.0.5 . 22")),
    ("ip", "ranges", Element("2.0.0.0/31 . 7")),
    ("ip", "all-ranges", Element("0.0.0.0/0 . 0-65535", "", "every")),
    ("ip", "ranges3", Element("17-132 . 53 . 1.1.1.1")),
    ("ip", "marks", Element("4294967295", "", "m")),
    ("ip", "address-marks", Element("1.2.3.4 . 16")),
    ("ip", "verdicts", Element("1.1.1.3", "continue")),
    ("ip", "verdicts", Element("1.1.1.4", "return")),
    ("ip", "verdicts", Element("1.1.1.5", "jump target")),
    ("ip", "verdicts", Element("1.1.1.6", "goto target", "g")),
    ("ip", "catchall", Element("*")),
    ("ip", "catchall-map", Element("*", "drop")),
    ("ip6", "prefixes", Element("::/127")),
    ("ip6", "prefixes", Element("::ffff:1.2.3.4")),
    ("ip6", "prefixes", Element("2001:db8::1-2001:db8::ff")),
    ("ip6", "prefixes", Element("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
    ("ip6", "upper-half", Element("8000::/1")),
    ("ip6", "ranges", Element("fd00::1 . tcp . 443 . ::/0")),
    ("ip6", "ranges", Element("fd00::2 . udp . 53 . fd00::1-fd00::3")),
    ("ip6", "pairs", Element("fd00:0:0:a::b . 2001:db8::1:0:0:1")),
], ids=lambda value: value.key if isinstance(value, Element) else str(value))
def test_foreign_shapes(family: Family, set_name: str, element: Element) -> None:
    """Shapes kproxy never writes read as nft prints them (the whole recording equals parse_table's reading too)."""
    assert replayed("foreign-shapes").tables[family].elements[set_name][element.key] == element


def test_foreign_objects() -> None:
    """A set with timeouts is dynamic (its elements unread), a rule's anonymous set is no set of the table, a quota
    is no counter."""
    table = replayed("foreign-shapes").tables["ip"]
    assert table.sets["timeouts"].dynamic and "timeouts" not in table.elements
    assert not [name for name in table.sets if name.startswith("__")]
    assert table.counters == {"counted": "with a comment"}
    assert table.chains["target"].fingerprint == ("", 1)


@pytest.mark.parametrize("per_recv", [0, 3])
def test_answers_in_any_number_of_buffers(per_recv: int) -> None:
    """One recv may bring one message or many: the same Table."""
    for name in ("many-endpoints", "foreign-shapes"):
        assert replayed(name, per_recv) == replayed(name)


def test_the_kernels_layout_takes_the_fixed_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every element of kproxy's static sets (all but the interval sets) is read at fixed offsets; read attribute by
    attribute instead, every recording gives the same Table."""
    walked: list[str] = []
    element = TableParser._element

    def counted(self: TableParser, dumped: Any, data: bytes, at: int, end: int) -> None:
        walked.append(dumped.decl.name)
        element(self, dumped, data, at, end)

    monkeypatch.setattr(TableParser, "_element", counted)
    fast = {name: replayed(name) for name in NAMES}
    assert set(walked) <= {"cluster-cidrs", "service-cidrs", "firewall-allow", "limit-allow", "prefixes", "everything", "top",
                           "open-range", "upper-half", "bottom", "with-catchall", "port-ranges", "protocol-ranges",
                           "ranges", "all-ranges", "ranges3", "catchall", "catchall-map"}, set(walked)
    monkeypatch.setattr(tabledump.Dumped, "__post_init__", lambda self: None)  # no key headers: never fixed offsets
    walked.clear()
    assert {name: replayed(name) for name in NAMES} == fast
    assert "endpoints-4" in walked and "service-ips" in walked


# -- hand-made messages ---------------------------------------------------------------------------------

def message(kind: int, payload: bytes, family: int = 2, seq: int = 1, flags: int = 2) -> bytes:
    body = bytes([family, 0, 0, 0]) + payload
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, 0) + body


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def nest(kind: int, *attributes: bytes) -> bytes:
    return attribute(kind, b"".join(attributes))


def set_message(name: str, key_type: int, key_len: int, flags: int = 0, data_type: int | None = None,
                data_len: int = 0, user: bytes = b"") -> bytes:
    payload = (attribute(1, b"kproxy\0") + attribute(2, name.encode() + b"\0") + attribute(3, u32(flags))
               + attribute(4, u32(key_type)) + attribute(5, u32(key_len)))
    if data_type is not None:
        payload += attribute(6, u32(data_type)) + attribute(7, u32(data_len))
    if user:
        payload += attribute(13, user)
    return message(9, payload)


def element(key: bytes, data: bytes = b"", comment: str = "", extra: bytes = b"") -> bytes:
    body = nest(1, attribute(1, key)) + data + extra
    if comment:
        raw = comment.encode() + b"\0"
        body += attribute(6, bytes([0, len(raw)]) + raw)
    return nest(1, body)


def elements_message(name: str, *elements: bytes) -> bytes:
    return message(12, attribute(1, b"kproxy\0") + attribute(2, name.encode() + b"\0") + nest(3, *elements))


def parsed(*messages: bytes) -> TableParser:
    """A parser fed the messages (sets first)."""
    parser = TableParser("ip")
    for data in messages:
        handle = parser.set if struct.unpack_from("=H", data, 4)[0] & 0xFF == 9 else parser.elements
        Answers(1, handle).feed(data)
    return parser


SERVICE_KEY = (7 << 12) | (12 << 6) | 13
"""ipv4_addr . inet_proto . inet_service"""
FRONTEND = bytes([10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0])


def tlv(kind: int, value: bytes) -> bytes:
    """One libnftnl user data TLV."""
    return bytes([kind, len(value)]) + value


def typeof(*exprs: int, where: int = 3) -> bytes:
    """A set's typeof description of a concatenation of expressions given by nft's expression type ids."""
    fields = b"".join(tlv(i, tlv(0, struct.pack("=I", e)) + tlv(1, b"")) for i, e in enumerate(exprs))
    return tlv(where, tlv(0, struct.pack("=I", 13)) + tlv(1, fields))


ENDPOINT_KEY = (7 << 18) | (12 << 12) | (13 << 6) | 4
"""ipv4_addr . inet_proto . inet_service . integer (typeof ... . numgen)"""


def test_hand_made_elements_read_as_kproxy_writes_them() -> None:
    """A set of frontends, and a map of endpoints whose slot is numgen's host-order number (typeof), by hand."""
    slot = struct.pack("=I", 65536 * 2)
    parser = parsed(
        set_message("frontends", SERVICE_KEY, 12),
        elements_message("frontends", element(FRONTEND, comment="shop/web:http")),
        set_message("endpoints", ENDPOINT_KEY, 16, flags=0x8, data_type=(7 << 6) | 13, data_len=8,
                    user=typeof(7, 9, 7, 23)),
        elements_message("endpoints", element(FRONTEND + slot, nest(2, attribute(1, bytes([10, 244, 1, 10, 31, 144, 0, 0]))),
                                              comment="shop/web:http")))
    elements = parser.finish().elements
    assert elements["frontends"] == {"10.96.0.10 . tcp . 80": Element("10.96.0.10 . tcp . 80", "", "shop/web:http")}
    assert elements["endpoints"] == {"10.96.0.10 . tcp . 80 . 131072": Element(
        "10.96.0.10 . tcp . 80 . 131072", "10.244.1.10 . 8080", "shop/web:http")}


@pytest.mark.parametrize(("message", "reason"), [
    (set_message("s", 9, 6), "datatype 9"),  # ether_addr
    (set_message("s", (7 << 6) | 4, 8), "integer other than numgen"),
    (set_message("s", (7 << 6) | 4, 8, user=typeof(7, 7)), "integer other than numgen"),
    (set_message("s", SERVICE_KEY, 16), "16 bytes for ipv4_addr . inet_proto . inet_service"),
    (set_message("s", 7, 4, flags=0x40), "object map"),
    (set_message("s", 7, 4, flags=0x4 | 0x8, data_type=0xFFFFFF00), "interval map"),
], ids=["datatype", "integer", "integer-payload", "length", "object-map", "interval-map"])
def test_sets_of_other_types_are_read_without_their_elements(message: bytes, reason: str) -> None:
    """A set of a type kproxy never declares is another program's: the Table has its declaration and no element (the
    planner deletes it), its elements are not asked for, and why is kept (``unread``) for the log."""
    parser = parsed(message)
    assert list(parser.unread) == ["s"] and reason in parser.unread["s"]
    assert parser.element_sets() == []
    table = parser.finish()
    assert "s" in table.sets and table.elements == {"s": {}}


def test_protocols_are_named_as_nft_names_them() -> None:
    """With /etc/protocols' names (``kproxy.nft.dump.protocol_names``), any protocol reads as nft prints it: by its
    name, or as a number if it has none; in a range, as numbers."""
    from kproxy.nft.dump import protocol_names

    names = protocol_names()
    assert names[1] == "icmp" and names[6] == "tcp" and 253 not in names
    parser = TableParser("ip", names)
    for data in (set_message("s", SERVICE_KEY, 12),
                 elements_message("s", element(bytes([10, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0])),
                                  element(bytes([10, 0, 0, 1, 253, 0, 0, 0, 0, 0, 0, 0])))):
        Answers(1, parser.set if struct.unpack_from("=H", data, 4)[0] & 0xFF == 9 else parser.elements).feed(data)
    assert set(parser.finish().elements["s"]) == {"10.0.0.1 . icmp . 0", "10.0.0.1 . 253 . 0"}


@pytest.mark.parametrize(("messages", "error"), [
    ((set_message("s", SERVICE_KEY, 12), elements_message("s", element(bytes([10, 0, 0, 1, 1, 0, 0, 0, 0, 80, 0, 0])))),
     "protocol number 1"),
    ((set_message("s", SERVICE_KEY, 12), elements_message("s", element(bytes([10, 0, 0, 1, 6, 0, 1, 0, 0, 80, 0, 0])))),
     "non-zero padding"),
    ((set_message("s", SERVICE_KEY, 12), elements_message("s", element(FRONTEND[:8]))), "without a key of 12 bytes"),
    ((set_message("m", 7, 4, flags=0x8, data_type=0xFFFFFF00),
      elements_message("m", element(bytes(4), nest(2, nest(2, attribute(1, u32(3))))))), "verdict code 3"),
    ((set_message("m", 7, 4, flags=0x8, data_type=0xFFFFFF00), elements_message("m", element(bytes(4)))),
     "without data"),
    ((set_message("s", 7, 4), elements_message("s", element(bytes(4), extra=attribute(9, b"obj\0")))),
     "refers to an object"),
    ((elements_message("unknown", element(bytes(4))),), "not a static set"),
], ids=["protocol", "padding", "short-key", "verdict", "map-without-data", "objref", "unknown-set"])
def test_what_cannot_be_read_exactly_is_refused(messages: tuple[bytes, ...], error: str) -> None:
    """In a set that is read, a value or a layout the reader does not know (a protocol without the names of
    /etc/protocols) is a DumpError (the backend then reads the JSON), never a guess and never a dropped element."""
    with pytest.raises(DumpError, match=error):
        parsed(*messages)


def test_truncated_messages_are_refused() -> None:
    data = set_message("s", 7, 4)
    with pytest.raises(DumpError, match="truncated"):
        Answers(1, TableParser("ip").set).feed(data[:-4])


def test_other_tables_families_and_sequence_numbers_are_skipped() -> None:
    """A set of another table or family, and messages answering another request, are not this table's."""
    parser = TableParser("ip")
    other_table = set_message("s", 7, 4).replace(b"kproxy\0", b"other\0\0")
    answers = Answers(1, parser.set)
    answers.feed(other_table[:8] + struct.pack("=I", 1) + other_table[12:] + message(9, set_message("t", 7, 4)[20:],
                                                                                      family=10))
    answers.feed(set_message("late", 7, 4)[:8] + struct.pack("=I", 2) + set_message("late", 7, 4)[12:])
    assert parser.sets == {}


# -- the reading: retries and errors ---------------------------------------------------------------------


class Cyclic(Replay):
    """A replay that starts again from the first recorded request when it is asked for it again (a read after a
    read), and lets ``edit(read, index, messages)`` change the answers on the way."""

    def __init__(self, exchanges: list[tuple[bytes, list[bytes]]],
                 edit: Callable[[int, int, list[bytes]], list[bytes]] = lambda read, index, messages: messages) -> None:
        super().__init__(exchanges)
        self.edit = edit
        self.reads = 0

    def send(self, data: bytes) -> None:
        first = self._exchanges[0][0]
        if self._next and record_dump.normalise(data) == first and (
                self._next == len(self._exchanges) or self._exchanges[self._next][0] != first):
            self._next, self.reads = 0, self.reads + 1
        index = self._next
        super().send(data)
        self._pending = self.edit(self.reads, index, self._pending)


def request_of(exchange: tuple[bytes, list[bytes]]) -> tuple[int, int]:
    """(nf_tables message type, family) of a recorded request."""
    request = exchange[0]
    return struct.unpack_from("=H", request, 4)[0] & 0xFF, request[16]


def error_answer(code: int, like: bytes) -> bytes:
    """NLMSG_ERROR with ``code`` answering the request of ``like`` (a recorded answer: its sequence number)."""
    return struct.pack("=IHH", 36, 2, 0) + like[8:12] + b"\0" * 4 + struct.pack("=i", -code) + bytes(16)


def with_generation(value: int, messages: list[bytes]) -> list[bytes]:
    """The NFT_MSG_NEWGEN answer with another generation id."""
    new = message(15, attribute(1, u32(value)), family=0, flags=0)
    return [new[:8] + messages[0][8:12] + new[12:], *messages[1:]]


def test_a_ruleset_that_changed_during_the_read_is_read_again() -> None:
    """The generation is another after the dumps than before: everything is read again."""
    exchanges = load("clusterip")
    last = len(exchanges) - 1
    assert request_of(exchanges[last])[0] == tabledump.NFT_MSG_GETGEN

    def changed_once(read: int, index: int, messages: list[bytes]) -> list[bytes]:
        return with_generation(12345, messages) if (read, index) == (0, last) else messages

    replays: list[Cyclic] = []
    dump = TableDump(lambda: replays.append(Cyclic(exchanges, changed_once)) or replays[-1])
    assert dump.read() == replayed("clusterip")
    assert replays[0].reads == 1 and dump.requests == 2 * len(exchanges)


def test_a_ruleset_that_keeps_changing_is_a_dump_error() -> None:
    """Dumps marked NLM_F_DUMP_INTR every time: READ_ATTEMPTS reads, then DumpError."""

    def interrupted(read: int, index: int, messages: list[bytes]) -> list[bytes]:
        return [m[:6] + struct.pack("=H", struct.unpack_from("=H", m, 6)[0] | 0x10) + m[8:] for m in messages]

    replays: list[Cyclic] = []
    dump = TableDump(lambda: replays.append(Cyclic(load("empty"), interrupted)) or replays[-1])
    with pytest.raises(DumpError, match=f"changed while it was read, {READ_ATTEMPTS} times"):
        dump.read()
    assert replays[0].reads == READ_ATTEMPTS - 1


def test_a_missing_table_is_left_out() -> None:
    """ENOENT for ``ip kproxy``: nothing else of ip is asked for, and ip6 is read."""
    exchanges = []
    for exchange in load("empty"):
        kind, family = request_of(exchange)
        if kind == tabledump.NFT_MSG_GETTABLE and family == 2:
            exchanges.append((exchange[0], [error_answer(errno.ENOENT, exchange[1][0])]))
        elif family != 2:
            exchanges.append(exchange)
    ruleset = TableDump(lambda: Replay(exchanges)).read()
    assert list(ruleset.tables) == ["ip6"] and ruleset.tables["ip6"] == replayed("empty").tables["ip6"]


def test_errors_and_socket_failures_are_dump_errors() -> None:
    """A refused dump (EPERM), or a socket that fails, is a DumpError; the socket is closed for the next read, and
    the reader thread is gone."""
    exchanges = load("clusterip")
    refused = [(request, [error_answer(errno.EPERM, answers[0])] if request_of((request, answers))[0] == 13 else answers)
               for request, answers in exchanges]
    dump = TableDump(lambda: Replay(refused))
    with pytest.raises(DumpError, match="refused a dump: Operation not permitted"):
        dump.read()
    assert dump._transport is None

    class Failing(Replay):
        def recv(self) -> bytes:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    failing = TableDump(lambda: Failing(exchanges))
    with pytest.raises(DumpError, match="No buffer space"):
        failing.read()
    assert failing._transport is None
    assert not [t for t in threading.enumerate() if t.name == "kproxy-dump"]


# -- the backend ------------------------------------------------------------------------------------------


def backend_with(read: Callable[[], Ruleset]) -> NftablesBackend:
    """An NftablesBackend (no libnftables, no socket) whose netlink reader is ``read``."""
    backend = object.__new__(NftablesBackend)
    backend._dump = type("Reader", (), {"read": staticmethod(read)})()  # type: ignore[assignment]
    backend._dump_lock = threading.Lock()
    return backend


def test_backend_reads_over_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = replayed("clusterip")
    backend = backend_with(lambda: expected)
    monkeypatch.setattr(backend, "read_json", lambda: pytest.fail("libnftables read"))
    assert backend.read() is expected


def test_backend_falls_back_to_libnftables_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A reading that fails (here: a datatype the decoder does not know) falls back to the JSON path, logged."""

    def refuse() -> Ruleset:
        raise DumpError("ip set s: key: field 1 has datatype 9, which is not decoded here")

    listed_ruleset = Ruleset()
    backend = backend_with(refuse)
    monkeypatch.setattr(backend, "read_json", lambda: listed_ruleset)
    with caplog.at_level(logging.WARNING, logger="kproxy.nft.backend"):
        assert backend.read() is listed_ruleset
    assert [r.getMessage() for r in caplog.records] == [
        "reading kproxy's tables over netlink failed (DumpError: ip set s: key: field 1 has datatype 9, which is not "
        "decoded here); reading them through libnftables' JSON instead"]


# -- with the kernel ------------------------------------------------------------------------------------------


@pytest.fixture
def dump_netns() -> Iterator[Any]:
    """A fresh network namespace of this module's own (``kpt-dump-...``), deleted afterwards, also on failure."""
    from tests.harness.netbed import Netns

    with record_dump.namespace() as name:
        yield Netns(name)


def read_both(netns: Any) -> tuple[Ruleset, Ruleset]:
    """The tables in the namespace over netlink and through libnftables' JSON."""
    with netns.entered():
        backend = NftablesBackend()
        dumped = TableDump()
        dumped.open()  # the socket, in the namespace
    return dumped.read(), backend.read_json()


@pytest.mark.root
@pytest.mark.parametrize("name", NAMES)
def test_reader_equals_libnftables_in_the_kernel(name: str, dump_netns: Any) -> None:
    """For every recording's kernel state: the netlink reader's Table is parse_table's of libnftables' JSON."""
    recording = RECORDINGS[name]
    dump_netns.nft("-f", "-", input=recording.script())
    if recording.extra:
        dump_netns.nft("-f", "-", input=recording.extra)
    dumped, listed_ruleset = read_both(dump_netns)
    assert set(dumped.tables) == set(listed_ruleset.tables) == set(NFT_FAMILIES)
    for family, table in dumped.tables.items():
        assert without_comment(table) == listed_ruleset.tables[family], family


@pytest.mark.root
@pytest.mark.parametrize("name", NAMES)
def test_recording_still_matches_the_kernel(name: str) -> None:
    """Recorded again in a fresh namespace, the kernel answers the same, message for message (normalised; a set's
    elements in any order)."""
    again = record_dump.canonical(record_dump.record(name))
    stored = record_dump.canonical(json.loads((record_dump.OUT / f"{name}.json").read_text()))
    assert again == stored, f"the kernel answers differently: re-record with python -m tests.harness.record_dump {name}"


@pytest.mark.root
def test_backend_reads_a_thousand_services_over_netlink(dump_netns: Any, caplog: pytest.LogCaptureFixture) -> None:
    """kproxy's tables for 1,000 dual-stack Services with two endpoints each, programmed by the backend: read() over
    netlink (no fallback logged) equals the JSON reading, and the planner sees nothing to do."""
    from kproxy.cluster.convert import build_cluster
    from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
    from kproxy.rules.plan import create
    from tests.harness.builders import endpoint, endpoint_slice, service

    objects: list[dict[str, Any]] = []
    for i in range(1000):
        ips = [f"10.96.{i // 256}.{i % 256}", f"fd00:96::{i:x}"]
        objects.append(service(f"svc-{i}", f"ns-{i % 7}", ips, ipFamilies=["IPv4", "IPv6"],
                               type="NodePort" if i % 5 == 0 else "ClusterIP"))
        objects.append(endpoint_slice(f"svc-{i}-4", f"svc-{i}", [endpoint(f"10.244.{i // 256}.{i % 256}"),
                                                                  endpoint(f"10.245.{i // 256}.{i % 256}", node="b")],
                                      namespace=f"ns-{i % 7}"))
        objects.append(endpoint_slice(f"svc-{i}-6", f"svc-{i}", [endpoint(f"fd00:244::{i:x}")],
                                      namespace=f"ns-{i % 7}", address_type="IPv6"))
    cluster, problems = build_cluster(objects, "node-a")
    assert not problems
    ruleset = compile_ruleset(cluster, node_info("node-a", None, ()), ProxyConfig(cluster_cidrs=("10.244.0.0/15",)))
    with dump_netns.entered():
        backend = NftablesBackend()
        for table in ruleset.tables.values():
            backend.apply_in_order(create(table))
        with caplog.at_level(logging.WARNING, logger="kproxy.nft.backend"):
            dumped = backend.read()
        listed_ruleset = backend.read_json()
    assert not caplog.records
    for family, table in dumped.tables.items():
        assert without_comment(table) == listed_ruleset.tables[family]
        assert diff(table, ruleset.tables[family]).operations == 0
    assert sum(t.element_count() for t in dumped.tables.values()) > 10_000


def _random_intervals(rng: random.Random, bits: int, count: int) -> list[tuple[int, int]]:
    """Disjoint [low, high] intervals of ``bits``-bit numbers: prefixes, ranges and single values, some adjacent."""
    cuts = sorted(rng.sample(range(1, 1 << 16), count * 2))
    shift = bits - 16
    found = []
    for low, high in zip(cuts[::2], cuts[1::2], strict=True):
        kind = rng.random()
        if kind < 0.3:
            found.append((low << shift, low << shift))
        elif kind < 0.6:
            size = rng.randrange(1, shift)
            found.append((low << shift, (low << shift) + (1 << size) - 1))
        else:
            found.append(((low << shift) + rng.randrange(1 << shift), (high << shift) + rng.randrange(1 << shift)))
    found.append((found[-1][1] + 1, found[-1][1] + 1 + (1 << shift) - 1))  # adjacent to the last one
    return found


@pytest.mark.root
@pytest.mark.parametrize("seed", range(3))
def test_random_interval_sets_read_as_nft_prints_them(seed: int, dump_netns: Any) -> None:
    """Random intervals (prefixes, ranges, single values, adjacent ones) in single-field and concatenated interval
    sets of both families, with and without comments: the reader equals parse_table of libnftables' JSON."""
    import ipaddress

    rng = random.Random(seed)
    lines = ["add table ip kproxy", "add table ip6 kproxy"]
    for family, bits, addr in (("ip", 32, "ipv4_addr"), ("ip6", 128, "ipv6_addr")):
        cast = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
        single = [f"{cast(low)}-{cast(high)}" + (f' comment "c{i}"' if i % 2 else "")
                  for i, (low, high) in enumerate(_random_intervals(rng, bits, 40))]
        lines.append(f"add set {family} kproxy single {{ type {addr}; flags interval; elements = {{ {', '.join(single)} }} }}")
        pairs = [f"{cast(rng.getrandbits(bits))} . tcp . {rng.randrange(1, 65535)} . {cast(low)}-{cast(high)}"
                 for low, high in _random_intervals(rng, bits, 20)]
        lines.append(f"add set {family} kproxy concatenated {{ type {addr} . inet_proto . inet_service . {addr}; "
                     f"flags interval; elements = {{ {', '.join(pairs)} }} }}")
    dump_netns.nft("-f", "-", input="\n".join(lines) + "\n")
    dumped, listed_ruleset = read_both(dump_netns)
    for family, table in dumped.tables.items():
        assert table == listed_ruleset.tables[family], family
        assert len(table.elements["single"]) >= 40


def _foreign(family: Family, service_chain: str) -> str:
    """What other programs might add to kproxy's tables: rules of any kind in a Service chain (before and after its
    digest rule), an element with a protocol kproxy never writes, sets and maps of types kproxy never declares and of
    types it does, a chain, a counter, a quota."""
    addr, saddr, net, other = (("ipv4_addr", "ip saddr 1.2.3.4", "10.0.0.0/8", "10.96.9.9 . icmp . 0") if family == "ip"
                               else ("ipv6_addr", "ip6 saddr ::1", "fd00::/8", "fd00::9 . 253 . 0"))
    where = f"{family} kproxy"
    return "\n".join([
        f"add rule {where} {service_chain} meta skuid 0 counter",
        f'insert rule {where} {service_chain} {saddr} log prefix "foreign " drop',
        f"add element {where} service-ips {{ {other} : drop }}",
        f"add set {where} foreign-macs {{ type ether_addr; elements = {{ 00:11:22:33:44:55 }} }}",
        f"add map {where} foreign-intervals {{ type {addr} : verdict; flags interval; elements = {{ {net} : drop }} }}",
        f"add map {where} foreign-marks {{ type mark : verdict; elements = {{ 0x1 : accept }} }}",
        f"add chain {where} foreign-chain",
        f'add rule {where} foreign-chain ct state established counter comment "kproxy-rules=ABC123"',
        f"add counter {where} foreign-counter",
        f"add quota {where} foreign-quota {{ over 25 mbytes }}",
    ]) + "\n"


@pytest.mark.root
@pytest.mark.parametrize("name", ["clusterip", "limits", "dual-stack", "session-affinity"])
def test_foreign_changes_are_repaired_as_the_json_reader_repairs_them(name: str, dump_netns: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Another program's rules, elements, sets, chains and objects in kproxy's tables: the netlink reader reads them
    (no fallback) as parse_table reads nft's JSON, but for the elements of the sets whose types kproxy never declares,
    which it leaves unread (logged); the planner's transaction is the same from either reading, and once applied both
    readings show nothing left to do."""
    recording = RECORDINGS[name]
    desired = recording.compiled()
    dump_netns.nft("-f", "-", input=recording.script())
    for family, table in desired.tables.items():
        chain = next((c for c in table.chains if c.startswith("svc-")), None) or next(
            c.name for c in table.chains.values() if not c.base and c.rules)  # a skeleton chain if no Service
        dump_netns.nft("-f", "-", input=_foreign(family, chain))
    with caplog.at_level(logging.WARNING, logger="kproxy.nft.dump"):
        dumped, listed_ruleset = read_both(dump_netns)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(
        f"{family} kproxy: the elements of {set_name!r} are not read ({family} set {set_name}: {reason}); kproxy "
        f"declares no such set" for family in desired.tables
        for set_name, reason in (("foreign-macs", "key: field 1 has datatype 9, which is not decoded here"),
                                 ("foreign-intervals", "an interval map, which is not decoded here")))
    assert set(dumped.tables) == set(listed_ruleset.tables) == set(desired.tables)
    for family, table in dumped.tables.items():
        listed_table = listed_ruleset.tables[family]
        assert listed_table.elements["foreign-macs"] and listed_table.elements["foreign-intervals"]
        unread = {"foreign-macs": {}, "foreign-intervals": {}}
        assert without_comment(table) == dataclasses.replace(listed_table, elements={**listed_table.elements, **unread})
        assert table.counters["foreign-counter"] == "" and table.elements["foreign-marks"] == {"1": Element("1", "accept")}
    from kproxy.rules.plan import plan

    tx = plan(dumped, desired)
    assert str(tx) == str(plan(listed_ruleset, desired)) and tx.operations >= 10
    script = str(tx)
    assert "10.96.9.9 . icmp . 0" in script and "delete set ip kproxy foreign-macs" in script, script
    assert "delete map ip6 kproxy foreign-intervals" in script and "delete chain ip kproxy foreign-chain" in script
    with dump_netns.entered():
        backend = NftablesBackend()
        backend.apply(tx)
        after = backend.read()
        after_listed = backend.read_json()
    for family, table in after.tables.items():
        assert diff(table, desired.tables[family]).operations == 0
        assert diff(after_listed.tables[family], desired.tables[family]).operations == 0
        assert "foreign-macs" not in table.sets and "foreign-chain" not in table.chains
