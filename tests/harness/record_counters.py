"""Records the kernel's answer to kproxy's counter dump (``kproxy.nft.counters``), for tests without root.

Run as root: ``python -m tests.harness.record_counters [--out FILE]`` (default
``tests/data/counters/dump.json``). In a fresh network namespace of its own
(deleted afterwards, also on failure) nft loads ``SCRIPT``: kproxy's two
tables with counters as kproxy names them (one with a comment, one past 32
bits), and what the dump must leave out: a ``kproxy`` table of another
family (the kernel sends it, the parser skips it), another table's counter
and a quota object in ``ip kproxy`` (both filtered by the kernel). Then it
sends ``dump_request`` on a netlink socket and keeps every message of the
answer, as hex, each in its own entry.

What is kept is normalised (``normalise``): the sequence number and port id
of each message header and the generation id of its nfgenmsg are zeroed, as
they depend on the socket and the namespace's history, not on the objects.
``tests/test_counters.py`` parses the recording without root, and its root
test records again and compares.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kproxy.nft.counters import NLMSG_DONE, dump_request
from kproxy.nft.netlink import NETLINK_NETFILTER

OUT = Path(__file__).resolve().parents[1] / "data" / "counters" / "dump.json"

SCRIPT = """\
table ip kproxy {
	counter conns-ABCDEFGH-shop/web/tcp/http {
		packets 120 bytes 7200
	}
	counter drops-ABCDEFGH-shop/web/tcp/http {
		packets 5 bytes 300
	}
	counter conns-QRSTUVWX-kube-system/kube-dns/udp/53 {
		comment "kube-system/kube-dns:dns"
		packets 9 bytes 600
	}
	counter conns-BIGBIGBI-load/heavy/tcp/443 {
		packets 1099511627776 bytes 65970697666560
	}
	counter conns-ZEROZERO-shop/idle/tcp/http {
		packets 0 bytes 0
	}
	quota over-quota {
		over 25 mbytes
	}
}
table ip6 kproxy {
	counter conns-ABCDEFGH-shop/web/tcp/http {
		packets 30 bytes 2400
	}
}
table inet kproxy {
	counter conns-ABCDEFGH-shop/web/tcp/http {
		packets 1 bytes 1
	}
}
table ip other {
	counter conns-ABCDEFGH-shop/web/tcp/http {
		packets 2 bytes 2
	}
}
"""

EXPECTED = {
    ("ip", "conns-ABCDEFGH-shop/web/tcp/http"): (120, 7200),
    ("ip", "drops-ABCDEFGH-shop/web/tcp/http"): (5, 300),
    ("ip", "conns-QRSTUVWX-kube-system/kube-dns/udp/53"): (9, 600),
    ("ip", "conns-BIGBIGBI-load/heavy/tcp/443"): (1099511627776, 65970697666560),
    ("ip", "conns-ZEROZERO-shop/idle/tcp/http"): (0, 0),
    ("ip6", "conns-ABCDEFGH-shop/web/tcp/http"): (30, 2400),
}
"""What ``parse_dump`` reads from the recording: the inet table's counter is skipped."""


@contextmanager
def namespace() -> Iterator[str]:
    """A fresh network namespace (``kpt-rec-...``), deleted afterwards, also on failure."""
    name = f"kpt-rec-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def messages(data: bytes) -> Iterator[bytes]:
    """The netlink messages of one buffer."""
    offset = 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        if length < 16:
            raise ValueError(f"a message of {length} bytes at {offset}")
        yield data[offset : offset + length]
        offset += (length + 3) & ~3


def normalise(message: bytes) -> bytes:
    """The message with its header's sequence number and port id, and its nfgenmsg's generation id, zeroed."""
    out = bytearray(message)
    struct.pack_into("=II", out, 8, 0, 0)
    if len(out) >= 20:
        struct.pack_into("!H", out, 18, 0)
    return bytes(out)


def dump_in(netns: str) -> list[bytes]:
    """Every message the kernel answers the dump request with, in the namespace ``netns`` (as they came)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.harness.netbed import Netns

    with Netns(netns).entered():
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.sendall(dump_request(7))
        found: list[bytes] = []
        while not found or struct.unpack_from("=H", found[-1], 4)[0] not in (NLMSG_DONE, 2):
            found.extend(messages(sock.recv(1 << 16)))
        return found
    finally:
        sock.close()


def record() -> dict[str, Any]:
    """Load SCRIPT in a fresh namespace and dump its counters: the recording, as ``OUT`` holds it."""
    with namespace() as netns:
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=SCRIPT, text=True, check=True)
        found = dump_in(netns)
    return {
        "script": SCRIPT,
        "request": dump_request(7).hex(),
        "messages": [normalise(m).hex() for m in found],
        "expected": [[family, name, packets, count] for (family, name), (packets, count) in EXPECTED.items()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    recording = record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(recording, indent=1) + "\n")
    print(f"{len(recording['messages'])} messages recorded in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
