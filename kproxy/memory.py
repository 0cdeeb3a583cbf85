"""The one memory tool every layer uses: pausing the cyclic GC while building many acyclic objects.

It imports nothing from kproxy, so any layer may import it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects that never form cycles.

    Converting 10k Services allocates millions of objects; generational
    collections triggered by that alone more than double the time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
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
