"""Process instance records and the node's cache of them (ADR 0006).

``ProcessRecord`` is what ``<app>/process/<handler>`` stores per instance.
``InstanceCache`` keeps, per process handler on this node, the instances it
handled recently: the record as stored, its revision and the live root, so
handling an event of a cached instance costs no read, and the next commit is
a write conditional on the cached revision.

Rules the runner (``processes.py``, and ``process_outbox.py`` for clearing
outboxes) keeps, which make a cached entry safe to use:

- Only what a commit produced goes in: the entry is put after the commit *and*
  the dispatch of its outbox succeeded, so a cached entry's outbox is always
  dispatched (it may still be in the stored record, see ``dispatched_at``).
- Anything that may leave the entry wrong drops it: a handler failure (the
  root is changed in place), a ``Conflict`` or an ambiguous write, a
  cancellation, and the loss of the partition whose consumer last wrote it.
- What the entry says can only be trusted where it cannot be out of date: an
  ended instance stays ended and a stream position only grows, so skipping on
  those is right even if another node wrote the instance since; "this deadline
  is not pending" is not (another node may have scheduled it since), so that
  is checked against a fresh read.

An entry whose stored record still holds a dispatched outbox is *dirty*: the
next commit of the instance writes the record without that outbox. If no
commit comes within a checkpoint interval, the consumer writes the record once
more without it (``due_clears``, ``process_outbox.py``), so an outbox is never
re-dispatched long after its commands were handled (the commands side
deduplicates only recent IDs). Dirty entries are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

import anyio
import attrs
import msgspec

from .deadlines import DeadlineEntry

__all__ = [
    "CachedInstance",
    "InstanceCache",
    "InstanceLock",
    "OutboxDeadline",
    "ProcessRecord",
    "ProcessRoot",
]


class ProcessRoot(Protocol):
    """The parts of a process root the engine uses."""

    def marshal_binary(self) -> bytes: ...
    def unmarshal_binary(self, data: bytes) -> None: ...


class OutboxDeadline(msgspec.Struct, frozen=True, kw_only=True):
    """A deadline waiting in an outbox, with the home partition it goes to."""

    partition: int
    entry: DeadlineEntry


class ProcessRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The stored state of one process instance (msgpack, keyed by instance ID).

    Attributes:
        root: ``marshal_binary()`` of the root; ``None`` until ``mutate`` is
            first called (the root is then ``handler.new()``), and once ended.
        ended: ``end()`` was called; the instance never handles again.
        positions: Stream ID -> offset of the last event handled from it.
        pending_deadlines: IDs of scheduled deadlines not yet handled; a
            deadline fires only while it is listed here.
        commands: Outbox: encoded envelopes of produced commands to accept.
        deadlines: Outbox: scheduled deadlines to append to their journal.
        through: (stream journal position, step index) of the last process
            step of the home partition the record includes, when the record
            is derived from the stream (ADR 0010); ``None`` for a record
            written by its consumers (ADR 0006), which precedes every step.
            The materialiser replaces a stored record only with one further
            through the stream, so a stale owner never overwrites a newer one.
    """

    root: bytes | None = None
    ended: bool = False
    positions: dict[str, int] = msgspec.field(default_factory=dict)
    pending_deadlines: list[str] = msgspec.field(default_factory=list)
    commands: list[bytes] = msgspec.field(default_factory=list)
    deadlines: list[OutboxDeadline] = msgspec.field(default_factory=list)
    through: tuple[int, int] | None = None

    @property
    def has_outbox(self) -> bool:
        """Whether commands or deadlines are in the outbox."""
        return bool(self.commands or self.deadlines)

    def without_outbox(self) -> ProcessRecord:
        """The record with its (dispatched) outbox left out."""
        return msgspec.structs.replace(self, commands=[], deadlines=[])


