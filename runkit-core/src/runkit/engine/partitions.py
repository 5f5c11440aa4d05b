"""Application partitions: identities, workload hashing, contexts and the runner.

An application's work is split into ``P`` partitions (fixed in ``<app>/meta`` when
the application first starts). Partition ``i`` has the UUID
``uuid5(UUID(app_key), "partition/" + str(i))``, which is also its event stream ID.

A *workload key* names a unit of work that must stay on one partition; it maps
to a partition by XXH3-64 of its UTF-8 bytes modulo ``P`` (stable across
processes, versions and platforms):

- aggregate or process instance: ``instance_workload(handler_key, instance_id)``;
- integration preferring minimal concurrency: the handler key;
- any other integration command: the command ID.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Protocol

import anyio
import attrs
import xxhash
from anyio.abc import TaskGroup

from ..config import ApplicationConfig
from ..persistence import Provider
from .envelope import Envelope
from .ids import derived_id
from .logs import RateLimitedLog, describe_error
from .settings import EngineSettings
from .streams import PartitionStream

__all__ = [
    "NodeContext",
    "OwnershipView",
    "PartitionContext",
    "PartitionRunner",
    "instance_workload",
    "partition_id",
    "partition_of",
]

_log = logging.getLogger("runkit.engine.partitions")


@functools.lru_cache(maxsize=4096)
def partition_id(app_key: str, index: int) -> str:
    """The UUID of partition *index* of the application *app_key* (also its stream ID)."""
    return derived_id(app_key, f"partition/{index}")


def instance_workload(handler_key: str, instance_id: str) -> str:
    """The workload key of an aggregate or process instance."""
    # Handler keys are UUIDs, so the first "/" separates them unambiguously.
    return f"{handler_key}/{instance_id}"


def partition_of(workload: str, count: int) -> int:
    """The partition index of a workload key among *count* partitions."""
    return int(xxhash.xxh3_64_intdigest(workload.encode("utf-8")) % count)


@attrs.frozen
class PartitionContext:
    """What the work running on one owned partition gets (events side seam).

    Attributes:
        app: The application's configuration.
        settings: The engine settings.
        index: The partition index, ``0 <= index < partition_count``.
        partition_id: The partition UUID, also its event stream ID.
        partition_count: How many partitions the application has.
        provider: The persistence provider.
        stream: The partition's event stream.
        accept: Durably accept produced commands; each goes to its own
            partition's inbox. Command IDs should be deterministic, so a
            repeated call cannot duplicate them (they are deduplicated by ID).
        partition_of: Workload key -> partition index.
        now: The engine clock (UTC).
    """

    app: ApplicationConfig
    settings: EngineSettings
    index: int
    partition_id: str
    partition_count: int
    provider: Provider
    stream: PartitionStream
    accept: Callable[[Sequence[Envelope]], Awaitable[None]]
    partition_of: Callable[[str], int]
    now: Callable[[], datetime]


@attrs.frozen
class NodeContext:
    """What node-wide work of an application gets (``ConsumerSet.run_node``).

    Attributes:
        app: The application's configuration.
        settings: The engine settings.
        node_id: This node's UUID string.
        partition_count: How many partitions the application has.
        provider: The persistence provider.
        accept: As in ``PartitionContext``.
        partition_of: Workload key -> partition index.
        now: The engine clock (UTC).
    """

    app: ApplicationConfig
    settings: EngineSettings
    node_id: str
    partition_count: int
    provider: Provider
    accept: Callable[[Sequence[Envelope]], Awaitable[None]]
    partition_of: Callable[[str], int]
    now: Callable[[], datetime]


class OwnershipView(Protocol):
    """The part of ``ownership.Ownership`` the runner needs."""

    @property
    def generation(self) -> int:
        """Increases whenever the set of owned partitions may have changed."""
        ...

    def owns(self, partition_id: str) -> bool:
        """Whether this node owns the partition now."""
        ...

    async def wait_changed(self, generation: int) -> int:
        """Return the current generation once it differs from *generation*."""
        ...


class PartitionRunner:
    """Runs ``run_one(index)`` for each owned partition, following ownership changes.

    A partition whose work stops (ownership lost, or an unexpected error) is
    restarted after a short delay if this node still owns it; losing
    ownership cancels its work. A partition owned again before its cancelled
    work has wound down (its final flush) starts once that is done: two runs
    of one partition on one node would fence each other off the stream and
    unregister each other's executor.
    """

    def __init__(
        self,
        app_key: str,
        count: int,
        ownership: OwnershipView,
        run_one: Callable[[int], Awaitable[None]],
        *,
        restart_delay: float = 0.5,
        name: str | None = None,
    ) -> None:
        self._app_key = app_key
        self._name = name or app_key
        self._ids = [partition_id(app_key, i) for i in range(count)]
        self._ownership = ownership
        self._run_one = run_one
        self._restart_delay = restart_delay
        self._running: dict[int, anyio.CancelScope] = {}
        # Set when the latest run of a partition has ended, wind-down included.
        self._ended: dict[int, anyio.Event] = {}
        # One per runner: another application's (or engine's) failures of the
        # same partition index must not hold back this one's first line.
        self._restart_log = RateLimitedLog(_log, interval=30.0)

    async def run(self) -> None:
        """Run until cancelled."""
        async with anyio.create_task_group() as tg:
            generation = self._ownership.generation
            while True:
                self._reconcile(tg)
                generation = await self._ownership.wait_changed(generation)

    def _reconcile(self, tg: TaskGroup) -> None:
        for index, pid in enumerate(self._ids):
            owned = self._ownership.owns(pid)
            scope = self._running.get(index)
            if owned and scope is None:
                scope = anyio.CancelScope()
                self._running[index] = scope
                previous = self._ended.get(index)
                ended = self._ended[index] = anyio.Event()
                tg.start_soon(self._supervise, index, scope, previous, ended)
            elif not owned and scope is not None:
                # The counterpart of run_owned_partition's "taking partition":
                # without it a node's log never says what it stopped running.
                _log.info(
                    "application %s: releasing partition %d: this node no longer owns it",
                    self._name,
                    index,
                    extra={"app": self._app_key, "partition": index},
                )
                scope.cancel()
                del self._running[index]

    async def _supervise(
        self,
        index: int,
        scope: anyio.CancelScope,
        previous: anyio.Event | None,
        ended: anyio.Event,
    ) -> None:
        try:
            with scope:
                if previous is not None:
                    await previous.wait()
                while True:
                    try:
                        await self._run_one(index)
                    except Exception as exc:
                        # A partition failing over and over logs one line (with
                        # its traceback) per interval, not one per restart.
                        self._restart_log.log(
                            logging.ERROR,
                            index,
                            "application %s: partition %d stopped (%s); restarting if still owned",
                            self._name,
                            index,
                            describe_error(exc),
                            exc_info=exc,
                            extra={"app": self._app_key, "partition": index},
                        )
                    await anyio.sleep(self._restart_delay)
                    if not self._ownership.owns(self._ids[index]):
                        return
        finally:
            if self._running.get(index) is scope:
                del self._running[index]
            if previous is not None and not previous.is_set():
                # Cancelled while waiting: the next run waits for that one too.
                with anyio.CancelScope(shield=True):
                    await previous.wait()
            ended.set()
            if self._ended.get(index) is ended:
                del self._ended[index]
