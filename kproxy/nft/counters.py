"""kproxy's named counters, read with one nf_tables netlink dump.

libnftables builds its cache of the whole ruleset (every chain, rule, set
and element) before it answers ``list counters``: seconds at 10k Services,
and hundreds of megabytes. The counters alone are one dump away: a
``NFT_MSG_GETOBJ`` request with ``NLM_F_DUMP``, which the kernel filters by
table name (``NFTA_OBJ_TABLE``) and object type (``NFTA_OBJ_TYPE``), answers
with one ``NFT_MSG_NEWOBJ`` message per counter object, then ``NLMSG_DONE``.
The request's family is ``NFPROTO_UNSPEC``, so ``ip kproxy`` and ``ip6
kproxy`` come in the same dump; objects of a ``kproxy`` table of any other
family are skipped here.

Each object message (``nf_tables_fill_obj_info``) carries the table, the
name, the type, the use count, the data (for a counter, nested
``NFTA_COUNTER_BYTES`` and ``NFTA_COUNTER_PACKETS``, big-endian 64-bit), the
handle and, if any, the user data (the comment); ``parse_dump`` reads the
attributes it needs by type, in whatever order they come, and skips the rest.

A dump is not atomic: if the ruleset changes while the kernel writes it (a
sync commits), the kernel marks the messages ``NLM_F_DUMP_INTR``; the dump is
then read again (at most ``DUMP_ATTEMPTS`` times in all, then the last one is
used: each counter in it is right, the set of counters may be off by the
sync's changes).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from kproxy.nft.kernel import Counters, NftError
from kproxy.nft.netlink import (
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO,
    NFT_OBJECT_COUNTER,
    NFTA_COUNTER_BYTES,
    NFTA_COUNTER_PACKETS,
    NFTA_OBJ_DATA,
    NFTA_OBJ_NAME,
    NFTA_OBJ_TABLE,
    NFTA_OBJ_TYPE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
)
from kproxy.nft.objects import TABLE, Family

NFT_MSG_GETOBJ = 19
NFT_MSG_NEWOBJ = 18
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
"""NLM_F_ROOT | NLM_F_MATCH."""
NLMSG_DONE = 0x3
NFTA_OBJ_USE = 5
NFTA_OBJ_HANDLE = 6
NLA_TYPE_MASK = 0x3FFF
"""An attribute's type without its NLA_F_NESTED and NLA_F_NET_BYTEORDER bits."""
DUMP_ATTEMPTS = 3
RECV_BYTES = 1 << 16
NAMED_BATCH = 512
"""Requests for one counter each sent at once, at most: fewer where the receive buffer is small (its size over
``ANSWER_FOOTPRINT``)."""
ANSWER_FOOTPRINT = 2048
"""What one queued answer may cost of the receive buffer: the kernel counts each one's whole allocation, not its
110-400 bytes (a node's default rmem_max of 208 KB overflowed at 400 answers with long names)."""
RECV_TIMEOUT = 10.0
"""Seconds to wait for the kernel's next answer (it answers at once; this only bounds a bug)."""
FAMILIES: dict[int, Family] = {number: family for family, number in NFPROTO.items()}
"""nfgenmsg family -> kproxy's family; objects of any other family are skipped."""

_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_NEWOBJ = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ
_TABLE_NAME = TABLE.encode()

# _KERNEL_LAYOUT: how nf_tables_fill_obj_info writes a counter (Linux 4.10 to 6.18 at least, 64-bit values
# unpadded): the table, the name, then at fixed offsets after the name: the type, the handle, the use count
# and the data (bytes, then packets). The attribute headers below are checked before the values are read.
_TABLE_ATTR = _ATTR.pack(4 + len(_TABLE_NAME) + 1, NFTA_OBJ_TABLE) + _TABLE_NAME + b"\0" * (1 + (-len(_TABLE_NAME) - 1) % 4)
_TYPE_HANDLE = _ATTR.pack(8, NFTA_OBJ_TYPE) + _U32.pack(NFT_OBJECT_COUNTER) + _ATTR.pack(12, NFTA_OBJ_HANDLE)
_USE = _ATTR.pack(8, NFTA_OBJ_USE)
_DATA_BYTES = _ATTR.pack(28, NFTA_OBJ_DATA) + _ATTR.pack(12, NFTA_COUNTER_BYTES)
_PACKETS = _ATTR.pack(12, NFTA_COUNTER_PACKETS)


