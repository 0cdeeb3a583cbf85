"""Drift repair: when another program changes kproxy's tables, restore them within about a second.

Other programs do touch the ruleset: ``nft flush ruleset`` (a firewalld or
nftables.service reload, some CNI and VPN installers), an operator's
``nft delete table ip kproxy``. ``DriftWatcher`` notices:

* at once, from the nf_tables notifications (``kproxy.nft.monitor``): a
  committed transaction that touched ``ip kproxy`` or ``ip6 kproxy`` and was
  not committed by this process;
* when notifications were lost (the kernel drops them when they come faster
  than they are read), by counting:
  if the ruleset's generation grew more than this process's own commits
  since the last fence, someone else committed something;
* every ``--sync-period``, by asking whether the ruleset's generation is the
  last one seen, and whether each table kproxy programmed still exists.

It listens from the end of the first full sync on (a cold start would
announce every element to it); others' commits during that sync are counted
and checked by one more full sync.

A repair is a full sync (``Proxier.request_full_sync``): it reads what the
kernel holds and sends the difference in one transaction per family, so it
restores exactly what was taken and nothing of anyone else's. Repairs are
paced (``RepairPacer``): the first at once, then, while the changes go on (a
storm), after a delay that doubles up to a cap; a storm is logged once, and
summarized when it ends. Each repair counts in
``kproxy_drift_repairs_total{reason}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kproxy.nft.monitor import NotificationsLost, RulesetMonitor
from kproxy.nft.notifications import Commit
from kproxy.nft.objects import Family

log = logging.getLogger(__name__)

QUIET = 10.0
"""Seconds without a foreign change that end a storm."""


class Repairable(Protocol):
    """What the watcher needs from the sync engine (a Proxier)."""

    def request_full_sync(self) -> None: ...

    def programmed_families(self) -> set[Family]:
        """The families whose table the engine has programmed (and expects in the kernel)."""
        ...

    def fence(self, generation: Callable[[], int], timeout: float) -> tuple[int, int] | None:
        """(the backend's commits, the ruleset generation), read while no sync runs; None if one ran all along."""
        ...

    def committed_by(self, pid: int | None) -> bool:
        """Whether a transaction committed by this process or thread id was the engine's own."""
        ...

    def bracket_first_full_sync(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        """``before`` as the engine's first full sync starts, ``after`` once it has committed: both under its lock."""
        ...


class DriftObserver(Protocol):
    def drift_repaired(self, reason: str) -> None: ...


@dataclass
class RepairPacer:
    """When a repair may run: at once, then after a delay that doubles while drift keeps coming (up to ``cap``)."""

    initial: float = 1.0
    cap: float = 30.0
    quiet: float = QUIET
    burst: int = 0
    """Foreign changes in the current storm."""
    repairs: int = 0
    """Repairs in the current storm."""
    _delay: float = 0.0
    _last_drift: float = field(default=float("-inf"))
    _next_allowed: float = field(default=float("-inf"))

    def drift(self, now: float) -> bool:
        """Record a foreign change; True if it starts a storm (the first after a quiet spell)."""
        starts = now - self._last_drift > self.quiet
        if starts:
            self._delay, self.burst, self.repairs, self._next_allowed = 0.0, 0, 0, float("-inf")
        self._last_drift = now
        self.burst += 1
        return starts

    def due(self) -> float:
        """The earliest time a repair may run."""
        return self._next_allowed

    def repaired(self, now: float) -> None:
        self.repairs += 1
        self._delay = self.initial if self._delay == 0 else min(self.cap, self._delay * 2)
        self._next_allowed = now + self._delay

    def quiet_since(self, now: float) -> bool:
        """Whether a storm was going on and has now ended."""
        return self.burst > 0 and now - self._last_drift > self.quiet


def reason_of(commit: Commit) -> str:
    """The metric's reason for a foreign change: the most serious thing it did to kproxy's tables."""
    changes = set().union(*commit.changes.values())
    for change, reason in (("delete table", "table_deleted"), ("delete chain", "chain_deleted"),
                           ("delete set", "set_deleted"), ("delete rule", "rules_changed"), ("new rule", "rules_changed"),
                           ("delete element", "elements_changed"), ("new element", "elements_changed")):
        if change in changes:
            return reason
    return "other_change"


def _describe(commit: Commit) -> str:
    what = "; ".join(f"{', '.join(sorted(changes))} in {family} kproxy" for family, changes in sorted(commit.changes.items()))
    who = f"{commit.process or 'a process'} (pid {commit.pid})" if commit.pid is not None else "another process"
    return f"{who}: {what}"


class DriftWatcher(threading.Thread):
    """Watches the ruleset for changes to kproxy's tables by others, and has them repaired."""

    def __init__(self, monitor: RulesetMonitor, engine: Repairable, observer: DriftObserver, period: float,
                 stop: threading.Event, pacer: RepairPacer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="kproxy-drift", daemon=True)
        self.monitor = monitor
        self.engine = engine
        self.observer = observer
        self.period = period
        self.stop_event = stop
        self.pacer = pacer or RepairPacer(cap=max(1.0, min(30.0, period)))
        self.clock = clock
        self._pending: str | None = None
        self._last_generation: int | None = None
        self._fence: tuple[int, int] | None = None
        self.listening = threading.Event()
        """Set once notifications are read (after the engine's first full sync)."""

    def run(self) -> None:
        if not self._listen_after_first_full_sync():
            return
        next_check = self.clock() + self.period
        while not self.stop_event.is_set():
            now = self.clock()
            wake = next_check if self._pending is None else min(next_check, max(now, self.pacer.due()))
            try:
                self._seen(self.monitor.read(min(1.0, max(0.0, wake - now))))
            except NotificationsLost:
                self._notifications_lost()
            except OSError as exc:
                log.warning("reading ruleset notifications failed (%s); the periodic check goes on", exc)
                self.stop_event.wait(1.0)
            now = self.clock()
            if now >= next_check:
                next_check = now + self.period
                self._check()
            if self._pending is not None and now >= self.pacer.due():
                self._repair(now)
            elif self._pending is None and self.pacer.quiet_since(now):
                log.info("the changes to kproxy's tables by other programs have stopped: %d seen, %d repairs",
                         self.pacer.burst, self.pacer.repairs)
                self.pacer.burst = 0

    def _listen_after_first_full_sync(self) -> bool:
        """Subscribe to notifications in the engine's lock, right after its first full sync; False if stopped first.

        A cold start announces every element (over 100,000 at 10k Services):
        the kernel builds notifications only for listeners, and this thread
        would read them while the sync encodes. The first full sync reads the
        kernel back, so what others did before it started is repaired by it.
        Commits during it are counted (the generation's growth beyond the
        sync's own commits): as they may have touched any table, they only
        ask for one more full sync, which changes nothing unless kproxy's
        tables were touched (no warning, no drift metric).
        """
        readings: dict[str, tuple[int, int] | None] = {}
        done = threading.Event()

        def before() -> None:
            readings["before"] = self._reading()

        def after() -> None:
            try:
                self.monitor.subscribe()
                self.listening.set()
            except OSError as exc:
                log.warning("cannot subscribe to ruleset notifications (%s); the periodic check goes on", exc)
            readings["after"] = self._reading()
            done.set()

        self.engine.bracket_first_full_sync(before, after)
        while not done.wait(1.0):
            if self.stop_event.is_set():
                return False
        first, last = readings.get("before"), readings.get("after")
        if last is not None:
            self._fence, self._last_generation = last, last[1]
        foreign = None if first is None or last is None else (last[1] - first[1]) - (last[0] - first[0])
        if foreign is None or foreign > 0:
            log.info("%s transaction(s) by other programs during kproxy's first full sync, before it read notifications: "
                     "one more full sync checks kproxy's tables", "some" if foreign is None else foreign)
            self.engine.request_full_sync()
        return True

    def _reading(self) -> tuple[int, int] | None:
        """(the engine's commits, the ruleset generation), in the engine's lock (held by the caller: re-entrant)."""
        try:
            return self.engine.fence(self.monitor.generation, timeout=1.0)
        except OSError as exc:
            log.warning("cannot read the ruleset generation: %s", exc)
            return None

    def _seen(self, commits: list[Commit]) -> None:
        for commit in commits:
            self._last_generation = commit.generation
            if commit.touches_kproxy and not self.engine.committed_by(commit.pid):
                self._drift(reason_of(commit), _describe(commit))

    def _drift(self, reason: str, what: str) -> None:
        starts = self.pacer.drift(self.clock())
        if starts:
            log.warning("another program changed kproxy's tables: %s; restoring them", what)
        else:
            log.debug("another program changed kproxy's tables again: %s", what)
        self._pending = self._pending or reason

    def _repair(self, now: float) -> None:
        reason, self._pending = self._pending, None
        assert reason is not None
        self.engine.request_full_sync()
        self.observer.drift_repaired(reason)
        self.pacer.repaired(now)

    def _take_fence(self) -> tuple[int, int] | None:
        try:
            fence = self.engine.fence(self.monitor.generation, timeout=5.0)
        except OSError as exc:
            log.warning("cannot read the ruleset generation: %s", exc)
            return None
        if fence is not None:
            self._fence = fence
            self._last_generation = fence[1]
        return fence

    def _notifications_lost(self) -> None:
        """Count: if the generation grew more than our own commits since the fence, someone else committed."""
        before = self._fence
        after = self._take_fence()
        if before is None or after is None:
            self._drift("notifications_lost", "notifications were lost and the generation could not be checked")
        elif after[1] - before[1] > after[0] - before[0]:
            foreign = (after[1] - before[1]) - (after[0] - before[0])
            self._drift("notifications_lost", f"{foreign} transaction(s) by other programs while notifications were lost")

    def _check(self) -> None:
        """The periodic check: the generation is the last one seen, and every table kproxy programmed exists."""
        try:
            self._seen(self.monitor.read(0.0))
            missing = sorted(f for f in self.engine.programmed_families() if not self.monitor.has_table(f))
        except NotificationsLost:
            self._notifications_lost()
            return
        except OSError as exc:
            log.warning("the periodic ruleset check failed: %s", exc)
            return
        if missing:
            self._drift("table_missing", f"{' and '.join(f'{f} kproxy' for f in missing)} missing")
        before = self._fence
        after = self._take_fence()
        if before is not None and after is not None and after[1] - before[1] > after[0] - before[0] \
                and self._last_generation != after[1]:
            self._drift("generation_mismatch", "the ruleset changed without a notification kproxy saw")