@attrs.frozen
class CachedInstance:
    """One cached instance: the record as stored, its revision and the live root.

    Attributes:
        record: The record at ``revision``; its outbox, if any, is dispatched.
        revision: The stored revision (the next commit is conditional on it).
        root: The root ``record.root`` decodes to (``handler.new()`` without
            one); handling changes it in place.
        partition: The partition whose consumer or timer last wrote or loaded it.
        dispatched_at: ``anyio.current_time()`` when the outbox still in the
            stored record was dispatched; ``None`` if the record has none.
        held: The lowest offset, in ``partition``'s stream, of the events
            whose handling left that outbox in the record (``None``: none, or
            a deadline's). The consumer's saved checkpoint stays at or below
            it until the outbox is cleared, so a consumer that stops first
            leaves the events to be delivered again, and the next owner's
            load dispatches and clears the outbox within seconds, not at the
            instance's next use, perhaps hours later (``hold_floor``).
    """

    record: ProcessRecord
    revision: str
    root: ProcessRoot
    partition: int
    dispatched_at: float | None = None
    held: int | None = None

    @property
    def dirty(self) -> bool:
        """Whether the stored record still holds a dispatched outbox."""
        return self.dispatched_at is not None


class InstanceCache:
    """A bounded LRU of ``CachedInstance`` per instance ID, plus per-instance locks.

    One per process handler on a node, shared by its consumers on every owned
    partition and by the deadline timers, so one node handles an instance in
    one place at a time (``lock``) and its partitions do not conflict with
    each other. At most *capacity* clean entries are kept.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._entries: OrderedDict[str, CachedInstance] = OrderedDict()
        # Partition -> its dirty instances (``CachedInstance.partition``): each
        # partition's consumer looks only at its own, every checkpoint interval.
        self._dirty: dict[int, set[str]] = {}
        # Held instances -> the tasks waiting for them, in arrival order.
        self._locks: dict[str, deque[anyio.Event]] = {}
        # Dirty entries taken out for handling (``take``): they still hold
        # their partition's checkpoint (``hold_floor``) until put back.
        self._taken: dict[str, CachedInstance] = {}
        # Partition -> how many times it was dropped: an entry obtained before
        # a drop of its partition must not be put back after it (``put``).
        self._epochs: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lock(self, instance_id: str) -> InstanceLock:
        """Hold the instance: one handling (or clear) of it at a time on this node."""
        return InstanceLock(self._locks, instance_id)

    def busy(self, instance_id: str) -> bool:
        """Whether the instance is held, or waited for, by a task of this node."""
        return instance_id in self._locks

    def get(self, instance_id: str) -> CachedInstance | None:
        """The cached entry (and mark it recently used), or ``None``."""
        entry = self._entries.get(instance_id)
        if entry is not None:
            self._entries.move_to_end(instance_id)
        return entry

    def epoch(self, partition: int) -> int:
        """How many times *partition* was dropped (see ``put``)."""
        return self._epochs.get(partition, 0)

    def take(self, instance_id: str) -> CachedInstance | None:
        """Take the entry out of the cache to handle the instance (lock held).

        Handling changes the root in place, so the entry is out until ``put``
        back; a dirty one meanwhile still holds its partition's checkpoint, so
        a consumer stopping then saves no checkpoint past the events whose
        outbox it holds. ``restore`` puts it back if nothing else is.
        """
        entry = self._entries.pop(instance_id, None)
        if entry is not None and entry.dirty:
            self._taken[instance_id] = entry
        return entry

    def forget_taken(self, instance_id: str) -> None:
        """A taken entry's outbox is gone from the stored record: it stops holding."""
        entry = self._taken.pop(instance_id, None)
        if entry is not None:
            self._undirty(instance_id, entry.partition)

    def restore(self, instance_id: str, root_of: Callable[[ProcessRecord], ProcessRoot]) -> None:
        """The handling is over: a taken entry not put back goes back as it was taken.

        Its root, which the handling may have changed in place, is decoded
        again from its record by *root_of* (if that fails, the entry is
        dropped). Nothing else changed: whatever the handling wrote since, the
        entry's revision is then stale, and its next write conflicts.
        """
        entry = self._taken.pop(instance_id, None)
        if entry is None:
            return
        try:
            root = root_of(entry.record)
        except Exception:
            self._undirty(instance_id, entry.partition)
            return
        self._entries[instance_id] = attrs.evolve(entry, root=root)
        self._entries.move_to_end(instance_id)

    def put(self, instance_id: str, entry: CachedInstance, epoch: int | None = None) -> None:
        """Cache *entry*, evicting the least recently used clean entries over capacity.

        With *epoch* (``epoch(entry.partition)`` when the entry was obtained),
        a dirty entry whose partition was dropped since is not cached: no
        consumer here clears that partition's outboxes any more, and its next
        owner delivers the events that left the outbox again (the checkpoint
        saved at the drop did not pass them).
        """
        if epoch is not None and entry.dirty and self.epoch(entry.partition) != epoch:
            self.drop(instance_id)
            return
        previous = self._entries.get(instance_id) or self._taken.pop(instance_id, None)
        if (
            previous is not None
            and previous.dirty
            and (not entry.dirty or previous.partition != entry.partition)
        ):
            self._undirty(instance_id, previous.partition)
        self._entries[instance_id] = entry
        self._entries.move_to_end(instance_id)
        if entry.dirty:
            self._dirty.setdefault(entry.partition, set()).add(instance_id)
        excess = len(self._entries) - self._capacity
        if excess <= 0:
            return
        # Dirty entries stay until cleared: dropping one would let a later
        # load dispatch its outbox again, long after the first time.
        victims: list[str] = []
        for key, cached in self._entries.items():  # least recently used first
            if not cached.dirty:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            del self._entries[key]

    def drop(self, instance_id: str) -> None:
        """Forget the instance (its next use reads the stored record)."""
        entry = self._entries.pop(instance_id, None) or self._taken.pop(instance_id, None)
        if entry is not None and entry.dirty:
            self._undirty(instance_id, entry.partition)

    def _undirty(self, instance_id: str, partition: int) -> None:
        dirty = self._dirty.get(partition)
        if dirty is not None:
            dirty.discard(instance_id)
            if not dirty:
                del self._dirty[partition]

    def drop_partition(self, partition: int) -> None:
        """Forget every entry last written or loaded through *partition* (lost or stopped)."""
        self._epochs[partition] = self.epoch(partition) + 1
        for key in [k for k, e in self._entries.items() if e.partition == partition]:
            self.drop(key)
        for key in [k for k, e in self._taken.items() if e.partition == partition]:
            self.drop(key)

    def _dirty_entry(self, instance_id: str) -> CachedInstance:
        entry = self._entries.get(instance_id)
        return entry if entry is not None else self._taken[instance_id]

    def hold_floor(self, partition: int) -> int | None:
        """The lowest ``held`` offset of *partition*'s dirty entries (``None``: none).

        Entries taken out for handling count too.
        """
        held = [
            entry.held
            for entry in map(self._dirty_entry, self._dirty.get(partition, ()))
            if entry.held is not None
        ]
        return min(held, default=None)

    def due_clears(self, partition: int, dispatched_before: float) -> list[str]:
        """Dirty instances of *partition* whose outbox was dispatched before the given time.

        Not those taken out for handling: their commit drops the outbox.
        """
        return [
            key
            for key in self._dirty.get(partition, ())
            if key in self._entries
            and (self._entries[key].dispatched_at or 0.0) <= dispatched_before
        ]


class InstanceLock:
    """``async with``: hold one instance of an ``InstanceCache`` (see ``InstanceCache.lock``).

    Taking a free instance does not yield to the event loop (an ``anyio.Lock``
    does, twice): one is taken for every process event handled. A waiter is
    handed the instance directly by the holder, in arrival order; a waiter
    cancelled after the hand-off passes it on.
    """

    __slots__ = ("_held", "_instance_id")

    def __init__(self, held: dict[str, deque[anyio.Event]], instance_id: str) -> None:
        self._held = held
        self._instance_id = instance_id

    async def __aenter__(self) -> None:
        waiters = self._held.get(self._instance_id)
        if waiters is None:
            self._held[self._instance_id] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():
                self._release()  # handed over as we were cancelled: pass it on
            else:
                waiters.remove(turn)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        waiters = self._held[self._instance_id]
        if waiters:
            waiters.popleft().set()
        else:
            del self._held[self._instance_id]
