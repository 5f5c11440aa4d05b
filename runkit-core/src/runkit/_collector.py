"""Garbage-collector settings for a node process (``runkit run``).

A node allocates a few dozen short-lived containers per command (coroutines,
events, futures of its callers and its partitions). With CPython's default
first threshold (700 allocations) the cyclic collector runs every few dozen
commands and each run walks every live coroutine of every waiting caller:
about 15% of a node's CPU per command in ``benchmarks/throughput.py`` on the
memory driver. Reference counting frees nearly all of it anyway; the collector
is only needed for cycles, which are rare on the hot path.

``tuned_collector()`` raises the first threshold to ``NODE_GC_THRESHOLD`` and
freezes the start-up heap (modules, the application, the engine), so full
collections skip it. It restores both on exit, so it is safe in a process
that goes on to do other things (tests).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NODE_GC_THRESHOLD", "tuned_collector"]

#: The collector's first-generation threshold in a node process (CPython: 700).
NODE_GC_THRESHOLD = 10_000


@contextmanager
def tuned_collector() -> Iterator[None]:
    """Run the block with the node's collector settings (see the module docstring)."""
    thresholds = gc.get_threshold()
    gc.collect()  # nothing collectable gets frozen
    gc.freeze()
    gc.set_threshold(max(NODE_GC_THRESHOLD, thresholds[0]), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
