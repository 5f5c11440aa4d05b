"""Which partitions this node owns.

The engine asks an ``Ownership`` whether it owns a partition and waits for its
changes; the per-partition runner starts and stops partition work accordingly.
``SingleNodeOwnership`` owns everything. The membership module (rendezvous
hashing over heartbeats) provides another implementation of the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import anyio

__all__ = ["Generation", "Ownership", "SingleNodeOwnership", "StaticOwnership"]


class Ownership(Protocol):
    """A node's current view of which partitions it owns.

    ``generation`` increases every time the view may have changed; callers read
    it, act on ``owns()``, then ``wait_changed(generation)`` so that no change is
    missed between the two. So ``owns()`` must not change its answer without a
    generation increase (e.g. by reading a clock): a caller would act on the
    new answer once and never be woken to act on the next.
    """

    @property
    def generation(self) -> int:
        """A counter that increases whenever ownership may have changed."""
        ...

    def owns(self, partition_id: str) -> bool:
        """Whether this node owns the partition (a partition UUID string) now."""
        ...

    async def wait_changed(self, generation: int) -> int:
        """Wait until the generation differs from *generation*; return the new one."""
        ...


class Generation:
    """A counter of changes that can be waited on (the ``generation`` of an ``Ownership``)."""

    def __init__(self) -> None:
        self.value = 0
        self._changed: anyio.Event | None = None

    def bump(self) -> None:
        """Count a change and wake the waiters."""
        self.value += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self, generation: int) -> int:
        """Wait until the value differs from *generation*; return the new one."""
        while self.value == generation:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        return self.value


class SingleNodeOwnership:
    """A single node: owns every partition, forever."""

    @property
    def generation(self) -> int:
        """Always 0: nothing ever changes."""
        return 0

    def owns(self, partition_id: str) -> bool:
        """Always ``True``."""
        del partition_id
        return True

    async def wait_changed(self, generation: int) -> int:
        """Never returns (until cancelled)."""
        del generation
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class StaticOwnership:
    """An explicitly assigned set of partitions that can be changed at run time.

    Useful for tests and tools, and a simple model of what membership does.
    """

    def __init__(self, owned: set[str] | frozenset[str] = frozenset()) -> None:
        self._owned = frozenset(owned)
        self._generation = Generation()

    @property
    def generation(self) -> int:
        """Increases on every ``assign``."""
        return self._generation.value

    def owns(self, partition_id: str) -> bool:
        """Whether *partition_id* is currently assigned to this node."""
        return partition_id in self._owned

    def assign(self, owned: set[str] | frozenset[str]) -> None:
        """Replace the owned set and wake the waiters."""
        self._owned = frozenset(owned)
        self._generation.bump()

    async def wait_changed(self, generation: int) -> int:
        """Wait for the next ``assign`` if *generation* is current."""
        return await self._generation.wait_changed(generation)
