"""Process steps as work of the instance's home partition (ADR 0010).

``HomeSteps`` runs on the owner of one partition *h* and handles the
deliveries of every process instance homed there
(``process_deliveries.home_partition``): events routed by the consumers of any
partition's stream, and the instances' deadlines. It is the instance's only
writer, so it needs no lock and no revision:

- **Per-partition instances.** Each instance's state (``InstanceState``) and
  live root are kept here (an LRU of at most ``cache_size`` idle instances);
  a miss loads the state with *load* (the derived keyspace record folded
  with the committed steps not yet written to it).
- **One group per instance at a time.** An instance with queued deliveries is
  handled by one of the partition's kept workers (``KeptWorkers``: no task
  per step), which takes every delivery queued so far and handles
  them in order (``handle_group``: skipping what the state says is done), up
  to ``process_concurrency`` instances at once. The step goes onto the
  partition's stream writer beside the batch's commands: **the stream append
  is the commit point and the fence**. The next group of the instance is
  handled at once against the state in memory, as aggregate commands are (if
  the append fails the partition is lost, and all of this with it).
- **Acknowledgement.** A delivery's *ack* is called once the record holding
  the step that handled, skipped or poisoned it is durable (with ``None``),
  or with the writer's error if it never will be; a delivery that was done
  already is acknowledged once the instance's steps before it are durable.
- **Failures**, as for commands: if a handler fails on one delivery of a
  group, the deliveries before it are handled again as a group, the failing
  one is retried alone with backoff and, after ``max_attempts`` (at once for
  a bug), recorded in the event poison store; a step then commits its
  position (``poisoned``), so a redelivery skips it.
- **Outboxes** are dispatched after the commit, per instance in commit order
  (deadlines to this partition's deadline journal, then commands through the
  acceptance path with IDs derived from the cause). ``dispatched`` is the
  stream header watermark below which every step's outbox is dispatched.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import anyio
import attrs
from anyio.abc import TaskGroup, TaskStatus

from ...persistence import LimitExceeded, PersistenceError
from ..logs import describe_error
from ..streams import OwnershipLost, ProcessStep, Publication, max_command_bytes
from ..workers import KeptWorkers
from .consumers_support import ConsumerOptions, sleep_backoff
from .process_deliveries import Delivery
from .process_instances import ProcessRoot
from .process_retries import MessageRetries
from .process_scopes import ProcessScope
from .process_state import InstanceState, StepFailed, handle_group, poisoned_step

if TYPE_CHECKING:
    from ..partitions import PartitionContext

__all__ = ["Ack", "DeliveriesBehind", "HomeHandler", "HomeSteps", "StepWriter"]

_log = logging.getLogger("runkit.engine.events.process_homes")

#: At most this many instances' outboxes are dispatched at once. A dispatch
#: that waits (a remote inbox slow to take its commands) holds one worker;
#: workers are kept, and only started when every one is busy, so a high
#: bound costs nothing while dispatches are quick.
OUTBOX_WORKERS = 256

#: Told that a delivery is durable (``None``), or that it never will be here.
Ack = Callable[[BaseException | None], None]
#: Loads an instance's committed state: (handler key, instance ID) -> state.
Load = Callable[[str, str], Awaitable[InstanceState]]
#: Told of each durable step: (handler key, instance ID, the instance's durable
#: state including it, the stream position of its record).
Committed = Callable[[str, str, InstanceState, int], None]


class DeliveriesBehind(Exception):
    """Deliveries for the instance wait in the home partition's inbox: use the inbox too.

    An instance skips an event at or below its recorded position for the
    event's stream, so a delivery handed over in memory must never overtake
    an earlier one of the same stream that went through the inbox.
    """


class HomeHandler(Protocol):
    """What ``HomeSteps`` needs of a process handler (``ProcessRunner``)."""

    key: str

    @property
    def retries(self) -> MessageRetries: ...

    async def invoke_delivery(
        self, ctx: PartitionContext, delivery: Delivery, root: ProcessRoot
    ) -> ProcessScope:
        """Call the handler for *delivery* against *root*; its scope (raises on failure)."""
        ...

    def root_from(self, data: bytes | None) -> ProcessRoot:
        """A live root from its ``marshal_binary()`` (a new one for ``None``)."""
        ...

    async def dispatch_step(
        self, ctx: PartitionContext, instance_id: str, step: ProcessStep
    ) -> None:
        """Dispatch a committed step's outbox, retrying until it is done."""
        ...


