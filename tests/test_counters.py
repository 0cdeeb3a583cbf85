"""kproxy's counters read with one netlink dump (kproxy.nft.counters).

Without root: the parser on the kernel's recorded answer
(``tests/data/counters/dump.json``, recorded by ``python -m
tests.harness.record_counters``) and on hand-made messages. With root: the
recording still matches what the kernel answers, and the dump reads what
libnftables lists, for a table kproxy programmed, at 1,000 Services.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from kproxy.nft import counters
from kproxy.nft.counters import (
    DUMP_ATTEMPTS,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    CounterDump,
    DumpState,
    dump_request,
    parse_dump,
    parse_messages,
)
from kproxy.nft.expressions import attr, nested
from kproxy.nft.kernel import NftError
from tests.harness import record_counters
from tests.harness.record_counters import EXPECTED

RECORDING = json.loads(record_counters.OUT.read_text())
MESSAGES = [bytes.fromhex(m) for m in RECORDING["messages"]]


def object_message(name: str, packets: int, count: int, family: int = 2, table: str = "kproxy", object_type: int = 1,
                   seq: int = 0, flags: int = 2, comment: bytes = b"") -> bytes:
    """An NFT_MSG_NEWOBJ message as the kernel writes it (table, name, type, handle, use, data, user data)."""
    payload = (attr(1, table.encode() + b"\0") + attr(2, name.encode() + b"\0") + attr(3, struct.pack("!I", object_type))
               + attr(6, struct.pack("!Q", 1)) + attr(5, struct.pack("!I", 0))
               + nested(4, attr(1, struct.pack("!Q", count)) + attr(2, struct.pack("!Q", packets))))
    if comment:
        payload += attr(8, comment)
    return struct.pack("=IHHII", 20 + len(payload), (10 << 8) | 18, flags, seq, 0) + bytes([family, 0, 0, 0]) + payload


def done(seq: int = 0, flags: int = 2) -> bytes:
    return struct.pack("=IHHII", 20, NLMSG_DONE, flags, seq, 0) + b"\0\0\0\0"


def error(code: int, seq: int = 0) -> bytes:
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -code) + b"\0" * 16


# -- the recording -----------------------------------------------------------------------


def test_recorded_dump_parses_to_kproxys_counters() -> None:
    """The kernel's answer: both families' counters with their 64-bit values; the inet table's counter is skipped."""
    state = parse_messages(MESSAGES)
    assert state.counters == EXPECTED
    assert state.done and not state.interrupted and not state.error
    assert state.skipped == 1  # table inet kproxy


def test_recorded_dump_in_one_buffer_and_split_anywhere_between_messages() -> None:
    """One recv may hold many messages: parsed the same in one buffer or in any split at message boundaries."""
    assert parse_dump(b"".join(MESSAGES)).counters == EXPECTED
    for cut in range(1, len(MESSAGES)):
        assert parse_messages([b"".join(MESSAGES[:cut]), b"".join(MESSAGES[cut:])]).counters == EXPECTED


def test_the_kernels_layout_is_read_at_fixed_offsets_and_agrees_with_the_attribute_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every counter the kernel sent takes the fast path (only the inet one is walked attribute by attribute,
    to be skipped); the attribute walk reads each message the same."""
    for message in MESSAGES[:-1]:
        fast = parse_dump(message).counters
        walked = counters._object(message, 0, len(message))
        assert fast == ({(walked[0], walked[1]): (walked[2], walked[3])} if walked else {})
    walks: list[int] = []
    original = counters._object

    def counted(data: bytes, offset: int, length: int) -> Any:
        walks.append(offset)
        return original(data, offset, length)

    monkeypatch.setattr(counters, "_object", counted)
    assert parse_messages(MESSAGES).counters == EXPECTED
    assert len(walks) == 1  # table inet kproxy


def test_request_is_the_recorded_one() -> None:
    """GETOBJ, NLM_F_REQUEST | NLM_F_DUMP, family unspecified, table "kproxy", type counter."""
    assert dump_request(7).hex() == RECORDING["request"]
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", dump_request(3))
    assert (length, kind, flags, seq) == (len(dump_request(3)), (10 << 8) | 19, 0x301, 3)


# -- hand-made messages -------------------------------------------------------------------


def test_other_tables_types_and_families_are_skipped() -> None:
    """Whatever the kernel's filter lets through, only counters of ip/ip6 kproxy are kept."""
    data = b"".join([
        object_message("conns-A-ns/a/tcp/80", 1, 2),
        object_message("conns-A-ns/a/tcp/80", 3, 4, family=10, comment=b"\x00\x05hello\x00\x00\x00"),
        object_message("conns-A-ns/a/tcp/80", 5, 6, table="other"),
        object_message("quota", 7, 8, object_type=2),
        object_message("conns-A-ns/a/tcp/80", 9, 10, family=1),  # inet
        object_message("conns-A-ns/a/tcp/80", 9, 10, family=7),  # bridge
        done(),
    ])
    state = parse_dump(data)
    assert state.counters == {("ip", "conns-A-ns/a/tcp/80"): (1, 2), ("ip6", "conns-A-ns/a/tcp/80"): (3, 4)}
    assert (state.done, state.skipped) == (True, 4)


