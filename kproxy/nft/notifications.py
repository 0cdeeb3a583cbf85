"""nf_tables ruleset notifications (netlink group NFNLGRP_NFTABLES), parsed: who changed which table. Pure.

Every committed nf_tables transaction is announced to the group: one message
per object it created or deleted (tables, chains, rules, sets, elements,
objects), then ``NEWGEN`` with the new generation id and the process that
committed it (pid and name). ``Commits`` turns that stream into one
``Commit`` per transaction: the families whose ``kproxy`` table it touched,
what kinds of objects, and by whom, so the daemon can tell its own
transactions from anyone else's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from kproxy.nft.objects import TABLE, Family

NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID, NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 1, 2, 3
_FAMILIES: dict[int, Family] = {2: "ip", 10: "ip6"}

OBJECT_KINDS: dict[int, tuple[str, str]] = {
    # message type: (verb, what); attribute 1 of each is the table's name
    0: ("new", "table"), 2: ("delete", "table"),
    3: ("new", "chain"), 5: ("delete", "chain"),
    6: ("new", "rule"), 8: ("delete", "rule"),
    9: ("new", "set"), 11: ("delete", "set"),
    12: ("new", "element"), 14: ("delete", "element"),
    18: ("new", "object"), 20: ("delete", "object"),
    22: ("new", "flowtable"), 24: ("delete", "flowtable"),
    # the DESTROY messages of newer kernels
    26: ("delete", "table"), 27: ("delete", "chain"), 28: ("delete", "rule"), 29: ("delete", "set"),
    30: ("delete", "element"), 31: ("delete", "object"), 32: ("delete", "flowtable"),
}


@dataclass(frozen=True, slots=True)
class Notification:
    """One message of the group: an object of some table created or deleted, or a new generation."""

    verb: str
    """``new`` or ``delete`` (``gen`` for NEWGEN)."""
    what: str
    family: Family | None
    """ip or ip6; None for other families (inet, arp, ...)."""
    table: str = ""
    generation: int | None = None
    pid: int | None = None
    process: str = ""


@dataclass(slots=True)
class Commit:
    """One committed transaction, as announced: what it did to kproxy's tables, and who committed it."""

    generation: int
    pid: int | None
    process: str
    changes: dict[Family, set[str]] = field(default_factory=dict)
    """family -> ``verb what`` (e.g. ``delete table``, ``delete element``) done to that family's kproxy table."""

    @property
    def touches_kproxy(self) -> bool:
        return bool(self.changes)


def _attributes(payload: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        found.setdefault(kind & 0x3FFF, payload[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return found


def _string(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value else ""


def parse(data: bytes) -> Iterator[Notification]:
    """The nf_tables notifications in one datagram (other messages are skipped)."""
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            break
        subsys, message = msg_type >> 8, msg_type & 0xFF
        if subsys == NFNL_SUBSYS_NFTABLES and length >= 20:
            family = _FAMILIES.get(data[offset + 16])
            attributes = _attributes(data[offset + 20 : offset + length])
            if message == NFT_MSG_NEWGEN:
                generation = attributes.get(NFTA_GEN_ID)
                pid = attributes.get(NFTA_GEN_PROC_PID)
                yield Notification(
                    "gen", "generation", family,
                    generation=struct.unpack("!I", generation)[0] if generation and len(generation) == 4 else None,
                    pid=struct.unpack("!I", pid)[0] if pid and len(pid) == 4 else None,
                    process=_string(attributes.get(NFTA_GEN_PROC_NAME)),
                )
            elif message in OBJECT_KINDS:
                verb, what = OBJECT_KINDS[message]
                yield Notification(verb, what, family, _string(attributes.get(1)))
        offset += (length + 3) & ~3


_TABLE_ATTRIBUTE = struct.pack("=HH", 4 + len(TABLE) + 1, 1) + TABLE.encode() + b"\0"
"""Attribute 1 (the table's name) of a message about kproxy's table, as the kernel puts it first."""


class Commits:
    """Groups notifications into transactions: everything up to and including a NEWGEN is one commit."""

    def __init__(self) -> None:
        self._changes: dict[Family, set[str]] = {}
        self._seen: set[tuple[int, int]] = set()
        """(family number, message type) of kproxy-table messages since the last NEWGEN (``feed_bytes``)."""

    def _commit(self, note: Notification) -> Commit:
        for family_number, message in self._seen:
            verb, what = OBJECT_KINDS[message]
            self._changes.setdefault(_FAMILIES[family_number], set()).add(f"{verb} {what}")
        commit = Commit(note.generation or 0, note.pid, note.process, self._changes)
        self._changes = {}
        self._seen.clear()
        return commit

    def feed(self, notifications: Iterator[Notification]) -> Iterator[Commit]:
        for note in notifications:
            if note.verb == "gen":
                yield self._commit(note)
            elif note.table == TABLE and note.family is not None:
                self._changes.setdefault(note.family, set()).add(f"{note.verb} {note.what}")

    def feed_bytes(self, data: bytes) -> list[Commit]:
        """``feed(parse(data))``, without an object per message.

        A cold start is announced as one message per element (over 100,000 at
        10k Services), read while the daemon is still encoding the rest: each
        object message costs a header read and a comparison with the name
        attribute, and only a NEWGEN is parsed in full.
        """
        commits: list[Commit] = []
        seen = self._seen
        unpack = struct.unpack_from
        offset, end = 0, len(data)
        while offset + 16 <= end:
            length, msg_type = unpack("=IH", data, offset)
            if length < 16 or offset + length > end:
                break
            if msg_type >> 8 == NFNL_SUBSYS_NFTABLES and length >= 20:
                message = msg_type & 0xFF
                if message == NFT_MSG_NEWGEN:
                    commits.extend(self._commit(note) for note in parse(data[offset : offset + length]))
                elif message in OBJECT_KINDS and data[offset + 16] in _FAMILIES:
                    key = (data[offset + 16], message)
                    if key not in seen:
                        name = data[offset + 20 : offset + 20 + len(_TABLE_ATTRIBUTE)]
                        if name == _TABLE_ATTRIBUTE or (
                            name[2:4] != _TABLE_ATTRIBUTE[2:4]  # not first: read the attributes
                            and _string(_attributes(data[offset + 20 : offset + length]).get(1)) == TABLE
                        ):
                            seen.add(key)
            offset += (length + 3) & ~3
        return commits

    def forget(self) -> None:
        """Drop what was gathered (after messages were lost: the next commit would be incomplete)."""
        self._changes = {}
        self._seen.clear()
