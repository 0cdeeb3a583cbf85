"""The /metrics body: one collection at a time, shared by the scrapers that come while it runs or just after.

A collection renders the registry with prometheus_client's encoder (the one
the scraper's ``Accept`` header chooses: Prometheus text 0.0.4 or
OpenMetrics), then appends the text of each ``TextSource`` (the per-Service
counters, written directly; see ``ProxierCollector.exposition``), before
OpenMetrics' ``# EOF``.

* At most one collection runs at a time, whatever the number of scrapers.
* A scraper that comes while one runs waits for it; if it is for the same
  content type, it takes its result.
* A result less than ``max_age`` seconds old is answered again as it is.
* What is kept is bounded: the last result of each format (text,
  OpenMetrics), and nothing per scraper. The waiting scrapers share one
  ``bytes`` object, which the HTTP server writes to each socket without a
  copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

OPENMETRICS = "application/openmetrics-text"
EOF = b"# EOF\n"
MAX_AGE = 1.0
"""Seconds a collection's result is shared with later scrapers."""


class TextSource(Protocol):
    """Metric families written as exposition text directly (each family whole, never also in the registry)."""

    def exposition(self, openmetrics: bool = False) -> str: ...


@dataclass(frozen=True, slots=True)
class _Result:
    content_type: str
    body: bytes
    finished: float


class SharedExposition:
    """Renders /metrics bodies, one collection at a time; results younger than ``max_age`` are shared."""

    def __init__(
        self,
        registry: CollectorRegistry,
        sources: Sequence[TextSource] = (),
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.sources = tuple(sources)
        self.max_age = max_age
        self.clock = clock
        self._changed = threading.Condition()
        self._running = False
        self._finished = 0
        """Collections finished so far (waiters wake when it moves)."""
        self._results: dict[bool, _Result] = {}
        """The last result of each format: text (False), OpenMetrics (True)."""
        self.collections = 0
        """Collections run so far (for tests)."""

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for a scraper that sent ``accept``."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith(OPENMETRICS)
        with self._changed:
            while True:
                result = self._results.get(openmetrics)
                if (result is not None and result.content_type == content_type
                        and self.clock() - result.finished < self.max_age):
                    return result.body, content_type
                if not self._running:
                    break
                finished = self._finished
                while self._finished == finished:
                    self._changed.wait()
            self._running = True
        body = None
        try:
            body = self._collect(encoder, openmetrics)
            return body, content_type
        finally:
            with self._changed:
                self._running = False
                self._finished += 1
                self.collections += 1
                if body is not None:
                    self._results[openmetrics] = _Result(content_type, body, self.clock())
                self._changed.notify_all()

    def _collect(self, encoder: Callable[[CollectorRegistry], bytes], openmetrics: bool) -> bytes:
        started = time.perf_counter()
        body = encoder(self.registry)
        if openmetrics and body.endswith(EOF):
            body = body[: -len(EOF)]
        parts = [body]
        parts += [source.exposition(openmetrics).encode() for source in self.sources]
        if openmetrics:
            parts.append(EOF)
        joined = b"".join(parts)
        log.debug("collected /metrics (%d bytes) in %.1f ms", len(joined), (time.perf_counter() - started) * 1000)
        return joined
