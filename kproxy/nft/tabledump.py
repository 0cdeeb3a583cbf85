"""kproxy's tables read from nf_tables netlink dumps, into the ``Table`` that ``readback.parse_table`` makes. Pure.

libnftables answers ``list table`` by building its cache of the table (every
chain, rule, set and element as an nft expression tree), then printing it as
JSON, which ``readback`` parses again: at 10k Services, seconds and more than
a gigabyte of memory. The planner needs much less (see ``readback``): names,
kinds and flags of the sets, every element of the static ones as the text
the compiler writes, chain names with the digest comment of their last rule
and their rule count, counters with their comments, the table's comment.
The kernel says all of it in a few dumps, which this module asks for
(``*_request``) and reads (``Answers`` splits the messages of one answer,
``TableParser`` builds one family's ``Table``); ``kproxy.nft.dump`` does the
socket work.

How the elements are decoded
============================
The types come from what the kernel holds for each set, not from the
skeleton: ``NFTA_SET_KEY_TYPE`` and ``NFTA_SET_DATA_TYPE`` carry nft's
datatype ids (a concatenation packs one id per field, 6 bits each, the first
field highest), ``NFTA_SET_KEY_LEN`` / ``NFTA_SET_DATA_LEN`` their lengths,
which must add up (each field of a concatenation fills whole 32-bit words),
and ``NFTA_SET_DESC`` the field lengths of an interval concatenation, checked
too. So a table written by another kproxy (an older skeleton, a set since
renamed or retyped) is read as what it holds, or refused, never decoded with
today's declaration of a set of the same name. The nft layer does not know
the skeleton anyway (it is ``kproxy.rules``' business), and this is exactly
what nft itself prints from.

The one thing a datatype id does not say is the byte order of a plain
``integer`` field: kproxy's only one is the endpoint slot (``typeof ... .
numgen random mod 1``), a host-order 32-bit number. nft records a typeof
declaration in the set's user data (``NFTNL_UDATA_SET_KEY_TYPEOF``: the
expression of each field, by nft's expression type id, which nft itself
must read back from tables written by other releases); an integer field is
read only if that description names ``numgen`` for it.

Decoded are the types kproxy's sets use: ``ipv4_addr``, ``ipv6_addr``
(``inet_ntop``'s spelling, as nft prints them), ``inet_proto`` (by the name
nft takes from /etc/protocols, which ``kproxy.nft.dump`` reads and passes
to ``TableParser``, else as a number; without those names only tcp, udp and
sctp are read), ``inet_service``, ``mark``, numgen's ``integer``, and
verdicts (accept, drop, continue, return, jump and goto a chain).

A set or map of another type (an ``ether_addr`` set, an object map, an
interval map, an integer whose byte order is unknown) is none of kproxy's:
another program added it. It is read without its elements (``unread``:
the Table holds its declaration and no element), which is all the planner
uses of a set it does not declare: it deletes it. Anything else that cannot
be read exactly (a verdict code nft does not write, a value whose lengths,
attributes or padding do not add up) is a ``DumpError``: the backend then
reads the table through libnftables instead (``NftablesBackend.read``). An
element of a set that is read is never dropped nor guessed at.

Rules are not decoded at all (see Speed): another program's rule in one of
kproxy's chains, whatever its expressions, counts in its chain's rule count
and, if it is the last, gives the chain its comment, as nft's JSON does.

Interval sets come back as nft prints them
==========================================
* A single-field interval set (``cluster-cidrs``, ``service-cidrs``: the
  kernel's rbtree) holds the start of each interval and, flagged
  ``NFT_SET_ELEM_INTERVAL_END``, the first value after it (none after an
  interval that runs to the largest value). ``_decompose`` pairs them as
  nft 1.0.6's ``interval_map_decompose`` does: sorted by value (an end
  before a start of the same value), a start without an end before the next
  start closes there, and each interval is written as a single value if it
  holds one, as a prefix if it is one (addresses only), else as ``low-high``;
  with the start's comment. Adjacent intervals stay two elements, as nft
  prints them.
* An interval concatenation (``firewall-allow``: pipapo) holds each element
  as a key and an inclusive ``NFTA_SET_ELEM_KEY_END``; each field is written
  as nft's ``concat_range_aggregate`` writes it: a value where start and end
  agree, else a prefix (addresses) if the range is one, else ``low-high``.
* In a range, nft writes protocols as numbers (``17-132``); a catch-all
  element is ``*``.

What else differs from ``parse_table``
======================================
Only the table's comment: it is read from NFTA_TABLE_USERDATA, which nft
1.0.6 leaves out of its JSON (so ``parse_table`` gives "" there; newer
releases print it). Nothing compares it. A set's flags line is what
nft's JSON prints, ``dynamic`` added to a set with timeouts or a
size (``set_flags``); a rule's anonymous set is not a set of the table.

Speed
=====
At 10k Services the dumps bring 250k elements, 12k chains, 27k rules and
10k counters, 34 MB in all. An element as the kernel lays out kproxy's is
read at fixed offsets, its attribute headers compared with the ones its
set's key and data lengths give (``Dumped.key_head``), and any other
attribute by attribute; each field's text is looked up by its bytes in a
cache shared by every set of the table (``Codec``). Rules are counted, and
only the last one of each chain has its comment read.

A dump is not atomic: each answer says ``NLM_F_DUMP_INTR`` if the ruleset
changed while the kernel wrote it, and ``kproxy.nft.dump`` compares the
ruleset generation before and after all of them (``generation_request``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kproxy.nft.objects import DIGEST_PREFIX, TABLE, Chain, Element, Family, SetDecl, Table


class DumpError(ValueError):
    """What the kernel answered cannot be read exactly: read the table another way."""


# -- nf_tables netlink numbers (linux/netfilter/nf_tables.h, linux/netlink.h) ------------------------

NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x2, 0x4, 0x10
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3FFF
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NFT_MSG_NEWSET, NFT_MSG_GETSET = 9, 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NFTA_TABLE_NAME, NFTA_TABLE_USERDATA = 1, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_USERDATA = 1, 2, 7
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN, NFTA_SET_DATA_TYPE, NFTA_SET_DATA_LEN = 4, 5, 6, 7
NFTA_SET_DESC, NFTA_SET_USERDATA = 9, 13
NFTA_SET_DESC_SIZE, NFTA_SET_DESC_CONCAT, NFTA_SET_FIELD_LEN = 1, 2, 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFTA_SET_ELEM_USERDATA, NFTA_SET_ELEM_OBJREF, NFTA_SET_ELEM_KEY_END = 6, 9, 10
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_USERDATA = 1, 2, 3, 8
NFTA_GEN_ID = 1
NFT_OBJECT_COUNTER = 1
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL, NFT_SET_MAP = 0x1, 0x2, 0x4, 0x8
NFT_SET_TIMEOUT, NFT_SET_EVAL, NFT_SET_OBJECT, NFT_SET_CONCAT = 0x10, 0x20, 0x40, 0x80
NFT_SET_ELEM_INTERVAL_END, NFT_SET_ELEM_CATCHALL = 0x1, 0x2
NFT_DATA_VERDICT = 0xFFFFFF00
FAMILY_NUMBERS: dict[Family, int] = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}

# User data (libnftnl's TLVs: one byte of type, one of length): the comment is type 0 for tables, chains, rules,
# elements and objects; a set's holds its typeof description.
NFTNL_UDATA_COMMENT = 0
NFTNL_UDATA_SET_KEY_TYPEOF, NFTNL_UDATA_SET_DATA_TYPEOF = 3, 4
NFTNL_UDATA_SET_TYPEOF_EXPR, NFTNL_UDATA_SET_TYPEOF_DATA = 0, 1
NFT_EXPR_CONCAT, NFT_EXPR_NUMGEN = 13, 23
"""nft's expression type ids in a typeof description (``enum expr_types``, stored in the kernel: stable)."""

