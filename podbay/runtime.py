"""Settings of the podbay process itself, applied once a long-running podbay has started
(``podbay run``, ``podbay chat``)."""

from __future__ import annotations

import gc

# CPython's defaults (700, 10, 10) suit short scripts. A burst of messages makes podbay
# allocate a few container objects per message (a task, futures, coroutine frames, a row)
# that live for a moment; with the default the young generation was collected ~200 times
# in the dispatcher benchmark's 10,000 messages, and each pass that reached the older
# generations walked everything the process holds: 10-20 % of the time. Young objects
# are now collected every 50,000 new ones; the older generations as before (every 10
# passes of the one below). Cyclic garbage is still collected, a little later.
GC_THRESHOLDS = (50_000, 10, 10)


def tune_collector() -> None:
    """Tune the garbage collector for a server: what is alive once podbay has started
    (modules, settings, the store, the transports) is moved out of the collector's sight
    (``gc.freeze``: it lives as long as the process), and young objects are collected less
    often (see GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
