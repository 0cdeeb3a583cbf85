"""Drift detection without root: notifications parsed, commits told apart, repairs paced, lost notifications counted."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import pytest

from kproxy.daemon.drift import DriftWatcher, RepairPacer, reason_of
from kproxy.nft.monitor import NotificationsLost
from kproxy.nft.notifications import Commit, Commits, parse
from kproxy.nft.objects import Family
from tests.harness.daemonbed import wait_until

PID = 4242


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _message(msg: int, family: int, payload: bytes) -> bytes:
    body = struct.pack("!BBH", family, 0, 0) + payload
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | msg, 0, 0, 0) + body


def _object(msg: int, table: str, family: int = 2) -> bytes:
    return _message(msg, family, _attr(1, table.encode() + b"\0"))


def _gen(generation: int, pid: int, name: str) -> bytes:
    return _message(15, 0, _attr(1, struct.pack("!I", generation)) + _attr(2, struct.pack("!I", pid))
                    + _attr(3, name.encode() + b"\0"))


def test_a_datagram_of_notifications_becomes_commits() -> None:
    """Objects of kproxy's tables are gathered until NEWGEN; other tables and families do not count."""
    data = (_object(2, "kproxy") + _object(5, "kproxy", 10) + _object(14, "firewalld") + _object(2, "kproxy", 1)
            + _gen(7, 99, "nft") + _object(12, "kproxy") + _gen(8, PID, "kproxy"))
    commits = list(Commits().feed(parse(data)))
    assert [(c.generation, c.pid, c.process) for c in commits] == [(7, 99, "nft"), (8, PID, "kproxy")]
    assert commits[0].changes == {"ip": {"delete table"}, "ip6": {"delete chain"}}
    assert commits[1].changes == {"ip": {"new element"}}
    assert reason_of(commits[0]) == "table_deleted" and reason_of(commits[1]) == "elements_changed"


def test_a_commit_cut_across_datagrams_stays_one() -> None:
    commits = Commits()
    assert list(commits.feed(parse(_object(8, "kproxy")))) == []
    (commit,) = commits.feed(parse(_gen(3, 1, "nft")))
    assert commit.changes == {"ip": {"delete rule"}}
    assert list(parse(b"\x01\x02")) == [], "a short datagram is nothing"


def test_the_fast_reader_finds_the_same_commits() -> None:
    """Commits.feed_bytes (the monitor's) equals feed(parse()) on mixed datagrams, whatever the attributes' order."""
    import random

    rng = random.Random(7)
    kinds = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 18, 20, 26, 30, 40]
    for _ in range(300):
        messages = []
        for _ in range(rng.randrange(1, 12)):
            roll = rng.random()
            if roll < 0.15:
                messages.append(_gen(rng.randrange(1000), rng.choice([PID, 1]), rng.choice(["nft", "kproxy"])))
            else:
                table = rng.choice(["kproxy", "kproxy", "firewalld", "kproxy2", "kprox"])
                attributes = [_attr(1, table.encode() + b"\0"), _attr(2, b"chain\0")]
                if rng.random() < 0.3:
                    attributes.reverse()  # the name not first: read the long way
                messages.append(_message(rng.choice(kinds), rng.choice([2, 10, 1, 7]), b"".join(attributes)))
        slow, fast = Commits(), Commits()
        cut = rng.randrange(len(messages) + 1)  # a transaction's messages across two datagrams
        pieces = [b"".join(messages[:cut]), b"".join(messages[cut:])]
        expected = [c for piece in pieces for c in slow.feed(parse(piece))]
        assert [c for piece in pieces for c in fast.feed_bytes(piece)] == expected