# nft's datatype ids (``enum datatypes``, stored in the kernel as NFTA_SET_KEY_TYPE: stable).
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_MARK = 4, 7, 8, 12, 13, 19
TYPE_BITS = 6

VERDICTS = {0: "drop", 1: "accept", -1: "continue", -5: "return"}
JUMPS = {-3: "jump", -4: "goto"}
PROTOCOL_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}
"""What nft prints for the protocols kproxy writes (it looks any other up in /etc/protocols)."""

_HEADER = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_HOST_U32 = struct.Struct("=I")
_I32_HOST = struct.Struct("=i")


# -- requests -----------------------------------------------------------------------------------------

def attribute(kind: int, payload: bytes) -> bytes:
    return _ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def request(message: int, family: int, flags: int, seq: int, payload: bytes = b"") -> bytes:
    """One nf_tables request: netlink header, nfgenmsg (family, version 0, resource id 0), attributes."""
    body = struct.pack("!BBH", family, 0, 0) + payload
    return _HEADER.pack(16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | message, flags, seq, 0) + body


def generation_request(seq: int) -> bytes:
    """NFT_MSG_GETGEN: the ruleset's generation id (answered with NFT_MSG_NEWGEN, then an ACK)."""
    return request(NFT_MSG_GETGEN, socket.AF_UNSPEC, NLM_F_REQUEST | NLM_F_ACK, seq)


def table_request(family: Family, seq: int) -> bytes:
    """NFT_MSG_GETTABLE of ``FAMILY kproxy`` (answered with the table, then an ACK; ENOENT if there is none)."""
    return request(NFT_MSG_GETTABLE, FAMILY_NUMBERS[family], NLM_F_REQUEST | NLM_F_ACK, seq,
                   attribute(NFTA_TABLE_NAME, _string(TABLE)))


def sets_request(family: Family, seq: int) -> bytes:
    """Dump the sets and maps of ``FAMILY kproxy`` (the kernel filters by table)."""
    return request(NFT_MSG_GETSET, FAMILY_NUMBERS[family], NLM_F_REQUEST | NLM_F_DUMP, seq,
                   attribute(NFTA_SET_TABLE, _string(TABLE)))


def elements_request(family: Family, name: str, seq: int) -> bytes:
    """Dump the elements of one set or map."""
    payload = attribute(NFTA_SET_ELEM_LIST_TABLE, _string(TABLE)) + attribute(NFTA_SET_ELEM_LIST_SET, _string(name))
    return request(NFT_MSG_GETSETELEM, FAMILY_NUMBERS[family], NLM_F_REQUEST | NLM_F_DUMP, seq, payload)


def chains_request(family: Family, seq: int) -> bytes:
    """Dump the chains of the family (the kernel does not filter chain dumps by table: the parser does)."""
    return request(NFT_MSG_GETCHAIN, FAMILY_NUMBERS[family], NLM_F_REQUEST | NLM_F_DUMP, seq)


def rules_request(family: Family, seq: int) -> bytes:
    """Dump the rules of ``FAMILY kproxy`` (the kernel filters by table), chain by chain, each in order."""
    return request(NFT_MSG_GETRULE, FAMILY_NUMBERS[family], NLM_F_REQUEST | NLM_F_DUMP, seq,
                   attribute(NFTA_RULE_TABLE, _string(TABLE)))


# -- answers ------------------------------------------------------------------------------------------

Handler = Callable[[int, int, bytes, int, int], None]
"""(nf_tables message type, nfgenmsg family, buffer, start of the attributes, end of the message)."""


@dataclass(slots=True)
class Answers:
    """The messages answering one request, as they come, buffer by buffer (``feed``).

    Messages of other sequence numbers are skipped. The answer is complete
    (``finished``) at NLMSG_DONE (a dump), at the ACK (a request with
    NLM_F_ACK) or at an error (``error``: its errno).
    """

    seq: int
    handle: Handler
    finished: bool = False
    error: int = 0
    interrupted: bool = False
    """A message carried NLM_F_DUMP_INTR: the ruleset changed while the kernel wrote the dump."""

    def feed(self, data: bytes) -> None:
        offset, end = 0, len(data)
        header = _HEADER.unpack_from
        while offset + 16 <= end:
            length, kind, flags, seq, _ = header(data, offset)
            if length < 16 or offset + length > end:
                raise DumpError(f"a truncated netlink message ({length} bytes at {offset} of {end})")
            if seq == self.seq and not self.finished:
                if flags & NLM_F_DUMP_INTR:
                    self.interrupted = True
                if kind == NLMSG_ERROR or kind == NLMSG_DONE:
                    code = _I32_HOST.unpack_from(data, offset + 16)[0] if length >= 20 else 0
                    self.error = -code if code < 0 else 0
                    self.finished = True
                elif kind >> 8 == NFNL_SUBSYS_NFTABLES and length >= 20:
                    self.handle(kind & 0xFF, data[offset + 16], data, offset + 20, offset + length)
            offset += (length + 3) & ~3


