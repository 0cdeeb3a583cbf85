"""kproxy.memory: the cyclic GC's pause, shared by threads that build many objects at once."""

from __future__ import annotations

import gc
import threading

from kproxy.memory import gc_paused


def test_overlapping_pauses_in_two_threads_keep_the_gc_off_until_the_last_ends() -> None:
    """The daemon's watchers convert their lists at the same time: the first to finish must not turn the GC back on."""
    assert gc.isenabled()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with gc_paused():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(5)
    with gc_paused():
        second_in.set()
        assert first_out.wait(5)
        thread.join(5)
        seen["after the first ended"] = gc.isenabled()
    seen["after both"] = gc.isenabled()
    assert seen == {"after the first ended": False, "after both": True}


def test_a_pause_begun_with_the_gc_off_leaves_it_off() -> None:
    """A one-shot run turns the GC off for good: no pause inside it turns it back on."""
    gc.disable()
    try:
        with gc_paused(), gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
