"""The kernel edge: kproxy's tables, over netlink (``kproxy.nft.netlink``) or through libnftables (the ``nftables`` binding).

* ``apply`` sends a transaction's commands over netlink as one batch, which
  the kernel applies all of it or none of it; commands on the skeleton (the
  table, set declarations, base chains, skeleton rules) go through
  libnftables, first, as their own transaction (``split``). Nothing falls
  back from one to the other: a command is one kind or the other. On failure
  the error names the command the kernel refused.
* ``read`` lists only ``ip kproxy`` and ``ip6 kproxy``, never anything else:
  with nf_tables netlink dumps (``kproxy.nft.dump``), or, if those cannot be
  read exactly, through libnftables' JSON (``read_json``), logged.
* ``delete_tables`` removes those two tables and nothing else. Nothing here
  ever flushes the ruleset.
* ``check_capabilities`` proves, with a throwaway table of our own, that the
  kernel and libnftables can do everything the ruleset uses, and names what is
  missing if not.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from kproxy.nft.counters import CounterDump
from kproxy.nft.dump import TableDump
from kproxy.nft.expressions import handles
from kproxy.nft.kernel import CapabilityError, Counters, NftError
from kproxy.nft.netlink import Batch, BatchSocket, NetlinkError, NotEncodable, sent_here
from kproxy.nft.objects import TABLE, Family, Op, Ruleset, Transaction
from kproxy.nft.readback import parse_table
from kproxy.nft.statements import chains_it_reaches, counters_it_uses

log = logging.getLogger(__name__)

FAMILIES: tuple[Family, ...] = ("ip", "ip6")
LIBNFTABLES = "libnftables.so.1"
PROBE_TABLE = "kproxy-probe"
MAX_WAITING_BATCHES = 4
"""How many encoded batches ``apply_in_order`` lets wait for the sender thread (a few MB each)."""
_LOCATION = re.compile(r"^(?:\S+):(\d+):\d+(?:-\d+)?: Error: (.*)$")


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    """What the user is told is missing."""
    hint: str
    rules: tuple[str, ...]
    """Rules for a probe chain; ``{family}`` is replaced."""
    chain: str = "type filter hook prerouting priority 0; policy accept;"
    sets: tuple[str, ...] = ()


CAPABILITIES: tuple[Capability, ...] = (
    Capability("nf_tables", "the kernel needs CONFIG_NF_TABLES (module nf_tables)", ("counter",)),
    Capability("ct (conntrack)", "module nft_ct / nf_conntrack", ("ct state new counter", "ct status dnat counter")),
    Capability(
        "nat",
        "modules nft_nat, nft_chain_nat, nft_masq",
        ("meta l4proto tcp dnat to {loopback}:1",),
        chain="type nat hook prerouting priority dstnat; policy accept;",
    ),
    Capability(
        "masquerade",
        "module nft_masq",
        ("masquerade fully-random",),
        chain="type nat hook postrouting priority srcnat; policy accept;",
    ),
    Capability("numgen", "module nft_numgen", ("numgen random mod 2 0 counter",)),
    Capability("fib", "module nft_fib_ipv4 / nft_fib_ipv6", ("fib saddr type local counter",)),
    Capability(
        "meters",
        "dynamic sets with per-element limits (modules nft_dynset, nft_limit)",
        ("update @m { {family} saddr limit rate over 10/second } counter",),
        sets=("set m { type {addr}; flags dynamic,timeout; timeout 1m; }",),
    ),
    Capability(
        "concatenated ranges",
        "interval sets over concatenations (kernel 5.6 or newer, nft_set_pipapo)",
        ("{family} saddr . meta l4proto @r counter",),
        sets=("set r { type {addr} . inet_proto; flags interval; elements = { {net} . tcp }; }",),
    ),
    Capability("reject", "module nft_reject", ("reject",),
               chain="type filter hook input priority 0; policy accept;"),
    Capability("verdict maps", "module nft_lookup", ("{family} daddr . meta l4proto . th dport vmap @v",),
               sets=("map v { type {addr} . inet_proto . inet_service : verdict; }",)),
    Capability(
        "endpoint maps",
        "DNAT to an address and port looked up by a key with numgen (nft_nat with concatenated data, nft_numgen)",
        ("dnat {family} to {family} daddr . meta l4proto . th dport . numgen random mod 2 offset 65536 map @e",),
        chain="type nat hook prerouting priority dstnat; policy accept;",
        sets=("map e { typeof {family} daddr . meta l4proto . th dport . numgen random mod 1 : {family} daddr . th dport; }",),
    ),
)


OPTIONAL_CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "connection counting, for kproxy.io/limit-connections",
        "module nft_connlimit",
        ("ct state new add @cl { {family} saddr ct count over 3 } counter drop",),
        sets=("set cl { type {addr}; flags dynamic; size 65535; }",),
    ),
    Capability(
        "byte meters, for kproxy.io/bandwidth-limit",
        "modules nft_dynset, nft_limit (byte rates)",
        ("update @b { ct original {family} saddr . ct direction limit rate over 1 mbytes/second } counter drop",),
        sets=("set b { typeof ct original {family} saddr . ct direction; flags dynamic,timeout; timeout 1m; }",),
    ),
)
"""What only some annotations need: a kernel without them runs kproxy, and Services using them are refused
(quarantined, each with its reason); one warning at startup names what is missing."""


def _probe_script(cap: Capability, family: Family) -> str:
    """Create and delete a probe table in one batch: the kernel checks every rule."""
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    net = "10.0.0.0/8" if family == "ip" else "fd00::/8"
    where = f"{family} {PROBE_TABLE}"
    lines = [f"add table {where}", f"delete table {where}", f"add table {where}"]
    for declaration in cap.sets:
        kind, name, body = declaration.split(" ", 2)
        body = body.replace("{addr}", addr).replace("{net}", net).replace("{family}", family)
        lines.append(f"add {kind} {where} {name} {body}")
    lines.append(f"add chain {where} c {{ {cap.chain} }}")
    loopback = "127.0.0.1" if family == "ip" else "[::1]"
    lines += [
        f"add rule {where} c {rule.replace('{family}', family).replace('{loopback}', loopback)}" for rule in cap.rules
    ]
    lines.append(f"delete table {where}")
    return "\n".join(lines) + "\n"


def open_libnftables(error: type[Exception]) -> Any:
    """A libnftables context (the pip-nftables binding); ``error`` says what is missing."""
    try:
        import nftables  # the pip-nftables binding
    except ImportError as exc:  # pragma: no cover - packaging problem
        raise error("the Python package pip-nftables is not installed") from exc
    try:
        return nftables.Nftables(sofile=LIBNFTABLES)
    except OSError as exc:
        raise error(
            f"{LIBNFTABLES} cannot be loaded ({exc}); install it (Debian: apt-get install libnftables1)"
        ) from None


def split(tx: Transaction) -> tuple[Transaction, Transaction]:
    """(the skeleton's commands, for libnftables; the rest, for netlink), each in its order.

    The skeleton's commands are the ones netlink is not used for: the table,
    set and map declarations, base chains, the skeleton chains' rules (and
    every other command on those chains, so that a flush and a refill stay in
    order), and elements of the interval sets the skeleton fills
    (``cluster-cidrs``, ``service-cidrs``). They go first: nothing of the
    skeleton refers to what the rest creates, and the rest may refer to what
    the skeleton declares.
    """
    libnftables = {(op.family, c.name) for op in tx.ops if op.kind == "rules" for c in op.chains
                   if not all(map(handles, c.rules))}
    libnftables |= {(op.family, op.name) for op in tx.ops if op.kind == "chain" and op.chain is not None and op.chain.base}
    # What those rules jump to or count with is declared with them, before them.
    referenced = {(op.family, name) for op in tx.ops if op.kind == "rules" for c in op.chains
                  if (op.family, c.name) in libnftables for rule in c.rules
                  for name in chains_it_reaches(rule) + counters_it_uses(rule)}
    skeleton, rest = Transaction(), Transaction(deferred_chain_deletes=list(tx.deferred_chain_deletes))
    tables: list[Op] = []
    for op in tx.ops:
        if op.kind == "table" and op.verb == "add":
            tables.append(op)  # goes with the skeleton's part, if there is one: it declares into the table
        elif op.kind == "rules":
            mine = tuple(c for c in op.chains if (op.family, c.name) in libnftables)
            others = tuple(c for c in op.chains if (op.family, c.name) not in libnftables)
            if mine:
                skeleton.add(replace(op, chains=mine))
            if others:
                rest.add(replace(op, chains=others))
        elif op.kind == "chain" and (op.family, op.name) in libnftables:
            skeleton.add(op)
        elif op.kind in ("chain", "counter") and op.verb == "add" and (op.family, op.name) in referenced:
            skeleton.add(op)
        elif sent_here(op):
            rest.add(op)
        else:
            skeleton.add(op)
    if tables:
        into = skeleton if skeleton else rest
        into.ops[:0] = tables
    return skeleton, rest


class NftablesBackend:
    """kproxy's tables in the current network namespace, through libnftables."""

    def __init__(self) -> None:
        self._nft = open_libnftables(CapabilityError)
        self._netlink = BatchSocket()
        self.commits = 0
        """Transactions this backend committed (the drift watcher tells its own from others' by them)."""
        self.committers: set[int] = {os.getpid()}
        """The thread ids that commit for it: the kernel names the committing thread in its notifications."""
        self._commits_lock = threading.Lock()
        self._lib = ctypes.CDLL(LIBNFTABLES)
        self._lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._nft.set_handle_output(False)
        self._counters = CounterDump()
        self._dump = TableDump()
        self._dump.open()  # in this network namespace, as the batch socket
        self._dump_lock = threading.Lock()
        """One dump at a time on the socket (the inspection endpoints read too)."""

    # -- transactions ----------------------------------------------------

    def _run(self, script: str, json_output: bool = False) -> tuple[int, str, str]:
        self._nft.set_json_output(json_output)
        rc, out, err = self._nft.cmd(script)
        return rc, out, err

    def apply(self, tx: Transaction) -> None:
        """Apply a transaction; raises NftError naming the refused command.

        Every command of kproxy's Services (elements, chains, counters, the
        rules of generated chains) goes over netlink, as one atomic batch,
        skipping libnftables' read of the whole table and its parser. The
        skeleton's commands, if the transaction has any (creating the table,
        an upgrade that changes the skeleton, a repair), go through
        libnftables first, as their own atomic transaction (see ``split``).
        """
        if not tx:
            return
        skeleton, rest = split(tx)
        if skeleton:
            self._apply_with_libnftables(skeleton)
        if rest:
            self._send(rest, self._prepare(rest))

    def _prepare(self, tx: Transaction) -> Batch:
        """Encode ``tx``; a value that cannot be encoded is an NftError, as a refusal by the kernel would be."""
        try:
            return self._netlink.prepare(tx)
        except (NotEncodable, ValueError, TypeError, KeyError, OverflowError, struct.error, OSError) as exc:
            # (OSError: an address socket.inet_pton refuses; encoding does no I/O)
            raise NftError(f"cannot encode the transaction: {type(exc).__name__}: {exc}") from None

    def _apply_with_libnftables(self, tx: Transaction) -> None:
        try:
            script = str(tx)
        except ValueError as exc:  # UnsafeText: refused before anything is sent
            raise NftError(f"cannot write the transaction: {exc}") from None
        self.committers.add(threading.get_native_id())  # before the commit: its notification may be read at once
        rc, _, err = self._run(script)
        if rc != 0:
            raise self._explain(script, err)
        self._committed()

    def _send(self, tx: Transaction, batch: Batch) -> None:
        self.committers.add(threading.get_native_id())
        try:
            self._netlink.send(tx, batch)
        except NetlinkError as exc:
            raise NftError(exc.reason, command=exc.command, op=exc.op) from None
        self._committed()

    def _committed(self) -> None:
        with self._commits_lock:  # the sender thread of apply_in_order commits too
            self.commits += 1

    def apply_in_order(self, transactions: Iterable[Transaction]) -> None:
        """Apply transactions one after the other, and stop at the first refused.

        For building a table in pieces. A sender thread hands the encoded
        batches to the kernel, whose work happens inside that thread's system
        call (outside the GIL), while this thread encodes the next ones: on
        two cores the kernel's share of a cold start costs little wall time.
        Once a batch is refused, the ones queued after it are dropped. The
        skeleton's part of a transaction waits until everything before it has
        landed.
        """
        refused = threading.Event()

        def send(tx: Transaction, batch: Batch) -> None:
            if refused.is_set():
                return
            try:
                self._send(tx, batch)
            except BaseException:
                refused.set()
                raise

        with ThreadPoolExecutor(1, thread_name_prefix="kproxy-netlink") as sender:
            queued: list[Future[None]] = []

            def land() -> None:
                """Wait for everything queued; raise the first refusal."""
                for future in queued:
                    future.result()
                queued.clear()

            try:
                for tx in transactions:
                    if refused.is_set():
                        break
                    if not tx:
                        continue
                    skeleton, rest = split(tx)
                    if skeleton:
                        land()
                        self._apply_with_libnftables(skeleton)
                    if not rest:
                        continue
                    batch = self._prepare(rest)
                    if len(queued) >= MAX_WAITING_BATCHES:
                        queued[-MAX_WAITING_BATCHES].result()  # encoded batches hold megabytes each
                    queued.append(sender.submit(send, rest, batch))
                land()
            except BaseException as error:
                refused.set()  # nothing still queued is sent
                for future in queued:
                    if future.done() and future.exception() not in (None, error):
                        log.error("the kernel also refused an earlier piece: %s", future.exception())
                raise

    def _set_dry_run(self, on: bool) -> None:
        self._lib.nft_ctx_set_dry_run(self._nft._Nftables__ctx, on)

    def _explain(self, script: str, err: str) -> NftError:
        """Find which command failed: libnftables only reports lines for files.

        The failed batch changed nothing, so it is replayed in dry-run mode from
        a temporary file, whose error messages carry the line number.
        """
        first = next((line for line in err.splitlines() if "Error:" in line), err.strip() or "nft failed")
        reason = first.split("Error:", 1)[1].strip() if "Error:" in first else first
        lines = script.splitlines()
        fd, path = tempfile.mkstemp(prefix="kproxy-", suffix=".nft")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(script)
            self._set_dry_run(True)
            try:
                _, _, located = self._run(f'include "{path}"')
            finally:
                self._set_dry_run(False)
        finally:
            os.unlink(path)
        for line in located.splitlines():
            match = _LOCATION.match(line)
            if match and 0 < int(match.group(1)) <= len(lines):
                command = lines[int(match.group(1)) - 1]
                return NftError(match.group(2).strip(), command if len(command) < 500 else command[:497] + "...")
        return NftError(reason)

    # -- reading ---------------------------------------------------------

    def list_json(self, family: Family) -> dict[str, Any] | None:
        """``nft -j list table FAMILY kproxy``, or None if the table does not exist."""
        rc, out, err = self._run(f"list table {family} {TABLE}", json_output=True)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(err.strip().splitlines()[0] if err.strip() else "list failed", f"list table {family} {TABLE}")
        return json.loads(out)

    def read(self) -> Ruleset:
        """kproxy's tables as they are in the kernel (absent tables are left out).

        From netlink dumps (``kproxy.nft.dump``): at 10k Services, tens of MB
        and a fraction of a second, where libnftables' JSON takes seconds and
        more than a GB. If the dumps cannot be read exactly (a type or a
        verdict the decoder does not know, the ruleset changing under every
        attempt, a socket error), the tables are read through libnftables'
        JSON instead, and the reason logged: the same Table either way.
        """
        try:
            with self._dump_lock:
                return self._dump.read()
        except Exception as exc:  # whatever failed, the JSON path can still read the tables
            log.warning("reading kproxy's tables over netlink failed (%s: %s); reading them through libnftables' "
                        "JSON instead", type(exc).__name__, exc)
        return self.read_json()

    def read_json(self) -> Ruleset:
        """kproxy's tables, listed as JSON by libnftables and parsed by ``readback.parse_table``."""
        ruleset = Ruleset()
        for family in FAMILIES:
            document = self.list_json(family)
            if document is not None:
                ruleset.tables[family] = parse_table(document, family)
        return ruleset

    def read_counters(self) -> Counters:
        """Every named counter of kproxy's tables: (family, name) -> (packets, bytes), from one netlink dump
        (``kproxy.nft.counters``: libnftables would read the whole ruleset first)."""
        return self._counters.read()

    def read_named_counters(self, names: Iterable[tuple[Family, str]]) -> Counters:
        """Those of ``names`` that exist, one request each: cheaper than the dump when few of many are needed."""
        return self._counters.read_named(names)

    def list_text(self, family: Family) -> str | None:
        """The table as ``nft list table`` prints it (for inspection)."""
        rc, out, _ = self._run(f"list table {family} {TABLE}")
        if rc != 0:
            return None
        return out

    # -- cleanup ---------------------------------------------------------

    def delete_tables(self) -> list[Family]:
        """Delete ``ip kproxy`` and ``ip6 kproxy`` if present; return which were deleted."""
        deleted = []
        for family in FAMILIES:
            if self.list_json(family) is None:
                continue
            rc, _, err = self._run(f"delete table {family} {TABLE}")
            if rc != 0:
                raise NftError(err.strip().splitlines()[0] if err.strip() else "delete failed", f"delete table {family} {TABLE}")
            deleted.append(family)
        return deleted

    # -- capabilities ----------------------------------------------------

    def check_capabilities(self) -> None:
        """Raise CapabilityError naming every missing capability, for both families; warn about optional ones."""
        missing: list[str] = []
        for cap in CAPABILITIES:
            for family in FAMILIES:
                rc, _, err = self._run(_probe_script(cap, family))
                if rc != 0:
                    self._run(f"delete table {family} {PROBE_TABLE}")
                    detail = next((line for line in err.splitlines() if "Error:" in line), err.strip())
                    missing.append(f"{cap.name} ({family}): {cap.hint}; nft said: {detail.strip()}")
                    break
        if missing:
            raise CapabilityError("missing nftables capabilities: " + "; ".join(missing))
        for cap in OPTIONAL_CAPABILITIES:
            for family in FAMILIES:
                rc, _, err = self._run(_probe_script(cap, family))
                if rc != 0:
                    self._run(f"delete table {family} {PROBE_TABLE}")
                    detail = next((line for line in err.splitlines() if "Error:" in line), err.strip())
                    log.warning("this kernel lacks %s (%s): Services using it are refused and quarantined; nft said: %s",
                                cap.name, cap.hint, detail.strip())
                    break