def dump_request(seq: int = 1) -> bytes:
    """The GETOBJ dump request: every counter object of every table named ``kproxy``, any family."""
    payload = (
        _attr(NFTA_OBJ_TABLE, _TABLE_NAME + b"\0")
        + _attr(NFTA_OBJ_TYPE, _U32.pack(NFT_OBJECT_COUNTER))
    )
    nfgen = struct.pack("!BBH", socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    return _HEADER.pack(16 + len(nfgen) + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + nfgen + payload


def get_request(family: Family, name: str, seq: int) -> bytes:
    """A GETOBJ request for one counter object of ``family``'s kproxy table, by name."""
    payload = (
        _attr(NFTA_OBJ_TABLE, _TABLE_NAME + b"\0")
        + _attr(NFTA_OBJ_NAME, name.encode() + b"\0")
        + _attr(NFTA_OBJ_TYPE, _U32.pack(NFT_OBJECT_COUNTER))
    )
    nfgen = struct.pack("!BBH", NFPROTO[family], 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
    return _HEADER.pack(16 + len(nfgen) + len(payload), kind, NLM_F_REQUEST, seq, 0) + nfgen + payload


def _attr(kind: int, payload: bytes) -> bytes:
    return _ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


@dataclass(slots=True)
class DumpState:
    """What the messages of one dump said so far."""

    counters: Counters = field(default_factory=dict)
    done: bool = False
    """NLMSG_DONE was read: the dump is complete."""
    interrupted: bool = False
    """A message carried NLM_F_DUMP_INTR: the ruleset changed during the dump."""
    error: int = 0
    """The errno of an NLMSG_ERROR answer (the request was refused)."""
    skipped: int = 0
    """Objects of the dump that are not counters of ``ip kproxy`` / ``ip6 kproxy`` (none, with the kernel's filter)."""
    answers: int = 0
    """Object and error messages read (for requests of one object each: one answer per request)."""
    missing: int = 0
    """Requests for one object answered ENOENT (the counter is gone), when ``parse_dump`` was given a range."""


def parse_dump(data: bytes | bytearray | memoryview, state: DumpState | None = None,
               seq: int | range | None = None) -> DumpState:
    """Read one buffer of dump answers (whole netlink messages, as one recv returns them) into ``state``.

    Messages of another sequence number than ``seq`` (when given; a range for
    the answers to requests of one object each, where ENOENT only counts as
    ``missing``) are ignored. An object message laid out as this kernel writes
    it (``_KERNEL_LAYOUT``) is read at fixed offsets after its name; any other
    is read attribute by attribute (``_object``).
    """
    state = state if state is not None else DumpState()
    data = data if isinstance(data, bytes) else bytes(data)
    counters = state.counters
    header, attr, u64 = _HEADER.unpack_from, _ATTR.unpack_from, _U64.unpack_from
    starts = data.startswith
    offset, end = 0, len(data)
    while offset + 16 <= end:
        length, kind, flags, message_seq, _ = header(data, offset)
        if length < 16 or offset + length > end:
            raise NftError(f"a truncated netlink message in the counter dump ({length} bytes at {offset} of {end})")
        if seq is not None and (message_seq not in seq if isinstance(seq, range) else message_seq != seq):
            offset += (length + 3) & ~3
            continue
        if flags & NLM_F_DUMP_INTR:
            state.interrupted = True
        if kind == _NEWOBJ:
            family = FAMILIES.get(data[offset + 16]) if length > 20 else None
            found = None
            pos = offset + 20
            if family is not None and starts(_TABLE_ATTR, pos):
                name_size, name_type = attr(data, pos + 12)
                after = pos + 12 + ((name_size + 3) & ~3)
                if (name_type == NFTA_OBJ_NAME and name_size > 4 and after + 56 <= offset + length
                        and starts(_TYPE_HANDLE, after) and starts(_USE, after + 20) and starts(_DATA_BYTES, after + 28)
                        and starts(_PACKETS, after + 44)):
                    name = data[pos + 16 : pos + 12 + name_size].rstrip(b"\0")
                    found = (family, name.decode(errors="replace"), u64(data, after + 48)[0], u64(data, after + 36)[0])
            if found is None:
                found = _object(data, offset, length)
            if found is None:
                state.skipped += 1
            else:
                counters[(found[0], found[1])] = (found[2], found[3])
            state.answers += 1
        elif kind == NLMSG_DONE:
            state.done = True
        elif kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            state.answers += 1
            if code == -errno.ENOENT and isinstance(seq, range):
                state.missing += 1
            elif code:
                state.error = -code
        offset += (length + 3) & ~3
    return state


def _object(data: bytes, offset: int, length: int) -> tuple[Family, str, int, int] | None:
    """(family, name, packets, bytes) of an object message, attribute by attribute; None unless it is a counter of
    ``ip kproxy`` or ``ip6 kproxy``."""
    attr, u64 = _ATTR.unpack_from, _U64.unpack_from
    family = FAMILIES.get(data[offset + 16]) if length > 20 else None
    table = name = None
    object_type = packets = byte_count = -1
    pos, stop = offset + 20, offset + length
    while pos + 4 <= stop:
        size, attr_type = attr(data, pos)
        if size < 4 or pos + size > stop:
            break
        attr_type &= NLA_TYPE_MASK
        if attr_type == NFTA_OBJ_NAME:
            name = data[pos + 4 : pos + size].rstrip(b"\0")
        elif attr_type == NFTA_OBJ_TABLE:
            table = data[pos + 4 : pos + size].rstrip(b"\0")
        elif attr_type == NFTA_OBJ_TYPE and size >= 8:
            (object_type,) = _U32.unpack_from(data, pos + 4)
        elif attr_type == NFTA_OBJ_DATA:
            inner, inner_stop = pos + 4, pos + size
            while inner + 4 <= inner_stop:
                inner_size, inner_type = attr(data, inner)
                if inner_size < 4 or inner + inner_size > inner_stop:
                    break
                inner_type &= NLA_TYPE_MASK
                if inner_type == NFTA_COUNTER_PACKETS and inner_size >= 12:
                    (packets,) = u64(data, inner + 4)
                elif inner_type == NFTA_COUNTER_BYTES and inner_size >= 12:
                    (byte_count,) = u64(data, inner + 4)
                inner += (inner_size + 3) & ~3
        pos += (size + 3) & ~3
    if (family is None or table != _TABLE_NAME or name is None or object_type != NFT_OBJECT_COUNTER
            or packets < 0 or byte_count < 0):
        return None
    return family, name.decode(errors="replace"), packets, byte_count


def parse_messages(buffers: Iterable[bytes], seq: int | None = None) -> DumpState:
    """Every buffer of one dump, in order (see ``parse_dump``)."""
    state = DumpState()
    for data in buffers:
        parse_dump(data, state, seq)
    return state


class CounterDump:
    """A netlink socket that reads kproxy's counters in the current network namespace (one caller at a time)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            try:
                sock.bind((0, 0))
                # Answers come in messages of up to a page or two each; room for a burst of them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.settimeout(RECV_TIMEOUT)  # a dump never blocks a scrape forever
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def read(self) -> Counters:
        """{(family, name): (packets, bytes)} of every counter object in ``ip kproxy`` and ``ip6 kproxy``."""
        state = DumpState()
        for _ in range(DUMP_ATTEMPTS):
            state = self._dump_once()
            if not state.interrupted:
                break
        return state.counters

    def read_named(self, names: Iterable[tuple[Family, str]]) -> Counters:
        """{(family, name): (packets, bytes)} of the named counters only; a counter that is gone is left out.

        One GETOBJ request per counter, sent in batches whose answers fit the
        socket's receive buffer (at most ``NAMED_BATCH``): 200 counters take
        about 2 ms where a dump of 10k takes 40-50 ms, most of it parsing.
        """
        wanted = list(names)
        counters: Counters = {}
        sock = self._socket()
        size = max(1, min(NAMED_BATCH, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // ANSWER_FOOTPRINT))
        try:
            for start in range(0, len(wanted), size):
                batch = wanted[start:start + size]
                first = self._seq % 0x3FFFFFFF + 1
                self._seq = first + len(batch) - 1
                seqs = range(first, first + len(batch))
                sock.sendall(b"".join(get_request(family, name, seq) for seq, (family, name) in zip(seqs, batch, strict=True)))
                state = DumpState()
                while state.answers < len(batch) and not state.error:
                    parse_dump(sock.recv(RECV_BYTES), state, seqs)
                if state.error:
                    raise NftError(f"the kernel refused to read a counter: {os.strerror(state.error)}")
                counters.update(state.counters)
        except OSError as exc:
            self.close()  # answers may still be queued: start afresh
            code = exc.errno or errno.EIO
            raise NftError(f"cannot read the counters over netlink: {os.strerror(code)}") from None
        except NftError:
            self.close()
            raise
        return counters

    def _dump_once(self) -> DumpState:
        sock = self._socket()
        self._seq = self._seq % 0x7FFFFFFF + 1
        seq = self._seq
        try:
            sock.sendall(dump_request(seq))
            state = DumpState()
            while not state.done and not state.error:
                parse_dump(sock.recv(RECV_BYTES), state, seq)
        except OSError as exc:
            # ENOBUFS: answers were lost; the socket may hold the rest of this dump, so start afresh.
            self.close()
            code = exc.errno or errno.EIO
            raise NftError(f"cannot read the counters over netlink: {os.strerror(code)}") from None
        if state.error:
            raise NftError(f"the kernel refused to list the counters: {os.strerror(state.error)}")
        return state