def test_attributes_in_any_order_with_padding_attributes() -> None:
    """Attributes are found by type: a pad attribute (NFTA_COUNTER_PAD) or another order changes nothing."""
    payload = (nested(4, attr(3, b"") + attr(2, struct.pack("!Q", 11)) + attr(1, struct.pack("!Q", 22)))
               + attr(3, struct.pack("!I", 1)) + attr(7, b"") + attr(2, b"conns-B-ns/b/udp/53\0") + attr(1, b"kproxy\0"))
    message = struct.pack("=IHHII", 20 + len(payload), (10 << 8) | 18, 2, 0, 0) + bytes([2, 0, 0, 0]) + payload
    assert parse_dump(message).counters == {("ip", "conns-B-ns/b/udp/53"): (11, 22)}


def test_other_sequence_numbers_are_ignored() -> None:
    """Answers left over from an earlier request (another sequence number) are not this dump's."""
    data = object_message("old", 1, 1, seq=4) + object_message("new", 2, 2, seq=5) + done(seq=4)
    state = parse_dump(data, seq=5)
    assert state.counters == {("ip", "new"): (2, 2)} and not state.done


def test_interrupted_dump_and_errors_are_reported() -> None:
    """NLM_F_DUMP_INTR marks a dump the ruleset changed under; NLMSG_ERROR carries the errno."""
    assert parse_dump(object_message("a", 1, 1, flags=2 | NLM_F_DUMP_INTR) + done()).interrupted
    assert parse_dump(error(1)).error == 1  # EPERM
    assert parse_dump(error(0)).error == 0  # an ACK


def test_truncated_message_is_an_error() -> None:
    """A message longer than the buffer, or shorter than its header, is an NftError (never a wrong reading)."""
    with pytest.raises(NftError, match="truncated"):
        parse_dump(object_message("a", 1, 1)[:-4])
    with pytest.raises(NftError, match="truncated"):
        parse_dump(struct.pack("=IHHII", 8, 0, 0, 0, 0))


def test_names_that_are_not_utf8_are_kept_readable() -> None:
    """A name the kernel holds as arbitrary bytes is decoded with replacement characters (a metric must not fail)."""
    payload = attr(1, b"kproxy\0") + attr(2, b"conns-\xff-x/y/tcp/1\0") + attr(3, struct.pack("!I", 1)) + nested(
        4, attr(1, struct.pack("!Q", 1)) + attr(2, struct.pack("!Q", 1)))
    message = struct.pack("=IHHII", 20 + len(payload), (10 << 8) | 18, 2, 0, 0) + bytes([2, 0, 0, 0]) + payload
    assert list(parse_dump(message).counters) == [("ip", "conns-\ufffd-x/y/tcp/1")]


def test_an_interrupted_dump_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dump the ruleset changed under is read again; after DUMP_ATTEMPTS, the last one is used."""
    dump = CounterDump()
    answers = [DumpState({("ip", "a"): (1, 1)}, done=True, interrupted=True),
               DumpState({("ip", "a"): (2, 2)}, done=True)]
    monkeypatch.setattr(dump, "_dump_once", lambda: answers.pop(0))
    assert dump.read() == {("ip", "a"): (2, 2)}
    calls: list[int] = []

    def always_interrupted() -> DumpState:
        calls.append(1)
        return DumpState({("ip", "b"): (len(calls), 0)}, done=True, interrupted=True)

    monkeypatch.setattr(dump, "_dump_once", always_interrupted)
    assert dump.read() == {("ip", "b"): (DUMP_ATTEMPTS, 0)}
    assert len(calls) == DUMP_ATTEMPTS


# -- with the kernel ------------------------------------------------------------------------


@pytest.mark.root
def test_recording_still_matches_the_kernel() -> None:
    """Recorded again in a fresh namespace, the kernel's answer is the same, message for message."""
    again = record_counters.record()
    assert again["request"] == RECORDING["request"]
    assert again["messages"] == RECORDING["messages"], "the kernel answers differently: re-record (see tests/harness/record_counters.py)"


