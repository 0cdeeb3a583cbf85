"""Records the kernel's answers to kproxy's table dumps (``kproxy.nft.dump``), for tests without root.

Run as root: ``python -m tests.harness.record_dump [--out DIR] [NAME ...]``
(default: every entry of ``RECORDINGS`` in ``tests/test_readback.py``, into
``tests/data/dump/NAME.json``). For each entry, in a fresh network namespace
of its own (``kpt-dump-XXXXXXXX``, deleted afterwards, also on failure), nft
loads the entry's script (the compiled ruleset of a golden scenario, or a
bare table) and its hand-written commands, then ``TableDump.read()`` reads
the tables through a transport that keeps every request and every message
of its answer, as hex: the same kernel state that
``tests/data/readback/NAME.json`` holds as nft's JSON.

What is kept is normalised (``normalise``), as it depends on the socket, the
process and the boot, not on the tables: the sequence number and port id of
each message header and the generation id in its nfgenmsg are zeroed; the
NFT_MSG_NEWGEN answer keeps only the generation id (not the pid and name of
the process that asked); NFTA_SET_TYPE (19, new in Linux 6.x: here the
kernel address of the set backend's ops, as text) is dropped; so are the
rules' expressions (NFTA_RULE_EXPRESSIONS: nine tenths of the bytes, which
the reader skips; ``tests/data/readback`` and ``tests/test_nfnetlink.py``
cover them).
``tests/test_tabledump.py`` replays the recordings (``Replay``) without root,
and its root test records again and compares (``canonical``: the kernel
lists a hash set's elements in an order seeded at random).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kproxy.nft.dump import SocketTransport, TableDump, Transport
from kproxy.nft.tabledump import DumpError, attributes
from tests.harness.record_counters import messages, namespace

OUT = Path(__file__).resolve().parents[1] / "data" / "dump"
NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_NEWGEN = 6, 9, 12, 13, 15
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_RULE_EXPRESSIONS, NFTA_SET_TYPE, NFTA_GEN_ID = 4, 19, 1
_HEADER = struct.Struct("=IHHII")


def _without(message: bytes, drop: set[int]) -> bytes:
    """The message without its top-level attributes of the types in ``drop``, its length set again."""
    kept = b""
    for kind, (start, end) in sorted(attributes(message, 20, len(message)).items(), key=lambda item: item[1]):
        if kind not in drop:
            kept += message[start - 4 : end] + b"\0" * (-(end - start) % 4)
    header = bytearray(message[:20])
    struct.pack_into("=I", header, 0, 20 + len(kept))
    return bytes(header) + kept


def normalise(message: bytes) -> bytes:
    """See the module docstring."""
    out = bytearray(message)
    struct.pack_into("=II", out, 8, 0, 0)
    kind = struct.unpack_from("=H", out, 4)[0]
    if len(out) >= 20 and kind >> 8 == 10:  # nf_tables: the nfgenmsg's resource id is the generation
        struct.pack_into("!H", out, 18, 0)
        if kind & 0xFF == NFT_MSG_NEWGEN:
            found = attributes(bytes(out), 20, len(out))
            return _without(bytes(out), set(found) - {NFTA_GEN_ID})
        if kind & 0xFF == NFT_MSG_NEWSET:
            return _without(bytes(out), {NFTA_SET_TYPE})
        if kind & 0xFF == NFT_MSG_NEWRULE:
            return _without(bytes(out), {NFTA_RULE_EXPRESSIONS})
    return bytes(out)


class Recording:
    """A transport that keeps what goes through it: (normalised request, its normalised answer messages)."""

    def __init__(self) -> None:
        self.inner = SocketTransport()
        self.exchanges: list[tuple[bytes, list[bytes]]] = []

    def send(self, data: bytes) -> None:
        self.exchanges.append((normalise(data), []))
        self.inner.send(data)

    def recv(self) -> bytes:
        data = self.inner.recv()
        self.exchanges[-1][1].extend(normalise(m) for m in messages(data))
        return data

    def close(self) -> None:
        self.inner.close()


class Replay:
    """Answers the requests of a ``TableDump`` with recorded answers (a ``Transport``, for tests without root).

    Each request must be the recorded one, in order, but for its sequence
    number, which the answers are given. ``per_recv`` messages come at each
    ``recv`` (0: all of an answer at once).
    """

    def __init__(self, exchanges: list[tuple[bytes, list[bytes]]], per_recv: int = 1) -> None:
        self._exchanges = exchanges
        self._per_recv = per_recv
        self._next = 0
        self._pending: list[bytes] = []

    def send(self, data: bytes) -> None:
        if self._next >= len(self._exchanges):
            raise DumpError(f"request {self._next + 1} was not recorded: {data.hex()}")
        expected, answers = self._exchanges[self._next]
        self._next += 1
        if normalise(data) != expected:
            raise DumpError(f"request {self._next} is not the recorded one: {data.hex()} != {expected.hex()}")
        seq = data[8:12]
        self._pending = [m[:8] + seq + m[12:] for m in answers]

    def recv(self) -> bytes:
        if not self._pending:
            raise OSError(11, "nothing more was recorded")
        count = self._per_recv or len(self._pending)
        taken, self._pending = self._pending[:count], self._pending[count:]
        return b"".join(m + b"\0" * (-len(m) % 4) for m in taken)

    def close(self) -> None:
        pass

    @property
    def unused(self) -> int:
        """Recorded requests not asked for."""
        return len(self._exchanges) - self._next


def load(name: str, directory: Path = OUT) -> list[tuple[bytes, list[bytes]]]:
    """A recording's exchanges."""
    recorded = json.loads((directory / f"{name}.json").read_text())
    return [(bytes.fromhex(e["request"]), [bytes.fromhex(m) for m in e["answers"]]) for e in recorded["exchanges"]]


