"""The sync loop: when the proxier syncs (upstream's BoundedFrequencyRunner, with kproxy's deadlines)."""

from __future__ import annotations

import logging
import threading

from kproxy.daemon.proxier import Proxier

log = logging.getLogger(__name__)


class SyncRunner(threading.Thread):
    """Runs ``proxier.sync`` no more often than ``min_period``, at least every ``period``.

    A failed sync is retried after a capped exponential backoff (never longer
    than ``period``), as a full sync.
    Nothing runs until the proxier is ready (Services and slices listed once).
    """

    def __init__(
        self,
        proxier: Proxier,
        min_period: float,
        period: float,
        stop: threading.Event,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        super().__init__(name="kproxy-sync", daemon=True)
        self.proxier = proxier
        self.min_period = min_period
        self.period = period
        self.stop_event = stop
        self.backoff = backoff
        self.failures = 0
        self._last_start = float("-inf")

    def wake(self) -> None:
        with self.proxier.lock:
            self.proxier.changed.notify_all()

    def run(self) -> None:
        clock = self.proxier.clock
        retry_at: float | None = None
        next_periodic = clock() + self.period
        while not self.stop_event.is_set():
            with self.proxier.lock:
                now = clock()
                earliest = max(self._last_start + self.min_period, retry_at or float("-inf"))
                ready = self.proxier.ready
                due = ready and (self.proxier.has_work(now) or now >= next_periodic)
                if not due or now < earliest:
                    deadline = next_periodic
                    if ready and self.proxier.has_work(now):
                        deadline = min(deadline, earliest)
                    elif ready:
                        nd = self.proxier.next_deadline()
                        if nd is not None:
                            deadline = min(deadline, max(nd, earliest))
                    self.proxier.changed.wait(timeout=max(0.001, min(deadline - now, 1.0)))
                    continue
            if self.stop_event.is_set():
                break
            self._last_start = clock()
            next_periodic = self._last_start + self.period
            try:
                self.proxier.sync()
                self.failures = 0
                retry_at = None
            except Exception as exc:  # a sync must never kill the loop
                self.failures += 1
                # Never longer than the sync period, as upstream retries a failed sync after syncPeriod.
                delay = min(self.backoff[1], self.period, self.backoff[0] * 2 ** (self.failures - 1))
                retry_at = clock() + delay
                log.warning("sync failed (attempt %d), full resync in %.1fs: %s", self.failures, delay, exc)