def test_pacing_at_once_then_doubling_while_a_storm_goes_on() -> None:
    pacer = RepairPacer(initial=1.0, cap=8.0, quiet=10.0)
    assert pacer.drift(0.0) and pacer.due() == float("-inf")
    pacer.repaired(0.0)
    delays = []
    now = 0.0
    for _ in range(6):
        assert not pacer.drift(now)
        now = pacer.due()
        delays.append(now)
        pacer.repaired(now)
    assert delays == [1.0, 3.0, 7.0, 15.0, 23.0, 31.0]  # 1, 2, 4, 8, then the cap
    last_drift = delays[-2]  # the storm's last change (the last repair came after it)
    assert not pacer.quiet_since(last_drift + 5) and pacer.quiet_since(last_drift + 11)
    assert pacer.drift(last_drift + 11) and pacer.due() == float("-inf"), "a new storm starts at once"


class FakeMonitor:
    """Stands for RulesetMonitor: commits to hand out (or a function raising), a generation, the tables there are."""

    def __init__(self) -> None:
        self.queue: list[list[Commit] | Callable[[], list[Commit]]] = []
        self.generation_now = 10
        self.tables: set[Family] = {"ip", "ip6"}
        self.idle = threading.Event()
        self.subscribed = False
        self.generation_fails = False

    def read(self, timeout: float) -> list[Commit]:
        if not self.queue:
            self.idle.set()
            threading.Event().wait(min(timeout, 0.01))
            return []
        item = self.queue.pop(0)
        return item() if callable(item) else item

    def generation(self) -> int:
        if self.generation_fails:
            raise OSError("no answer")
        return self.generation_now

    def has_table(self, family: Family) -> bool:
        return family in self.tables

    def subscribe(self) -> None:
        self.subscribed = True