class StepWriter(Protocol):
    """The part of ``StreamWriter`` that commits steps."""

    def enqueue_step(
        self, step: ProcessStep, on_durable: Callable[[Publication], None] | None = None
    ) -> Publication: ...


@attrs.define(eq=False)
class _Instance:
    handler_key: str
    instance_id: str
    state: InstanceState | None = None
    #: The state as far as its steps are durable (``state`` may be ahead).
    durable: InstanceState | None = None
    root: ProcessRoot | None = None
    queue: deque[tuple[Delivery, Ack]] = attrs.field(factory=deque)
    running: bool = False
    #: Steps queued on the writer and not yet durable.
    in_flight: int = 0
    #: The acks of the last step queued: deliveries found done join them.
    trailing: list[Ack] | None = None
    #: The acks of the deliveries a worker has taken and not yet committed (or
    #: answered): told if the worker stops first, so no submitter waits for ever.
    in_hand: list[Ack] = attrs.field(factory=list)

    @property
    def idle(self) -> bool:
        return not self.running and not self.queue and self.in_flight == 0


class HomeSteps:
    """The process steps of the instances homed on one owned partition (module docstring)."""

    def __init__(
        self,
        ctx: PartitionContext,
        writer: StepWriter,
        handlers: Mapping[str, HomeHandler],
        *,
        load: Load,
        options: ConsumerOptions,
        record_limit: int,
        stream_partitions: Mapping[str, int] | None = None,
        committed: Committed | None = None,
    ) -> None:
        self._ctx = ctx
        self._writer = writer
        self._handlers = handlers
        self._load = load
        self._options = options
        self._max_step = max_command_bytes(record_limit)
        self._stream_partitions = stream_partitions or {}
        self._committed = committed
        #: Whether deliveries for (handler key, instance ID) are in the inbox,
        #: read or appended and not yet submitted (set by the partition's owner).
        self.behind: Callable[[str, str], bool] | None = None
        #: How far the partition's batch has read its inbox (set by the owner).
        self.inbox_read: Callable[[], int] | None = None
        self._instances: OrderedDict[tuple[str, str], _Instance] = OrderedDict()
        self._tg: TaskGroup | None = None
        # Both set by ``run``: the workers live in its task group.
        self._steps: KeptWorkers[_Instance] | None = None
        self._dispatchers: KeptWorkers[tuple[str, str]] | None = None
        self._stopped: BaseException | None = None
        # Outboxes not yet dispatched: record position -> how many; per instance, in order.
        self._undispatched: dict[int, int] = {}
        self._outboxes: dict[tuple[str, str], deque[tuple[int, ProcessStep]]] = {}
        # Instances whose outbox queue was filled before ``run`` (takeover).
        self._to_start: deque[tuple[str, str]] = deque()

    # -- what others call ------------------------------------------------------

    def submit(self, delivery: Delivery, ack: Ack, *, in_order: bool = False) -> None:
        """Queue *delivery* for its instance; *ack* is called once it is durable.

        Never blocks. *in_order*: the delivery comes from this partition's
        inbox or deadline timer, in order. Otherwise (a consumer's, in
        memory) it must not overtake deliveries of the instance still in the
        inbox: ``DeliveriesBehind`` is raised, and the submitter uses the
        inbox too. Raises ``OwnershipLost`` if the partition has stopped (the
        submitter then takes another path: the inbox).
        """
        if self._stopped is not None or self._steps is None:
            raise OwnershipLost("the home partition is not running")
        if delivery.handler_key not in self._handlers:
            raise ValueError(f"no process handler {delivery.handler_key} on this partition")
        if (
            not in_order
            and self.behind is not None
            and self.behind(delivery.handler_key, delivery.instance_id)
        ):
            raise DeliveriesBehind(delivery.instance_id)
        key = (delivery.handler_key, delivery.instance_id)
        inst = self._instances.get(key)
        new = inst is None
        if inst is None:
            inst = self._instances[key] = _Instance(*key)
        else:
            self._instances.move_to_end(key)
        inst.queue.append((delivery, ack))
        if not inst.running:
            inst.running = True
            self._steps.submit(inst)
        if new:
            # Only now: a new entry would count as idle and could be evicted
            # while in use, and its next delivery handled by a second worker.
            self._evict()

    @property
    def outboxes_sent(self) -> bool:
        """Whether every committed outbox is dispatched (or, stopped, left to the next owner)."""
        return not self._undispatched or self._tg is None

    def dispatched(self, next_position: int) -> int:
        """The stream position below which every committed step's outbox is dispatched."""
        return min(self._undispatched, default=next_position)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle deliveries until cancelled; then fail those not committed."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._steps = KeptWorkers(
                    tg.start_soon, self._run_instance, limit=self._options.process_concurrency
                )
                self._dispatchers = KeptWorkers(
                    tg.start_soon, self._dispatch_outboxes, limit=OUTBOX_WORKERS
                )
                while self._to_start:  # ``redispatch``'s, first
                    self._dispatchers.submit(self._to_start.popleft())
                try:
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    # Before the task group closes: a submission or a step the
                    # writer finds durable from now on (in their own tasks)
                    # must start no worker in it, which would raise there.
                    self._steps = self._dispatchers = None
        finally:
            # Steps the writer's final flush commits find no workers: their
            # outboxes stay below the dispatched watermark for the next owner.
            self._tg = self._steps = self._dispatchers = None
            self.close(OwnershipLost("the home partition stopped"))

    def close(self, error: BaseException) -> None:
        """Stop taking deliveries; tell the queued ones' submitters (*error*)."""
        if self._stopped is not None:
            return
        self._stopped = error
        for inst in self._instances.values():
            while inst.queue:
                _, ack = inst.queue.popleft()
                _call(ack, error)

    # -- handling ---------------------------------------------------------------

    def _evict(self) -> None:
        excess = len(self._instances) - self._options.process_cache_size
        if excess <= 0:
            return
        victims = [k for k, inst in self._instances.items() if inst.idle][:excess]
        for key in victims:
            del self._instances[key]

    async def _run_instance(self, inst: _Instance) -> None:
        try:
            while inst.queue and self._stopped is None:
                if inst.state is None:
                    await self._load_instance(inst)
                items = list(inst.queue)
                inst.queue.clear()
                inst.in_hand = [ack for _, ack in items]
                await self._handle(inst, items)
        finally:
            inst.running = False
            # Stopped (cancelled) with deliveries in a handler, a backoff or a
            # group behind a failing one: they never reach the writer, whose
            # acknowledgement their submitters wait for. A consumer would keep
            # the instance's later events from the inbox for good.
            left, inst.in_hand = inst.in_hand, []
            if left:
                error = self._stopped or OwnershipLost("the home partition stopped")
                for ack in left:
                    _call(ack, error)

    async def _load_instance(self, inst: _Instance) -> None:
        handler = self._handlers[inst.handler_key]
        failures = 0
        while True:
            try:
                try:
                    state = await self._load(inst.handler_key, inst.instance_id)
                except LimitExceeded:
                    # An instance ID the store cannot key was never stored: its
                    # deliveries are refused (poisoned) by ``_check_limits``.
                    state = InstanceState()
                inst.root = handler.root_from(state.root)
                inst.state = inst.durable = state
                return
            except PersistenceError as exc:
                failures += 1
                _log.warning(
                    "process %s on partition %d: cannot load instance %r; retrying: %s",
                    inst.handler_key,
                    self._ctx.index,
                    inst.instance_id,
                    describe_error(exc),
                )
                await sleep_backoff(self._options, failures)

    async def _handle(self, inst: _Instance, items: list[tuple[Delivery, Ack]]) -> None:
        """Handle *items* as one group; on a failure, as ADR 0006's groups are."""
        rest = items
        store_failures = 0
        while len(rest) > 1:
            try:
                await self._group(inst, rest)
                return
            except StepFailed as failed:
                index, error = failed.index, failed.error
            except LimitExceeded:
                for item in rest:  # the group's step is too large: each alone
                    await self._one(inst, item)
                return
            except PersistenceError as exc:
                store_failures += 1
                await sleep_backoff(self._options, store_failures)
                _log.warning("process step failed on the store; retrying: %s", describe_error(exc))
                continue
            except OwnershipLost:
                raise
            except Exception:
                # Not one delivery's failure (marshal_binary() of the root):
                # each alone, with its own retries and poisoning.
                for item in rest:
                    await self._one(inst, item)
                return
            if index > 0:
                await self._handle(inst, rest[:index])
            await self._one(inst, rest[index], failed=error)
            rest = rest[index + 1 :]
        if rest:
            # Most groups are one delivery that succeeds: tried at once, and
            # only a failure goes through the retries (as its first attempt).
            try:
                await self._group(inst, rest)
            except OwnershipLost:
                raise
            except Exception as exc:
                await self._one(inst, rest[0], failed=exc)

    async def _group(self, inst: _Instance, items: list[tuple[Delivery, Ack]]) -> None:
        assert inst.state is not None
        assert inst.root is not None
        handler = self._handlers[inst.handler_key]
        invoke = functools.partial(handler.invoke_delivery, self._ctx)
        try:
            handled = await handle_group(
                inst.state,
                inst.root,
                [d for d, _ in items],
                handler_key=inst.handler_key,
                instance_id=inst.instance_id,
                invoke=invoke,
            )
        except BaseException:
            # The root may have changed in place: back to the committed one.
            inst.root = handler.root_from(inst.state.root)
            raise
        step = handled.step
        if step is not None:
            try:
                self._check_limits(inst, step, handled.state)
            except LimitExceeded:
                # The same on every attempt: retried alone, then poisoned.
                inst.root = handler.root_from(inst.state.root)
                raise
        self._commit(inst, step, handled.state, [ack for _, ack in items])

    def _check_limits(self, inst: _Instance, step: ProcessStep, state: InstanceState) -> None:
        """Refuse a step whose record, or whose instance's derived record, the store cannot hold.

        Checked before the commit: the derived record is written behind the
        stream, where a refusal could only be retried for ever.
        """
        limits = self._ctx.provider.limits
        key = len(inst.instance_id.encode())
        if key > limits.max_key_bytes:
            raise LimitExceeded("key", key, limits.max_key_bytes)  # as the store says it
        size = step.size()
        if size > self._max_step:
            raise LimitExceeded("process step", size, self._max_step)
        record = 64 + len(state.root or b"") + 48 * len(state.positions) + 40 * len(state.pending)
        for stream_id in state.positions:
            record += len(stream_id)
        for d in state.pending:
            record += len(d)
        if record > limits.max_value_bytes:
            raise LimitExceeded("process instance record", record, limits.max_value_bytes)

    async def _one(
        self, inst: _Instance, item: tuple[Delivery, Ack], *, failed: Exception | None = None
    ) -> None:
        delivery, ack = item
        handler = self._handlers[inst.handler_key]
        done = False

        async def attempt() -> None:
            nonlocal done
            await self._group(inst, [item])
            done = True

        if delivery.stream is not None:
            stream_id, offset = delivery.stream
            poison_key = f"{handler.key}/event/{stream_id}/{offset}"
        else:
            poison_key = f"{handler.key}/deadline/{delivery.deadline_id}"
        await handler.retries.run(
            self._poison_context(delivery),
            attempt,
            envelope=delivery.envelope,
            poison_key=poison_key,
            stream=delivery.stream,
            instance_id=inst.instance_id,
            failed=failed,
        )
        if not done:  # poisoned: commit that its position passed it
            assert inst.state is not None
            step, state = poisoned_step(inst.handler_key, inst.instance_id, inst.state, delivery)
            self._commit(inst, step, state, [ack])

    def _poison_context(self, delivery: Delivery) -> PartitionContext:
        """Where a given-up delivery is recorded: an event in its stream's partition's
        poison store (as before ADR 0010), a deadline in this one's."""
        if delivery.stream is None:
            return self._ctx
        index = self._stream_partitions.get(delivery.stream[0])
        if index is None or index == self._ctx.index:
            return self._ctx
        return attrs.evolve(self._ctx, index=index, partition_id=delivery.stream[0])

    def _commit(
        self, inst: _Instance, step: ProcessStep | None, state: InstanceState, acks: list[Ack]
    ) -> None:
        if inst.in_hand:  # from here on, answered below or by the writer
            passed = {id(ack) for ack in acks}
            inst.in_hand = [ack for ack in inst.in_hand if id(ack) not in passed]
        if step is None:
            # Everything was done already: durable once the steps before are.
            if inst.in_flight == 0 or inst.trailing is None:
                for ack in acks:
                    _call(ack, None)
            else:
                inst.trailing.extend(acks)
            return
        try:
            self._writer.enqueue_step(step, functools.partial(self._durable, inst, acks))
        except OwnershipLost as lost:
            # The partition is stopping: nothing more commits here, and a
            # handler's retries must not take this for its failure.
            for ack in acks:
                _call(ack, lost)
            self.close(lost)
            return
        inst.state = state
        inst.in_flight += 1
        inst.trailing = acks

    def _durable(self, inst: _Instance, acks: list[Ack], publication: Publication) -> None:
        # In the writer's task, without awaiting.
        inst.in_flight -= 1
        if inst.trailing is acks and inst.in_flight == 0:
            inst.trailing = None
        if publication.error is not None:
            for ack in acks:
                _call(ack, publication.error)
            return
        step = publication.step
        assert step is not None
        assert inst.durable is not None
        inst.durable = inst.durable.after(step, (publication.position, publication.index))
        if self._committed is not None:
            self._committed(inst.handler_key, inst.instance_id, inst.durable, publication.position)
        if step.has_outbox:
            self._queue_outbox(inst.handler_key, inst.instance_id, publication.position, step)
        for ack in acks:
            _call(ack, None)

    # -- outboxes ---------------------------------------------------------------

    def redispatch(self, position: int, step: ProcessStep) -> None:
        """Dispatch again the outbox of a step committed at *position* (takeover).

        Called before ``run``: the ``dispatched`` watermark stays at or below
        *position* until it is done, and the instance's later outboxes go out
        after it. The outbox of a process not running here (disabled, or not
        in this version of the application) is kept for an owner that runs
        it: the watermark stays at or below it for as long as this one owns
        the partition.
        """
        if step.handler_key not in self._handlers:
            self._hold_dispatched(position)
            _log.info(
                "partition %d: the outbox of process %s's instance %r (stream position %d) "
                "waits for an owner that runs the process",
                self._ctx.index,
                step.handler_key,
                step.instance_id,
                position,
            )
            return
        self._queue_outbox(step.handler_key, step.instance_id, position, step)

    def _queue_outbox(
        self, handler_key: str, instance_id: str, position: int, step: ProcessStep
    ) -> None:
        self._hold_dispatched(position)
        key = (handler_key, instance_id)
        queue = self._outboxes.get(key)
        if queue is None:
            queue = self._outboxes[key] = deque()
            if self._dispatchers is not None:
                self._dispatchers.submit(key)
            elif self._tg is None and self._stopped is None:
                self._to_start.append(key)  # before ``run``: it starts them
            # else (after ``run``: a step the writer's final flush committed)
            # the next owner dispatches it from the dispatched watermark.
        queue.append((position, step))

    def _hold_dispatched(self, position: int) -> None:
        """Keep the ``dispatched`` watermark at or below *position* until released."""
        self._undispatched[position] = self._undispatched.get(position, 0) + 1

    async def _dispatch_outboxes(self, key: tuple[str, str]) -> None:
        """Dispatch an instance's committed outboxes in commit order."""
        queue = self._outboxes[key]
        handler = self._handlers[key[0]]
        while queue:
            position, step = queue[0]
            await handler.dispatch_step(self._ctx, key[1], step)
            queue.popleft()
            left = self._undispatched[position] - 1
            if left:
                self._undispatched[position] = left
            else:
                del self._undispatched[position]
        del self._outboxes[key]

    # -- for tests and operators -----------------------------------------------

    def cached(self, handler_key: str, instance_id: str) -> InstanceState | None:
        """The instance's state as this partition holds it (``None``: not cached)."""
        inst = self._instances.get((handler_key, instance_id))
        return None if inst is None else inst.state


def _call(ack: Ack, error: BaseException | None) -> None:
    try:
        ack(error)
    except Exception:
        # Runs in the writer's task: a failing submitter must not stop it.
        _log.exception("a process delivery's acknowledgement failed")
