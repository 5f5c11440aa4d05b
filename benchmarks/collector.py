"""Time spent in CPython's cyclic garbage collector, per generation.

``cProfile`` and ``py-spy`` attribute a collection to whichever call happened
to allocate when it started, so its cost is spread thinly over the profile.
``CollectorTimer`` times every collection through ``gc.callbacks`` inside
its ``measuring()`` block, and can switch the collector off for that window
instead (an upper bound on what collecting costs, never a setting: cycles are
then not freed).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs

__all__ = ["GENERATIONS", "CollectorTimer"]

GENERATIONS = ("young", "middle", "full")


@attrs.define
class CollectorTimer:
    """Counts and times collections by generation while ``measuring()``."""

    counts: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    seconds: list[float] = attrs.field(factory=lambda: [0.0, 0.0, 0.0])
    longest: float = 0.0
    _started: float | None = None  # set by a collection's "start" seen while measuring

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self._started = None
            generation = info["generation"]
            self.counts[generation] += 1
            self.seconds[generation] += took
            self.longest = max(self.longest, took)

    @contextmanager
    def measuring(self, *, disable: bool = False) -> Iterator[None]:
        """Time collections inside the block; with *disable*, collect nothing there."""
        was_enabled = gc.isenabled()
        # Registered only for the block, so collections outside it are never seen.
        gc.callbacks.append(self._callback)
        if disable:
            gc.disable()
        try:
            yield
        finally:
            gc.callbacks.remove(self._callback)
            self._started = None
            if disable and was_enabled:
                gc.enable()

    @property
    def total(self) -> float:
        """Seconds spent collecting, all generations."""
        return sum(self.seconds)

    def describe(self) -> str:
        """One line: collections and seconds by generation, and the longest pause."""
        parts = [
            f"{n} {name} ({s:.2f} s)"
            for name, n, s in zip(GENERATIONS, self.counts, self.seconds, strict=True)
        ]
        return ", ".join(parts) + f"; longest pause {self.longest * 1000:.1f} ms"