@pytest.mark.root
def test_dump_reads_what_libnftables_lists(empty_netns: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """kproxy's tables for 1,000 Services (both families), with traffic counted: the dump equals `nft -j list counters`,
    and so do reads by name (in batches; a name the table does not hold is left out)."""
    from kproxy.cluster.convert import build_cluster
    from kproxy.nft.backend import NftablesBackend
    from kproxy.rules.compiler import ProxyConfig, compile_ruleset, node_info
    from kproxy.rules.plan import create
    from tests.harness.builders import endpoint, endpoint_slice, service

    objects: list[dict[str, Any]] = []
    for i in range(1000):
        ips = [f"10.96.{i // 256}.{i % 256}", f"fd00:96::{i:x}"]
        objects.append(service(f"svc-{i}", f"ns-{i % 7}", ips, ipFamilies=["IPv4", "IPv6"],
                               annotations={"kproxy.io/rate-limit": "5/second"} if i % 100 == 0 else {}))
        objects.append(endpoint_slice(f"svc-{i}-4", f"svc-{i}", [endpoint(f"10.244.{i // 256}.{i % 256}")],
                                      namespace=f"ns-{i % 7}"))
        objects.append(endpoint_slice(f"svc-{i}-6", f"svc-{i}", [endpoint(f"fd00:244::{i:x}")],
                                      namespace=f"ns-{i % 7}", address_type="IPv6"))
    cluster, problems = build_cluster(objects, "node-a")
    assert not problems
    config = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"), service_metrics="all")  # every port counts
    ruleset = compile_ruleset(cluster, node_info("node-a", None, ()), config)
    with empty_netns.entered():
        backend = NftablesBackend()
        assert backend.read_counters() == {}  # no table yet
        for table in ruleset.tables.values():
            backend.apply_in_order(create(table))
    # Some traffic: counters that are not all zero (new connections to a few ClusterIPs, over a route to a veth).
    empty_netns.ip_batch(["link set lo up", "link add d0 type veth peer name d1", "link set d0 up", "link set d1 up",
                          "addr add 192.168.77.1/24 dev d0", "route add default via 192.168.77.2 dev d0"])
    empty_netns.run("python3", "-c", "import socket\nfor i in range(5):\n for n in range(i + 1):\n"
                    "  s = socket.socket(); s.setblocking(False)\n"
                    "  try: s.connect(('10.96.0.%d' % i, 80))\n  except OSError: pass\n  s.close()")
    with empty_netns.entered():
        dumped = backend.read_counters()
        listed = {}
        for family in ("ip", "ip6"):
            document = json.loads(empty_netns.nft("-j", "list", "counters", "table", family, "kproxy").stdout)
            for item in document["nftables"]:
                if "counter" in item:
                    body = item["counter"]
                    listed[(family, body["name"])] = (body["packets"], body["bytes"])
    assert dumped == listed
    assert len(dumped) == 2 * (1000 + 10)  # new connections per Service port and family, drops of the rate-limited
    assert set(dumped) == {(f, name) for f, table in ruleset.tables.items() for name in table.counters}
    counted = {name: packets for (family, name), (packets, _) in dumped.items() if family == "ip" and packets}
    assert sorted(counted.values()) == [1, 2, 3, 4, 5], counted
    wanted = [("ip", name) for name in counted] + sorted(dumped)[:9:2] + [("ip6", "conns-00000000-no/such/tcp/80")]
    monkeypatch.setattr(counters, "NAMED_BATCH", 3)  # four batches, the last one short
    with empty_netns.entered():
        named = backend.read_named_counters(wanted)
        assert named == {key: dumped[key] for key in wanted if key in dumped}
        assert len(named) == len(wanted) - 1
        assert backend.read_counters() == dumped, "the socket is still in step after the missing name's ENOENT"


@pytest.mark.root
def test_dump_survives_a_table_being_replaced(empty_netns: Any) -> None:
    """The socket stays usable: tables deleted and created between reads are seen as they are."""
    with empty_netns.entered():
        dump = CounterDump()
        try:
            assert dump.read() == {}
            empty_netns.nft("-f", "-", input="table ip kproxy { counter conns-A-ns/a/tcp/80 { packets 3 bytes 4; }; }\n")
            assert dump.read() == {("ip", "conns-A-ns/a/tcp/80"): (3, 4)}
            empty_netns.nft("delete", "table", "ip", "kproxy")
            assert dump.read() == {}
        finally:
            dump.close()