class FakeEngine:
    def __init__(self, monitor: FakeMonitor) -> None:
        self.monitor = monitor
        self.requests = 0
        self.commits = 0
        self.first_sync: tuple[Callable[[], None], Callable[[], None]] | None = None
        self.synced_before_watching = True

    def request_full_sync(self) -> None:
        self.requests += 1

    def programmed_families(self) -> set[Family]:
        return {"ip", "ip6"}

    def fence(self, generation: Callable[[], int], timeout: float) -> tuple[int, int] | None:
        return self.commits, generation()

    def committed_by(self, pid: int | None) -> bool:
        return pid == PID

    def bracket_first_full_sync(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        if self.synced_before_watching:
            before()
            after()
        else:
            self.first_sync = (before, after)


class Reasons:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def drift_repaired(self, reason: str) -> None:
        self.seen.append(reason)


def _run(monitor: FakeMonitor, engine: FakeEngine, period: float = 60.0) -> tuple[Reasons, Callable[[], None]]:
    """Start a watcher; ``finish()`` waits until it has read everything queued (and one idle read more), then stops it."""
    reasons, stop = Reasons(), threading.Event()
    watcher = DriftWatcher(monitor, engine, reasons, period, stop, pacer=RepairPacer(initial=0.0, cap=0.0))  # type: ignore[arg-type]
    watcher.start()

    def finish() -> None:
        for _ in range(2):  # the queue drained, then a whole loop after it
            monitor.idle.clear()
            assert monitor.idle.wait(5)
        stop.set()
        watcher.join(5)

    return reasons, finish


def test_a_foreign_commit_on_kproxys_table_is_repaired_and_counted() -> None:
    monitor = FakeMonitor()
    engine = FakeEngine(monitor)
    monitor.queue = [[Commit(11, 99, "nft", {"ip": {"delete table"}}), Commit(12, PID, "kproxy", {"ip": {"new table"}}),
                      Commit(13, 77, "firewalld", {})]]
    reasons, finish = _run(monitor, engine)
    finish()
    assert engine.requests == 1 and reasons.seen == ["table_deleted"], "our own commit and another table's: nothing"


@pytest.mark.parametrize(("foreign", "repaired"), [(0, False), (2, True)])
def test_lost_notifications_are_settled_by_counting_commits(foreign: int, repaired: bool) -> None:
    """The generation grew by our commits alone: nothing to do; by more: someone else committed, repair."""
    monitor = FakeMonitor()
    engine = FakeEngine(monitor)

    def lost() -> list[Commit]:
        engine.commits += 5
        monitor.generation_now += 5 + foreign
        raise NotificationsLost("lost")

    monitor.queue = [lost]
    reasons, finish = _run(monitor, engine)
    finish()
    assert reasons.seen == (["notifications_lost"] if repaired else [])


def _first_sync(engine: FakeEngine, monitor: FakeMonitor, own: int, foreign: int, before: int = 0,
                reading_fails: bool = False) -> tuple[Reasons, threading.Event, DriftWatcher]:
    """A watcher started before the engine's first full sync: ``before`` commits by others before it starts,
    then the sync (``own`` commits) while others commit ``foreign`` times; returns once the watcher listens."""
    engine.synced_before_watching = False
    reasons, stop = Reasons(), threading.Event()
    watcher = DriftWatcher(monitor, engine, reasons, 60.0, stop, pacer=RepairPacer(initial=0.0, cap=0.0))  # type: ignore[arg-type]
    watcher.start()
    wait_until(lambda: engine.first_sync is not None, 5, "the watcher registered")
    assert engine.first_sync is not None and not monitor.subscribed, "nothing asked for before the first full sync"
    monitor.generation_now += before
    starting, synced = engine.first_sync
    if reading_fails:
        monitor.generation_fails = True
    starting()
    monitor.generation_fails = False
    engine.commits += own
    monitor.generation_now += own + foreign
    synced()
    assert watcher.listening.wait(5) and monitor.subscribed
    monitor.idle.clear()
    assert monitor.idle.wait(5), "the watcher went on to read notifications"
    return reasons, stop, watcher


@pytest.mark.parametrize(("before", "foreign", "checked"), [(0, 0, False), (5, 0, False), (0, 3, True)])
def test_notifications_are_read_only_after_the_first_full_sync(before: int, foreign: int, checked: bool) -> None:
    """The cold start's own notifications are never asked for; others' commits before it are not counted (the
    sync reads the kernel), those during it ask for one more full sync: a check, not a repair (no drift metric)."""
    monitor = FakeMonitor()
    engine = FakeEngine(monitor)
    reasons, stop, watcher = _first_sync(engine, monitor, own=40, foreign=foreign, before=before)
    stop.set()
    watcher.join(5)
    assert reasons.seen == []
    assert engine.requests == (1 if checked else 0)


def test_an_unreadable_generation_at_the_first_sync_asks_for_a_check_not_a_repair() -> None:
    monitor = FakeMonitor()
    engine = FakeEngine(monitor)
    reasons, stop, watcher = _first_sync(engine, monitor, own=40, foreign=0, reading_fails=True)
    stop.set()
    watcher.join(5)
    assert reasons.seen == [] and engine.requests == 1


def test_a_watcher_stopped_before_the_first_sync_ends() -> None:
    monitor = FakeMonitor()
    engine = FakeEngine(monitor)
    engine.synced_before_watching = False
    stop = threading.Event()
    watcher = DriftWatcher(monitor, engine, Reasons(), 60.0, stop)  # type: ignore[arg-type]
    watcher.start()
    wait_until(lambda: engine.first_sync is not None, 5, "the watcher registered")
    stop.set()
    watcher.join(5)
    assert not watcher.is_alive() and not monitor.subscribed


def test_the_periodic_check_finds_a_missing_table() -> None:
    monitor = FakeMonitor()
    monitor.tables = {"ip6"}
    engine = FakeEngine(monitor)
    def slow_read() -> list[Commit]:
        threading.Event().wait(0.2)  # a read that outlasts the period
        return []

    monitor.queue = [slow_read]
    reasons, finish = _run(monitor, engine, period=0.05)
    finish()
    assert reasons.seen and reasons.seen[0] == "table_missing"