def record_in(netns: str, script: str, extra: str = "") -> list[tuple[bytes, list[bytes]]]:
    """Load ``script`` (and ``extra``) in the namespace and read its tables, keeping every exchange."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.harness.netbed import Netns

    space = Netns(netns)
    space.nft("-f", "-", input=script)
    if extra:
        space.nft("-f", "-", input=extra)
    kept: list[Recording] = []

    def opened() -> Transport:
        with space.entered():
            kept.append(Recording())
        return kept[-1]

    dump = TableDump(opened)
    try:
        dump.read()
    finally:
        dump.close()
    return [exchange for recording in kept for exchange in recording.exchanges]


def record(name: str) -> dict[str, Any]:
    """One entry of RECORDINGS, recorded in a fresh namespace: the file's content."""
    from tests.test_readback import RECORDINGS

    recording = RECORDINGS[name]
    with namespace() as netns:
        exchanges = record_in(netns, recording.script(), recording.extra)
    return {"exchanges": [{"request": request.hex(), "answers": [m.hex() for m in answers]}
                          for request, answers in exchanges]}


def canonical(recorded: dict[str, Any]) -> list[Any]:
    """A recording as a comparison sees it: the elements of a set are in the order of the kernel's hash of them,
    seeded at random per set, and so is how they are cut into messages; so each elements dump counts as the sorted
    list of its elements (and the end of its answer). Everything else as recorded."""
    found: list[Any] = []
    for exchange in recorded["exchanges"]:
        request, answers = bytes.fromhex(exchange["request"]), [bytes.fromhex(m) for m in exchange["answers"]]
        if struct.unpack_from("=H", request, 4)[0] & 0xFF != NFT_MSG_GETSETELEM:
            found.append(exchange)
            continue
        elements = []
        for answer in answers:
            span = attributes(answer, 20, len(answer)).get(NFTA_SET_ELEM_LIST_ELEMENTS) if len(answer) > 20 else None
            if span is not None and struct.unpack_from("=H", answer, 4)[0] & 0xFF == NFT_MSG_NEWSETELEM:
                elements += [answer[start - 4 : end].hex() for start, end in _each(answer, *span)]
        found.append({"request": exchange["request"], "elements": sorted(elements), "end": answers[-1].hex()})
    return found


def _each(data: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The (start, end) of the payload of each attribute between ``start`` and ``end``, in order."""
    while start + 4 <= end:
        (size,) = struct.unpack_from("=H", data, start)
        if size < 4:
            raise ValueError(f"an attribute of {size} bytes at {start}")
        yield start + 4, start + size
        start += (size + 3) & ~3


def write(path: Path, recorded: dict[str, Any]) -> None:
    """One exchange a line (reviewable diffs), as valid JSON."""
    lines = [json.dumps(exchange) for exchange in recorded["exchanges"]]
    path.write_text('{"exchanges": [\n' + ",\n".join(lines) + "\n]}\n")


def main(argv: list[str] | None = None) -> int:
    from tests.test_readback import RECORDINGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("names", nargs="*", default=sorted(RECORDINGS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        recorded = record(name)
        write(args.out / f"{name}.json", recorded)
        print(f"{name}: {len(recorded['exchanges'])} exchanges")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
