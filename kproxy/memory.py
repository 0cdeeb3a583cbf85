"""The one memory tool every layer uses: pausing the cyclic GC while building many acyclic objects.

It imports nothing from kproxy, so any layer may import it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_pauses = 0
"""How many ``gc_paused`` blocks are running now, in every thread."""
_resume = False
"""Whether the GC was on when the first of them began: it is turned back on when the last one ends."""


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects that never form cycles.

    Converting 10k Services allocates millions of objects; generational
    collections triggered by that alone more than double the time.

    The switch is the whole process's, and the daemon's watchers convert their
    lists in two threads at once: the pauses are counted, so the GC stays off
    until the last one ends (the first list to end must not turn it back on
    under the other, where a full collection would walk every object the lists
    made: 0.2 s of a 10k cold start).
    """
    global _pauses, _resume
    with _lock:
        if _pauses == 0:
            _resume = gc.isenabled()
        _pauses += 1
        gc.disable()
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()


@contextlib.contextmanager
def gc_running() -> Iterator[None]:
    """Run the cyclic GC, even inside ``gc_paused`` or a run that turned it off, while making garbage only it frees.

    pyroute2's parsed netlink messages hold reference cycles: listing conntrack
    leaves about 110 objects per entry for the GC, which ``--once`` (GC off for
    its whole run) would otherwise keep until it exits. If the GC was off, what
    is left is collected on the way out (cheap after a sync: the long-lived
    tables are frozen out of its sight), and the GC is turned off again.
    """
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was_enabled:
            gc.collect()
            gc.disable()