def finishes(data: bytes, seq: int) -> bool:
    """Whether a buffer holds the end of the answer to request ``seq``: NLMSG_DONE, or NLMSG_ERROR (an error, or
    the ACK of a request that asked for one). Only the headers are read."""
    offset, end = 0, len(data)
    header = _HEADER.unpack_from
    while offset + 16 <= end:
        length, kind, _, message_seq, _ = header(data, offset)
        if length < 16:
            return True  # malformed: the parser says so
        if message_seq == seq and kind in (NLMSG_DONE, NLMSG_ERROR):
            return True
        offset += (length + 3) & ~3
    return False


def attributes(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Top-level attributes between ``start`` and ``end``: type -> (start, end) of the payload; the last one of a
    type wins (nf_tables sends each once)."""
    found: dict[int, tuple[int, int]] = {}
    unpack = _ATTR.unpack_from
    pos = start
    while pos + 4 <= end:
        size, kind = unpack(data, pos)
        if size < 4 or pos + size > end:
            raise DumpError(f"a malformed attribute ({size} bytes at {pos}, the message ends at {end})")
        found[kind & NLA_TYPE_MASK] = (pos + 4, pos + size)
        pos += (size + 3) & ~3
    return found


def _text(data: bytes, span: tuple[int, int] | None) -> str:
    if span is None:
        return ""
    raw = data[span[0] : span[1]]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _u32(data: bytes, span: tuple[int, int] | None, what: str) -> int:
    if span is None or span[1] - span[0] != 4:
        raise DumpError(f"{what}: not a 32-bit value")
    return int(_U32.unpack_from(data, span[0])[0])


def udata(raw: bytes) -> dict[int, bytes]:
    """libnftnl user data: one byte of type, one of length, the value; the last one of a type wins."""
    found: dict[int, bytes] = {}
    pos = 0
    while pos + 2 <= len(raw):
        kind, size = raw[pos], raw[pos + 1]
        if pos + 2 + size > len(raw):
            raise DumpError(f"malformed user data ({size} bytes at {pos} of {len(raw)})")
        found[kind] = raw[pos + 2 : pos + 2 + size]
        pos += 2 + size
    return found


def comment_of(raw: bytes) -> str:
    """The comment in the user data of a table, chain, rule, element or object ("" if none)."""
    value = udata(raw).get(NFTNL_UDATA_COMMENT)
    return "" if value is None else value.split(b"\0", 1)[0].decode(errors="replace")


def digest_of(note: str) -> str:
    """The chain digest a rule comment carries ("" unless it is ``kproxy-rules=`` and an upper-case hex-like word),
    as ``readback.parse_table`` reads it."""
    tail = note[len(DIGEST_PREFIX):] if note.startswith(DIGEST_PREFIX) else ""
    return tail if tail.isalnum() and tail.isascii() and tail.upper() == tail else ""


# -- field types ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FieldType:
    """One field of a key or of map data, as nft prints it."""

    name: str
    width: int
    """Bytes of the value (a field of a concatenation fills whole 32-bit words, padded with zeros)."""
    text: Callable[[bytes], str]
    big_endian: bool = True
    prefix: bool = False
    """nft writes a range of it that is a prefix as ``address/length``."""
    bound: Callable[[bytes], str] | None = None
    """The text of either end of a range, if not ``text``: nft prints protocols in ranges as numbers."""

    def bound_text(self, raw: bytes) -> str:
        return (self.bound or self.text)(raw)

    def number(self, raw: bytes) -> int:
        return int.from_bytes(raw, "big" if self.big_endian else "little")

    def value(self, number: int) -> bytes:
        return number.to_bytes(self.width, "big" if self.big_endian else "little")


def _ipv4(raw: bytes) -> str:
    return "{}.{}.{}.{}".format(*raw)  # as inet_ntop writes it, at a third of its cost


def _ipv6(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, raw)


def _protocol(raw: bytes) -> str:
    name = PROTOCOL_NAMES.get(raw[0])
    if name is None:
        raise DumpError(f"protocol number {raw[0]}: nft would print its /etc/protocols name, which is not read here")
    return name


def protocol_type(names: Mapping[int, str]) -> FieldType:
    """``inet_proto`` as nft prints it with these protocol names (``/etc/protocols``: ``kproxy.nft.dump`` reads it):
    a number's name, or the number if it has none."""

    def text(raw: bytes) -> str:
        return names.get(raw[0]) or str(raw[0])

    return FieldType("inet_proto", 1, text, bound=_big_number)


def _big_number(raw: bytes) -> str:
    return str(int.from_bytes(raw, "big"))


def _host_number(raw: bytes) -> str:
    return str(_HOST_U32.unpack(raw)[0])


IPV4 = FieldType("ipv4_addr", 4, _ipv4, prefix=True)
IPV6 = FieldType("ipv6_addr", 16, _ipv6, prefix=True)
PROTOCOL = FieldType("inet_proto", 1, _protocol, bound=_big_number)
SERVICE = FieldType("inet_service", 2, _big_number)
MARK = FieldType("mark", 4, _host_number, big_endian=False)
NUMGEN = FieldType("integer (numgen)", 4, _host_number, big_endian=False)
TYPES: dict[int, FieldType] = {
    TYPE_IPADDR: IPV4,
    TYPE_IP6ADDR: IPV6,
    TYPE_INET_PROTOCOL: PROTOCOL,
    TYPE_INET_SERVICE: SERVICE,
    TYPE_MARK: MARK,
}


def type_ids(value: int) -> list[int]:
    """The datatype id of each field of a (possibly concatenated) type, first field first."""
    ids: list[int] = []
    while value:
        ids.append(value & ((1 << TYPE_BITS) - 1))
        value >>= TYPE_BITS
    return ids[::-1]


def typeof_exprs(raw: bytes | None) -> list[int] | None:
    """nft's expression type id of each field of a typeof description (NFTNL_UDATA_SET_*_TYPEOF), or None."""
    if raw is None:
        return None
    top = udata(raw)
    expr = top.get(NFTNL_UDATA_SET_TYPEOF_EXPR)
    if expr is None or len(expr) != 4:
        return None
    (kind,) = _HOST_U32.unpack(expr)
    if kind != NFT_EXPR_CONCAT:
        return [kind]
    inner = udata(top.get(NFTNL_UDATA_SET_TYPEOF_DATA, b""))
    fields: list[int] = []
    for index in range(len(inner)):
        part = udata(inner.get(index, b"")).get(NFTNL_UDATA_SET_TYPEOF_EXPR)
        if part is None or len(part) != 4:
            return None
        fields.append(_HOST_U32.unpack(part)[0])
    return fields


def layout(type_value: int, length: int, typeof: list[int] | None, what: str,
           lengths: list[int] | None = None, types: Mapping[int, FieldType] = TYPES) -> tuple[FieldType, ...]:
    """The fields of a key or of map data, from the kernel's datatype id and length; DumpError unless every field
    is a known type and the lengths add up."""
    ids = type_ids(type_value)
    if not ids:
        raise DumpError(f"{what}: no datatype")
    fields: list[FieldType] = []
    for index, type_id in enumerate(ids):
        if type_id == TYPE_INTEGER:
            if typeof is None or len(typeof) != len(ids) or typeof[index] != NFT_EXPR_NUMGEN:
                raise DumpError(f"{what}: field {index + 1} is an integer other than numgen's (byte order unknown)")
            fields.append(NUMGEN)
        elif type_id in types:
            fields.append(types[type_id])
        else:
            raise DumpError(f"{what}: field {index + 1} has datatype {type_id}, which is not decoded here")
    expected = fields[0].width if len(fields) == 1 else sum((f.width + 3) & ~3 for f in fields)
    if length != expected:
        raise DumpError(f"{what}: {length} bytes for {' . '.join(f.name for f in fields)} ({expected} expected)")
    if lengths is not None and lengths != [f.width for f in fields]:
        raise DumpError(f"{what}: the kernel's field lengths {lengths} are not those of "
                        f"{' . '.join(f.name for f in fields)}")
    return tuple(fields)


Decoder = Callable[[bytes], str]


class Codec:
    """Bytes of a key or of map data to nft's text (``text``, which takes exactly ``size`` bytes).

    Each field is looked up by its bytes (its slot, padding included) in a
    cache of its type's texts, shared by every set of the table: the values
    repeat (a frontend's address, protocol and port in each of its slots and
    in several sets, an endpoint's address in the endpoint maps and in
    hairpin, ports, slots), and decoding is most of the cost of 250k
    elements. A slot is decoded, its padding checked to be zeros, only the
    first time its bytes are seen.
    """

    __slots__ = ("fields", "offsets", "size", "text")

    def __init__(self, fields: tuple[FieldType, ...], caches: dict[str, dict[bytes, str]] | None = None) -> None:
        self.fields = fields
        self.offsets: list[int] = []
        offset = 0
        for item in fields:
            self.offsets.append(offset)
            offset += (item.width + 3) & ~3
        self.size = fields[0].width if len(fields) == 1 else offset
        caches = {} if caches is None else caches
        slots = [(start, start + (self.size if len(fields) == 1 else (item.width + 3) & ~3),
                  caches.setdefault(item.name, {}), _padded(item) if len(fields) > 1 and item.width % 4 else item.text)
                 for item, start in zip(fields, self.offsets, strict=True)]
        self.text: Decoder = _joined(slots)

    def value(self, index: int, raw: bytes) -> bytes:
        """One field's value from its slot of a concatenation (the value, then zeros) or a whole single value."""
        item = self.fields[index]
        if len(raw) > item.width and any(raw[item.width:]):
            raise DumpError(f"non-zero padding after a {item.name} field: {raw.hex()}")
        return raw[: item.width]

    def field(self, index: int, raw: bytes) -> str:
        """One field's text from its slot (see ``value``)."""
        return self.fields[index].text(self.value(index, raw))

    def parts(self, raw: bytes) -> list[bytes]:
        """The slot of each field."""
        bounds = [*self.offsets, len(raw)]
        return [raw[bounds[i] : bounds[i + 1]] for i in range(len(self.fields))]


Slot = tuple[int, int, dict[bytes, str], Decoder]
"""Where a field's slot is in a key, its type's cache, and how to decode it."""


def _joined(slots: list[Slot]) -> Decoder:
    """A decoder that writes the fields' texts joined by `` . ``: written out for up to four fields (the hot path)."""
    if not slots:
        return _nothing
    if len(slots) == 1:
        ((s0, e0, c0, d0),) = slots

        def one(raw: bytes) -> str:
            part = raw[s0:e0]
            text = c0.get(part)
            if text is None:
                text = c0[part] = d0(part)
            return text

        return one
    if len(slots) == 2:
        (s0, e0, c0, d0), (s1, e1, c1, d1) = slots

        def two(raw: bytes) -> str:
            part = raw[s0:e0]
            a = c0.get(part)
            if a is None:
                a = c0[part] = d0(part)
            part = raw[s1:e1]
            b = c1.get(part)
            if b is None:
                b = c1[part] = d1(part)
            return f"{a} . {b}"

        return two
    if len(slots) == 3:
        (s0, e0, c0, d0), (s1, e1, c1, d1), (s2, e2, c2, d2) = slots

        def three(raw: bytes) -> str:
            part = raw[s0:e0]
            a = c0.get(part)
            if a is None:
                a = c0[part] = d0(part)
            part = raw[s1:e1]
            b = c1.get(part)
            if b is None:
                b = c1[part] = d1(part)
            part = raw[s2:e2]
            c = c2.get(part)
            if c is None:
                c = c2[part] = d2(part)
            return f"{a} . {b} . {c}"

        return three
    if len(slots) == 4:
        (s0, e0, c0, d0), (s1, e1, c1, d1), (s2, e2, c2, d2), (s3, e3, c3, d3) = slots

        def four(raw: bytes) -> str:
            part = raw[s0:e0]
            a = c0.get(part)
            if a is None:
                a = c0[part] = d0(part)
            part = raw[s1:e1]
            b = c1.get(part)
            if b is None:
                b = c1[part] = d1(part)
            part = raw[s2:e2]
            c = c2.get(part)
            if c is None:
                c = c2[part] = d2(part)
            part = raw[s3:e3]
            d = c3.get(part)
            if d is None:
                d = c3[part] = d3(part)
            return f"{a} . {b} . {c} . {d}"

        return four

    def many(raw: bytes) -> str:
        texts = []
        for start, end, cache, decode in slots:
            part = raw[start:end]
            text = cache.get(part)
            if text is None:
                text = cache[part] = decode(part)
            texts.append(text)
        return " . ".join(texts)

    return many


def _padded(item: FieldType) -> Decoder:
    """The decoder of a field's slot in a concatenation, its value followed by zeros to a 32-bit word."""
    width, zeros, text = item.width, b"\0" * ((-item.width) % 4), item.text

    def decode(raw: bytes) -> str:
        if raw[width:] != zeros:
            raise DumpError(f"non-zero padding after a {item.name} field: {raw.hex()}")
        return text(raw[:width])

    return decode


def _nothing(raw: bytes) -> str:
    raise DumpError("a value of a set without a type")


def verdict(data: bytes, span: tuple[int, int]) -> str:
    """A verdict (NFTA_DATA_VERDICT's payload) as nft writes it: ``drop``, ``goto CHAIN``, ..."""
    found = attributes(data, *span)
    code_span = found.get(NFTA_VERDICT_CODE)
    if code_span is None or code_span[1] - code_span[0] != 4:
        raise DumpError("a verdict without its code")
    (code,) = _I32.unpack_from(data, code_span[0])
    if code in VERDICTS:
        return VERDICTS[code]
    if code in JUMPS and NFTA_VERDICT_CHAIN in found:
        return f"{JUMPS[code]} {_text(data, found[NFTA_VERDICT_CHAIN])}"
    raise DumpError(f"verdict code {code} is not decoded here")


# -- sets and their elements -----------------------------------------------------------------------------

@dataclass(slots=True)
class Dumped:
    """One set or map as the kernel describes it, and what its elements dump said so far."""

    decl: SetDecl
    flags: int
    key: Codec
    data: Codec | None
    """None for a set and for a verdict map (``verdicts``)."""
    verdicts: bool
    elements: dict[str, Element] = field(default_factory=dict)
    bounds: list[tuple[int, bool, bytes, str]] = field(default_factory=list)
    """A single-field interval set: (value, is an interval end, key bytes, comment) of each kernel element."""
    catchall: Element | None = None
    values: dict[bytes, str] = field(default_factory=dict)
    """A verdict map's data (NFTA_SET_ELEM_DATA's payload) -> its text (``drop``, ``goto ...``)."""
    key_head: bytes = b""
    """The headers of NFTA_SET_ELEM_KEY and its NFTA_DATA_VALUE for this set's key length, as the kernel writes them."""
    data_head: bytes = b""
    """The same for NFTA_SET_ELEM_DATA of a map with values."""

    def __post_init__(self) -> None:
        # A nest's length counts the padding of what it holds; a value's does not.
        if self.key.fields:
            size = self.key.size
            self.key_head = _ATTR.pack(8 + ((size + 3) & ~3), NFTA_SET_ELEM_KEY) + _ATTR.pack(4 + size, NFTA_DATA_VALUE)
        if self.data is not None:
            size = self.data.size
            self.data_head = _ATTR.pack(8 + ((size + 3) & ~3), NFTA_SET_ELEM_DATA) + _ATTR.pack(4 + size, NFTA_DATA_VALUE)

    @property
    def rbtree(self) -> bool:
        """Intervals as start and end elements (a single-field interval set)."""
        return bool(self.flags & NFT_SET_INTERVAL) and len(self.key.fields) == 1

    @property
    def ranges(self) -> bool:
        """Elements with a key and an inclusive key end (an interval concatenation)."""
        return bool(self.flags & NFT_SET_INTERVAL) and len(self.key.fields) > 1


def set_flags(flags: int, sized: bool = False) -> tuple[str, ...]:
    """The ``flags`` line of a set read back: what nft's JSON prints (``constant``, ``interval``, ``timeout``,
    ``dynamic``), with ``dynamic`` added to a set with timeouts or a size (``sized``) as ``readback.parse_table``
    does."""
    names = [name for bit, name in ((NFT_SET_CONSTANT, "constant"), (NFT_SET_INTERVAL, "interval"),
                                    (NFT_SET_TIMEOUT, "timeout"), (NFT_SET_EVAL, "dynamic")) if flags & bit]
    if ("timeout" in names or sized) and "dynamic" not in names:
        names.append("dynamic")
    return (f"flags {','.join(names)}",) if names else ()


def _range_mask_len(start: int, end: int, bits: int) -> int:
    """The prefix length of [start, end] if it is exactly one prefix, else -1 (nft's ``range_mask_len``)."""
    while start <= end and not start & 1 and end & 1 and bits > 0:
        start >>= 1
        end >>= 1
        bits -= 1
    return bits if start == end else -1


def _interval_text(item: FieldType, low: bytes, size: int) -> str:
    """[low, low + size] as nft 1.0.6's ``interval_map_decompose`` writes it: a value, a prefix or a range."""
    start = item.number(low)
    if size == 0:
        return item.text(low)
    if not (size + 1) & size and not start & size and item.prefix:
        return f"{item.text(low)}/{item.width * 8 - size.bit_length()}"
    return f"{item.bound_text(low)}-{item.bound_text(item.value(start + size))}"


def _decompose(dumped: Dumped) -> list[Element]:
    """The elements nft prints for a single-field interval set's start and end elements (see the module docstring)."""
    item = dumped.key.fields[0]
    bounds = sorted(dumped.bounds, key=lambda b: (b[0], not b[1]))
    ranges: list[tuple[int, bool, bytes, str]] = []
    open_interval = False
    for bound in bounds:
        if bound[1]:
            open_interval = False
        elif open_interval:
            ranges.append((bound[0], True, bound[2], ""))  # a start right after a start closes the one before
        else:
            open_interval = True
        ranges.append(bound)
    found: list[Element] = []
    low: tuple[int, bool, bytes, str] | None = None
    for bound in ranges:
        if low is None:
            if not bound[1]:
                low = bound
            continue
        found.append(Element(_interval_text(item, low[2], bound[0] - low[0] - 1), "", low[3]))
        if bound[1]:
            low = None
    if low is not None:  # runs to the largest value
        top = (1 << (item.width * 8)) - 1
        found.append(Element(_interval_text(item, low[2], top - low[0]), "", low[3]))
    if dumped.catchall is not None:
        found.append(dumped.catchall)
    return found


def _range_key(codec: Codec, start: bytes, end: bytes) -> str:
    """An interval concatenation's key and key end, field by field, as nft's ``concat_range_aggregate`` writes it."""
    texts = []
    for index, (low, high) in enumerate(zip(codec.parts(start), codec.parts(end), strict=True)):
        if low == high:
            texts.append(codec.field(index, low))
            continue
        item = codec.fields[index]
        low, high = codec.value(index, low), codec.value(index, high)
        length = _range_mask_len(item.number(low), item.number(high), item.width * 8)
        if length >= 0 and item.prefix:
            texts.append(f"{item.text(low)}/{length}")
        else:
            texts.append(f"{item.bound_text(low)}-{item.bound_text(high)}")
    return " . ".join(texts)


# -- one family's table ---------------------------------------------------------------------------------

_GOTO = struct.pack("=H", NFTA_DATA_VERDICT) + _ATTR.pack(8, NFTA_VERDICT_CODE) + _I32.pack(-4)
_CHAIN = struct.pack("=H", NFTA_VERDICT_CHAIN)
_ELEMENT_KEY = Element.__dict__["key"].__set__
_ELEMENT_VALUE = Element.__dict__["value"].__set__
_ELEMENT_COMMENT = Element.__dict__["comment"].__set__


class TableParser:
    """One family's ``Table`` from the answers to the dump requests, fed as they come.

    ``table``, ``set``, ``elements``, ``chain``, ``rule`` and ``counter`` are
    ``Answers`` handlers for the answers to ``table_request``,
    ``sets_request``, ``elements_request``, ``chains_request``,
    ``rules_request`` and the counter objects' dump (of both families: others
    are skipped); ``finish`` returns the Table.
    """

    def __init__(self, family: Family, protocols: Mapping[int, str] | None = None) -> None:
        """``protocols``: the names nft prints protocol numbers with (``/etc/protocols``); without them, a protocol
        other than tcp, udp and sctp is a DumpError."""
        self.family = family
        self._types: Mapping[int, FieldType] = TYPES if protocols is None else {
            **TYPES, TYPE_INET_PROTOCOL: protocol_type(protocols)}
        self._number = FAMILY_NUMBERS[family]
        self.exists = False
        self.table_comment = ""
        self.sets: dict[str, Dumped] = {}
        self.chains: dict[str, None] = {}
        """Chain names, in the kernel's order."""
        self.rules: dict[str, int] = {}
        self.last_notes: dict[str, bytes] = {}
        self.counters: dict[str, str] = {}
        self.unread: dict[str, str] = {}
        """Sets and maps of types not decoded here (kproxy declares none: another program's), and why: their
        elements are not read, and the Table has none for them."""
        self._comments: dict[bytes, str] = {}
        self._caches: dict[str, dict[bytes, str]] = {}
        """The texts of the fields seen so far, by type (see ``Codec``)."""

    def _ours(self, family: int, data: bytes, span: tuple[int, int] | None) -> bool:
        return family == self._number and span is not None and data[span[0] : span[1]].rstrip(b"\0") == TABLE.encode()

    # -- handlers ---------------------------------------------------------------------------------

    def table(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        found = attributes(data, start, end)
        if message != NFT_MSG_NEWTABLE or not self._ours(family, data, found.get(NFTA_TABLE_NAME)):
            return
        self.exists = True
        note = found.get(NFTA_TABLE_USERDATA)
        self.table_comment = comment_of(data[note[0] : note[1]]) if note else ""

    def set(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        found = attributes(data, start, end)
        if message != NFT_MSG_NEWSET or not self._ours(family, data, found.get(NFTA_SET_TABLE)):
            return
        name = _text(data, found.get(NFTA_SET_NAME))
        flags = _u32(data, found.get(NFTA_SET_FLAGS), f"set {name}: flags") if NFTA_SET_FLAGS in found else 0
        if flags & NFT_SET_ANONYMOUS:
            return  # a rule's inline set: nft lists it inside the rule
        what = f"{self.family} set {name}"
        desc = found.get(NFTA_SET_DESC)
        sized = desc is not None and NFTA_SET_DESC_SIZE in attributes(data, *desc)
        decl = SetDecl("map" if flags & (NFT_SET_MAP | NFT_SET_OBJECT) else "set", name, set_flags(flags, sized))
        note = found.get(NFTA_SET_USERDATA)
        user = udata(data[note[0] : note[1]]) if note else {}
        if decl.dynamic:  # the datapath's: its elements are not read, nor its types needed
            self.sets[name] = Dumped(decl, flags, Codec(()), None, False)
            return
        try:
            self.sets[name] = self._typed(decl, flags, data, found, user, what)
        except DumpError as exc:  # not kproxy's: the planner deletes it, whatever it holds
            self.sets[name] = Dumped(decl, flags, Codec(()), None, False)
            self.unread[name] = str(exc)

    def _typed(self, decl: SetDecl, flags: int, data: bytes, found: dict[int, tuple[int, int]], user: dict[int, bytes],
               what: str) -> Dumped:
        """A static set whose elements are read, with the decoders of its key and data; DumpError if its types are
        not decoded here."""
        if flags & NFT_SET_OBJECT:
            raise DumpError(f"{what}: an object map, which is not decoded here")
        if flags & NFT_SET_INTERVAL and flags & NFT_SET_MAP:
            raise DumpError(f"{what}: an interval map, which is not decoded here")
        lengths = self._field_lengths(data, found.get(NFTA_SET_DESC), what)
        key = layout(_u32(data, found.get(NFTA_SET_KEY_TYPE), f"{what}: key type"),
                     _u32(data, found.get(NFTA_SET_KEY_LEN), f"{what}: key length"),
                     typeof_exprs(user.get(NFTNL_UDATA_SET_KEY_TYPEOF)), f"{what}: key", lengths, self._types)
        data_codec, verdicts = None, False
        if flags & NFT_SET_MAP:
            data_type = _u32(data, found.get(NFTA_SET_DATA_TYPE), f"{what}: data type")
            if data_type == NFT_DATA_VERDICT:
                verdicts = True
            else:
                data_codec = Codec(layout(data_type, _u32(data, found.get(NFTA_SET_DATA_LEN), f"{what}: data length"),
                                          typeof_exprs(user.get(NFTNL_UDATA_SET_DATA_TYPEOF)), f"{what}: data",
                                          types=self._types),
                                   self._caches)
        return Dumped(decl, flags, Codec(key, self._caches), data_codec, verdicts)

    @staticmethod
    def _field_lengths(data: bytes, span: tuple[int, int] | None, what: str) -> list[int] | None:
        """The field lengths NFTA_SET_DESC gives for an interval concatenation, or None."""
        if span is None:
            return None
        concat = attributes(data, *span).get(NFTA_SET_DESC_CONCAT)
        if concat is None:
            return None
        lengths = []
        pos, stop = concat
        while pos + 4 <= stop:
            size, _ = _ATTR.unpack_from(data, pos)
            if size < 4 or pos + size > stop:
                raise DumpError(f"{what}: a malformed field description")
            lengths.append(_u32(data, attributes(data, pos + 4, pos + size).get(NFTA_SET_FIELD_LEN), f"{what}: field"))
            pos += (size + 3) & ~3
        return lengths

    def element_sets(self) -> list[str]:
        """The sets and maps whose elements are read: every one but the dynamic ones and those of types not decoded
        here (``unread``)."""
        return [name for name, dumped in self.sets.items() if not dumped.decl.dynamic and name not in self.unread]

    def elements(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        """One NFT_MSG_NEWSETELEM message of an elements dump: up to 32 KB of elements of one set."""
        found = attributes(data, start, end)
        if message != NFT_MSG_NEWSETELEM or not self._ours(family, data, found.get(NFTA_SET_ELEM_LIST_TABLE)):
            return
        name = _text(data, found.get(NFTA_SET_ELEM_LIST_SET))
        dumped = self.sets.get(name)
        if dumped is None or dumped.decl.dynamic:
            raise DumpError(f"{self.family}: elements of {name!r}, which is not a static set the set dump listed")
        span = found.get(NFTA_SET_ELEM_LIST_ELEMENTS)
        if span is not None:
            self._elements(dumped, data, *span)

    def _elements(self, dumped: Dumped, data: bytes, pos: int, stop: int) -> None:
        """The hot loop: 250k elements at 10k Services.

        An element laid out as the kernel writes kproxy's (the key, the data
        of a map, then the comment, if any) is read at fixed offsets, its
        headers checked; any other is read attribute by attribute
        (``_element``), as are those of interval sets. Comments, verdicts and
        the values of each field (``Codec``) are decoded once each.
        """
        unpack, starts = _ATTR.unpack_from, data.startswith
        elements, comments, values = dumped.elements, self._comments, dumped.values
        key_text, key_size, key_head = dumped.key.text, dumped.key.size, dumped.key_head
        data_head, verdicts = dumped.data_head, dumped.verdicts
        data_size = dumped.data.size if dumped.data is not None else 0
        data_text = dumped.data.text if dumped.data is not None else str
        key_step = 8 + ((key_size + 3) & ~3)
        data_step = 8 + ((data_size + 3) & ~3)
        fixed = bool(key_head) and not (dumped.rbtree or dumped.ranges)
        new, set_key, set_value, set_comment = object.__new__, _ELEMENT_KEY, _ELEMENT_VALUE, _ELEMENT_COMMENT
        while pos + 4 <= stop:
            size, kind = unpack(data, pos)
            end = pos + size
            if size < 4 or end > stop:
                raise DumpError(f"set {dumped.decl.name}: a malformed element list")
            if fixed and kind == NFTA_LIST_ELEM and starts(key_head, pos + 4):
                at = pos + 4 + key_step
                value = None
                if data_head:
                    if starts(data_head, at):
                        at += data_step
                    else:
                        at = -1
                elif verdicts:
                    value_size, value_kind = unpack(data, at) if at + 4 <= end else (0, 0)
                    if value_kind & NLA_TYPE_MASK == NFTA_SET_ELEM_DATA and 4 <= value_size <= end - at:
                        value = data[at + 4 : at + value_size]
                        at += (value_size + 3) & ~3
                    else:
                        at = -1
                if at > end:
                    at = -1
                comment = ""
                if at != end and at > 0:
                    rest = data[at:end]
                    found = comments.get(rest)
                    if found is None:
                        note_size, note_kind = unpack(data, at)
                        if note_kind & NLA_TYPE_MASK == NFTA_SET_ELEM_USERDATA and (note_size + 3) & ~3 == end - at:
                            found = comments[rest] = comment_of(data[at + 4 : at + note_size])
                        else:
                            at = -1
                    comment = found or ""
                if at > 0:
                    text = key_text(data[pos + 12 : pos + 12 + key_size])
                    value_text = ""
                    if data_head:  # checked: the value's bytes follow the 4-byte header of NFTA_DATA_VALUE
                        value_text = data_text(data[at - data_step + 8 : at - data_step + 8 + data_size])
                    elif value is not None:  # a verdict
                        value_text = values.get(value) or self._value(dumped, value)
                    element = new(Element)  # as Element(text, value_text, comment), without the frozen __init__'s cost
                    set_key(element, text)
                    set_value(element, value_text)
                    set_comment(element, comment)
                    elements[text] = element
                    pos += (size + 3) & ~3
                    continue
            if kind & NLA_TYPE_MASK == NFTA_LIST_ELEM:
                self._element(dumped, data, pos + 4, end)
            pos += (size + 3) & ~3

    def _element(self, dumped: Dumped, data: bytes, at: int, end: int) -> None:
        """One element, attribute by attribute (in any order)."""
        unpack = _ATTR.unpack_from
        key = value = key_end = None
        note = b""
        flags = 0
        while at + 4 <= end:
            attr_size, attr_kind = unpack(data, at)
            if attr_size < 4 or at + attr_size > end:
                raise DumpError(f"set {dumped.decl.name}: a malformed element")
            attr_kind &= NLA_TYPE_MASK
            if attr_kind == NFTA_SET_ELEM_KEY or attr_kind == NFTA_SET_ELEM_KEY_END:
                inner_size, inner_kind = unpack(data, at + 4) if attr_size >= 8 else (0, 0)
                if inner_kind & NLA_TYPE_MASK != NFTA_DATA_VALUE or inner_size < 4 or inner_size + 4 > attr_size:
                    raise DumpError(f"set {dumped.decl.name}: a key that is not a value")
                raw = data[at + 8 : at + 4 + inner_size]
                if attr_kind == NFTA_SET_ELEM_KEY:
                    key = raw
                else:
                    key_end = raw
            elif attr_kind == NFTA_SET_ELEM_DATA:
                value = data[at + 4 : at + attr_size]
            elif attr_kind == NFTA_SET_ELEM_USERDATA:
                note = data[at + 4 : at + attr_size]
            elif attr_kind == NFTA_SET_ELEM_FLAGS:
                if attr_size != 8:
                    raise DumpError(f"set {dumped.decl.name}: element flags that are not 32 bits")
                (flags,) = _U32.unpack_from(data, at + 4)
            elif attr_kind == NFTA_SET_ELEM_OBJREF:
                raise DumpError(f"set {dumped.decl.name}: an element that refers to an object")
            at += (attr_size + 3) & ~3
        comment = comment_of(note) if note else ""
        maps = dumped.verdicts or dumped.data is not None
        if maps != (value is not None):
            raise DumpError(f"{dumped.decl.kind} {dumped.decl.name}: an element with{'out' if maps else ''} data")
        value_text = self._value(dumped, value) if value is not None else ""
        if flags & NFT_SET_ELEM_CATCHALL:
            if key is not None or key_end is not None:
                raise DumpError(f"set {dumped.decl.name}: a catch-all element with a key")
            if dumped.rbtree or dumped.ranges:
                dumped.catchall = Element("*", value_text, comment)
            else:
                dumped.elements["*"] = Element("*", value_text, comment)
            return
        if key is None or len(key) != dumped.key.size:
            raise DumpError(f"set {dumped.decl.name}: an element without a key of {dumped.key.size} bytes")
        if dumped.rbtree:
            end_flag = bool(flags & NFT_SET_ELEM_INTERVAL_END)
            dumped.bounds.append((dumped.key.fields[0].number(key), end_flag, key, "" if end_flag else comment))
        elif dumped.ranges:
            if key_end is None or len(key_end) != len(key):
                raise DumpError(f"set {dumped.decl.name}: an interval concatenation's element without its key end")
            text = _range_key(dumped.key, key, key_end)
            dumped.elements[text] = Element(text, "", comment)
        else:
            if key_end is not None or flags & NFT_SET_ELEM_INTERVAL_END:
                raise DumpError(f"set {dumped.decl.name}: an interval's bound in a set without intervals")
            text = dumped.key.text(key)
            dumped.elements[text] = Element(text, value_text, comment)

    @staticmethod
    def _value(dumped: Dumped, value: bytes) -> str:
        """A map element's data (NFTA_SET_ELEM_DATA's payload) as text, kept for the elements that share it."""
        found = dumped.values.get(value)
        if found is not None:
            return found
        if dumped.verdicts and value[2:12] == _GOTO and value[14:16] == _CHAIN:  # as the kernel writes a goto
            verdict_size, chain_size = _ATTR.unpack_from(value, 0)[0], _ATTR.unpack_from(value, 12)[0]
            if verdict_size == len(value) == 12 + ((chain_size + 3) & ~3) and chain_size > 5:
                text = "goto " + value[16 : 12 + chain_size].split(b"\0", 1)[0].decode(errors="replace")
                dumped.values[value] = text
                return text
        inner = attributes(value, 0, len(value))
        if dumped.verdicts:
            span = inner.get(NFTA_DATA_VERDICT)
            if span is None or len(inner) != 1:
                raise DumpError(f"map {dumped.decl.name}: data that is not a verdict")
            text = verdict(value, span)
        else:
            assert dumped.data is not None
            span = inner.get(NFTA_DATA_VALUE)
            if span is None or len(inner) != 1 or span[1] - span[0] != dumped.data.size:
                raise DumpError(f"map {dumped.decl.name}: data that is not a value of {dumped.data.size} bytes")
            text = dumped.data.text(value[span[0] : span[1]])
        dumped.values[value] = text
        return text

    def chain(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        found = attributes(data, start, end)
        if message == NFT_MSG_NEWCHAIN and self._ours(family, data, found.get(NFTA_CHAIN_TABLE)):
            self.chains[_text(data, found.get(NFTA_CHAIN_NAME))] = None

    def rule(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        found = attributes(data, start, end)
        if message != NFT_MSG_NEWRULE or not self._ours(family, data, found.get(NFTA_RULE_TABLE)):
            return
        chain = _text(data, found.get(NFTA_RULE_CHAIN))
        self.rules[chain] = self.rules.get(chain, 0) + 1
        note = found.get(NFTA_RULE_USERDATA)
        self.last_notes[chain] = data[note[0] : note[1]] if note else b""

    def counter(self, message: int, family: int, data: bytes, start: int, end: int) -> None:
        """A counter object (of either family: the counters' dump is asked once for both)."""
        found = attributes(data, start, end)
        if message != NFT_MSG_NEWOBJ or not self._ours(family, data, found.get(NFTA_OBJ_TABLE)):
            return
        if _u32(data, found.get(NFTA_OBJ_TYPE), "object type") != NFT_OBJECT_COUNTER:
            return
        note = found.get(NFTA_OBJ_USERDATA)
        self.counters[_text(data, found.get(NFTA_OBJ_NAME))] = comment_of(data[note[0] : note[1]]) if note else ""

    # -- the result ---------------------------------------------------------------------------------

    def finish(self) -> Table:
        """The Table the dumps describe (call it once every dump was fed)."""
        table = Table(family=self.family, comment=self.table_comment)
        for name, dumped in self.sets.items():
            table.sets[name] = dumped.decl
            if dumped.decl.dynamic:
                continue
            if dumped.rbtree:
                table.elements[name] = {element.key: element for element in _decompose(dumped)}
            else:
                if dumped.catchall is not None:
                    dumped.elements["*"] = dumped.catchall
                table.elements[name] = dumped.elements
        for name in {**self.chains, **dict.fromkeys(self.rules)}:
            note = self.last_notes.get(name, b"")
            digest = digest_of(comment_of(note)) if note else ""
            table.chains[name] = Chain(name, (), fingerprint=(digest, self.rules.get(name, 0)))
        table.counters = dict(self.counters)
        return table


def generation(data: bytes, start: int, end: int) -> int | None:
    """NFTA_GEN_ID of a NEWGEN message's attributes."""
    span = attributes(data, start, end).get(NFTA_GEN_ID)
    return None if span is None else _u32(data, span, "generation id")
