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


class Commits:
    """Groups notifications into transactions: everything up to and including a NEWGEN is one commit."""

    def __init__(self) -> None:
        self._changes: dict[Family, set[str]] = {}

    def feed(self, notifications: Iterator[Notification]) -> Iterator[Commit]:
        for note in notifications:
            if note.verb == "gen":
                commit = Commit(note.generation or 0, note.pid, note.process, self._changes)
                self._changes = {}
                yield commit
            elif note.table == TABLE and note.family is not None:
                self._changes.setdefault(note.family, set()).add(f"{note.verb} {note.what}")

    def forget(self) -> None:
        """Drop what was gathered (after messages were lost: the next commit would be incomplete)."""
        self._changes = {}
