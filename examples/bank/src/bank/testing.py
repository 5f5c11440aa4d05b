"""Scopes and a breadth-first dispatcher for running the bank's handlers in-process.

The scopes implement dogma's scope protocols and capture what a handler does
(events recorded, root mutations, commands executed, deadlines scheduled,
log lines) so tests can call a handler directly and look. Like an engine,
they validate every message a handler produces and refuse types the handler
has no route for.

:class:`Dispatcher` runs a whole application the way Dogma's testkit does:
one message at a time, breadth-first, with a virtual clock, integrations and
projections off unless enabled by name, aggregate state rebuilt from events,
process roots stored as bytes, deadlines delivered once due, and projections
driven through the ADR-26 checkpoint protocol. It is for tests and the demo;
it persists nothing.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

import dogma
from runkit.config import ApplicationConfig, HandlerConfig, HandlerKind, build

__all__ = [
    "AggregateScope",
    "Dispatcher",
    "Envelope",
    "IntegrationScope",
    "ProcessDeadlineScope",
    "ProcessEventScope",
    "ProjectionEventScope",
    "ProjectionScope",
]

R = TypeVar("R")


def _check_time(at: datetime, what: str) -> None:
    if at.tzinfo is None:
        raise ValueError(f"{what} {at.isoformat()} is naive; use a timezone-aware datetime")


def _check_produced(message: dogma.Message, produces: frozenset[type] | None) -> None:
    if produces is not None and type(message) not in produces:
        raise TypeError(
            f"the handler produced {type(message).__qualname__}, which is not produced by "
            "this handler: add a route for it"
        )


class _Scope:
    """What every scope offers: the time and a log."""

    def __init__(self, now: datetime) -> None:
        _check_time(now, "now")
        self._now = now
        self.logs: list[str] = []

    def now(self) -> datetime:
        """The (virtual) current time."""
        return self._now

    def log(self, fmt: str, *args: object) -> None:
        """Capture a log line, %-formatted."""
        self.logs.append(fmt % args if args else fmt)


class AggregateScope(_Scope, Generic[R]):
    """An aggregate command scope: records events and applies them to the root at once.

    Args:
        root: The instance's root, as rebuilt from its history.
        instance_id: The instance the command was routed to.
        now: The current time.
        produces: The event classes the handler may record (its routes);
            ``None`` accepts any event.
    """

    def __init__(
        self,
        root: R,
        instance_id: str,
        now: datetime,
        produces: frozenset[type] | None = None,
    ) -> None:
        super().__init__(now)
        self.root = root
        self._instance_id = instance_id
        self._produces = produces
        self.recorded: list[dogma.Event] = []

    @property
    def instance_id(self) -> str:
        """The instance ID."""
        return self._instance_id

    def record_event(self, event: dogma.Event) -> None:
        """Validate ``event``, apply it to the root and capture it."""
        _check_produced(event, self._produces)
        event.validate(dogma.EventValidationScope(is_new=True, recorded_at=self._now))
        self.root.apply_event(event)  # type: ignore[attr-defined]
        self.recorded.append(event)


class _ProcessScope(_Scope, Generic[R]):
    def __init__(
        self,
        root: R,
        instance_id: str,
        now: datetime,
        produces: frozenset[type] | None = None,
    ) -> None:
        super().__init__(now)
        self.root = root
        self._instance_id = instance_id
        self._produces = produces
        self.mutated = False
        self.ended = False
        self.commands: list[dogma.Command] = []
        self.deadlines: list[tuple[dogma.Deadline, datetime]] = []

    @property
    def instance_id(self) -> str:
        """The instance ID."""
        return self._instance_id

    def _refuse_if_ended(self, operation: str) -> None:
        if self.ended:
            raise RuntimeError(f"cannot {operation}: process instance {self._instance_id} ended")

    def mutate(self, fn: Callable[[R], object]) -> None:
        """Change the root by calling ``fn(root)``."""
        self._refuse_if_ended("mutate the root")
        fn(self.root)
        self.mutated = True

    def end(self) -> None:
        """End the instance; later writes in this scope raise."""
        self.ended = True

    def execute_command(self, command: dogma.Command) -> None:
        """Validate and capture ``command``."""
        self._refuse_if_ended("execute a command")
        _check_produced(command, self._produces)
        command.validate(dogma.CommandValidationScope(is_new=True, executed_at=self._now))
        self.commands.append(command)

    def schedule_deadline(self, deadline: dogma.Deadline, at: datetime) -> None:
        """Validate and capture ``deadline``, scheduled for ``at``."""
        self._refuse_if_ended("schedule a deadline")
        _check_time(at, "deadline time")
        _check_produced(deadline, self._produces)
        deadline.validate(
            dogma.DeadlineValidationScope(is_new=True, scheduled_at=self._now, scheduled_for=at)
        )
        self.deadlines.append((deadline, at))


class ProcessEventScope(_ProcessScope[R]):
    """A process event scope; ``recorded_at`` is when the event was recorded."""

    def __init__(
        self,
        root: R,
        instance_id: str,
        now: datetime,
        produces: frozenset[type] | None = None,
        *,
        recorded_at: datetime | None = None,
    ) -> None:
        super().__init__(root, instance_id, now, produces)
        self._recorded_at = now if recorded_at is None else recorded_at

    @property
    def recorded_at(self) -> datetime:
        """When the event was recorded."""
        return self._recorded_at


class ProcessDeadlineScope(_ProcessScope[R]):
    """A process deadline scope; ``scheduled_for`` is the deadline's time."""

    def __init__(
        self,
        root: R,
        instance_id: str,
        now: datetime,
        produces: frozenset[type] | None = None,
        *,
        scheduled_for: datetime,
    ) -> None:
        super().__init__(root, instance_id, now, produces)
        self._scheduled_for = scheduled_for

    @property
    def scheduled_for(self) -> datetime:
        """The time the deadline was scheduled for."""
        return self._scheduled_for


class IntegrationScope(_Scope):
    """An integration command scope: captures recorded events."""

    def __init__(self, now: datetime, produces: frozenset[type] | None = None) -> None:
        super().__init__(now)
        self._produces = produces
        self.recorded: list[dogma.Event] = []

    def record_event(self, event: dogma.Event) -> None:
        """Validate and capture ``event``."""
        _check_produced(event, self._produces)
        event.validate(dogma.EventValidationScope(is_new=True, recorded_at=self._now))
        self.recorded.append(event)


class ProjectionScope(_Scope):
    """A projection compact or reset scope."""


class ProjectionEventScope(_Scope):
    """A projection event scope: where the event sits in its stream."""

    def __init__(
        self,
        *,
        stream_id: str,
        offset: int,
        checkpoint_offset: int,
        recorded_at: datetime,
        now: datetime | None = None,
    ) -> None:
        super().__init__(recorded_at if now is None else now)
        self._stream_id = stream_id
        self._offset = offset
        self._checkpoint_offset = checkpoint_offset
        self._recorded_at = recorded_at

    @property
    def stream_id(self) -> str:
        """The event's stream."""
        return self._stream_id

    @property
    def offset(self) -> int:
        """The event's offset in its stream."""
        return self._offset

    @property
    def checkpoint_offset(self) -> int:
        """The checkpoint the engine believes the projection has for the stream."""
        return self._checkpoint_offset

    @property
    def recorded_at(self) -> datetime:
        """When the event was recorded."""
        return self._recorded_at


@attrs.frozen
class Envelope:
    """A recorded event with where and when it was recorded."""

    event: dogma.Event
    stream_id: str
    offset: int
    recorded_at: datetime
    recorded_by: str


@attrs.frozen(order=True)
class _Pending:
    at: datetime
    seq: int
    handler: str = attrs.field(order=False)
    instance_id: str = attrs.field(order=False)
    deadline: dogma.Deadline = attrs.field(order=False)


class Dispatcher:
    """Runs an application's handlers in-process, breadth-first, like Dogma's testkit.

    Args:
        app: The application; its configuration is built (and validated) with
            ``runkit.config.build``.
        now: The virtual clock's start; the real time by default.
        enable: Names of integrations and projections to run. Like testkit,
            they are off by default; aggregates and processes always run.
            Handlers the application disabled never run.
        enable_all: Run every integration and projection.
        on_log: Called with ``(handler name, line)`` for each log line.
    """

    def __init__(
        self,
        app: object,
        *,
        now: datetime | None = None,
        enable: Iterable[str] = (),
        enable_all: bool = False,
        on_log: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config: ApplicationConfig = build(app)
        self.now = datetime.now(UTC) if now is None else now
        _check_time(self.now, "now")
        names = set(enable)
        for name in names:
            h = self.config.handler_by_name(name)
            if h is None or h.kind not in (HandlerKind.INTEGRATION, HandlerKind.PROJECTION):
                raise ValueError(f"{name!r} is not an integration or projection of this app")
        self._enabled = {
            h.identity.name
            for h in self.config.enabled_handlers()
            if h.kind in (HandlerKind.AGGREGATE, HandlerKind.PROCESS)
            or enable_all
            or h.identity.name in names
        }
        self._on_log = on_log
        self._histories: dict[tuple[str, str], list[dogma.Event]] = {}
        self._streams: dict[str, int] = {}
        self._roots: dict[tuple[str, str], bytes] = {}
        self._ended: set[tuple[str, str]] = set()
        self._pending: list[_Pending] = []
        self._seq = 0
        self._queue: deque[Callable[[], Any]] = deque()
        self.envelopes: list[Envelope] = []
        self.logs: list[tuple[str, str]] = []

    # -- actions ----------------------------------------------------------------

    async def execute_command(self, command: dogma.Command) -> list[dogma.Event]:
        """Execute ``command`` and everything that follows; return the events recorded.

        Raises:
            dogma.ValidationError: The command is invalid.
            ValueError: No handler of the application handles its type.
        """
        command.validate(dogma.CommandValidationScope(is_new=True, executed_at=self.now))
        if self.config.command_handler(type(command)) is None:
            raise ValueError(f"no handler of the application handles {type(command).__name__}")
        mark = len(self.envelopes)
        self._queue.append(lambda: self._command(command))
        await self._drain()
        return [e.event for e in self.envelopes[mark:]]

    async def record_event(self, event: dogma.Event) -> list[dogma.Event]:
        """Deliver an event from outside the application to its consumers.

        Returns the events recorded as a consequence.
        """
        event.validate(dogma.EventValidationScope(is_new=True, recorded_at=self.now))
        mark = len(self.envelopes)
        self._record(event, str(uuid.uuid4()), "(external)")
        await self._drain()
        return [e.event for e in self.envelopes[mark + 1 :]]

    async def advance_time(self, to: datetime) -> list[dogma.Event]:
        """Move the clock to ``to`` and deliver the deadlines now due, in time order."""
        _check_time(to, "time")
        if to < self.now:
            raise ValueError(f"cannot move the clock back from {self.now} to {to}")
        self.now = to
        mark = len(self.envelopes)
        self._release_due()
        await self._drain()
        return [e.event for e in self.envelopes[mark:]]

    def events(self, cls: type[dogma.Event] | None = None) -> list[dogma.Event]:
        """Every event recorded so far (optionally only of class ``cls``), in order."""
        return [e.event for e in self.envelopes if cls is None or type(e.event) is cls]

    # -- dispatch ---------------------------------------------------------------

    async def _drain(self) -> None:
        while self._queue:
            await self._queue.popleft()()

    def _runs(self, h: HandlerConfig) -> bool:
        return h.identity.name in self._enabled

    def _log(self, h: HandlerConfig, lines: list[str]) -> None:
        for line in lines:
            self.logs.append((h.identity.name, line))
            if self._on_log is not None:
                self._on_log(h.identity.name, line)

    async def _command(self, command: dogma.Command) -> None:
        h = self.config.command_handler(type(command))
        if h is None:
            raise RuntimeError(f"{type(command).__name__} is not consumed by any handlers")
        if not self._runs(h):
            return  # like testkit: a disabled integration leaves the command unhandled
        produces = frozenset(t.cls for t in h.produced_types())
        handler: Any = h.handler
        if h.kind is HandlerKind.AGGREGATE:
            instance_id = handler.route_command_to_instance(command)
            if not instance_id:
                raise RuntimeError(f"{h.identity.name} routed {command!r} to an empty instance ID")
            key = (h.identity.key, instance_id)
            history = self._histories.setdefault(key, [])
            root = handler.new()
            for past in history:
                root.apply_event(past)
            scope: AggregateScope[Any] = AggregateScope(root, instance_id, self.now, produces)
            handler.handle_command(root, scope, command)
            self._log(h, scope.logs)
            stream = str(uuid.uuid5(uuid.UUID(h.identity.key), instance_id))
            for event in scope.recorded:
                history.append(event)
                self._record(event, stream, h.identity.name)
        else:
            integration = IntegrationScope(self.now, produces)
            await handler.handle_command(integration, command)
            self._log(h, integration.logs)
            for event in integration.recorded:
                self._record(event, h.identity.key, h.identity.name)

    def _record(self, event: dogma.Event, stream: str, by: str) -> None:
        offset = self._streams.get(stream, 0)
        self._streams[stream] = offset + 1
        envelope = Envelope(event, stream, offset, self.now, by)
        self.envelopes.append(envelope)
        for h in self.config.event_consumers(type(event)):
            if self._runs(h):
                self._queue.append(lambda h=h: self._event(h, envelope))  # type: ignore[misc]

    async def _event(self, h: HandlerConfig, envelope: Envelope) -> None:
        handler: Any = h.handler
        if h.kind is HandlerKind.PROJECTION:
            await self._project(h, envelope)
            return
        instance_id = await handler.route_event_to_instance(envelope.event)
        if instance_id is None:
            return
        if not instance_id:
            raise RuntimeError(f"{h.identity.name} routed an event to an empty instance ID")
        key = (h.identity.key, instance_id)
        if key in self._ended:
            return
        root = self._load(handler, key)
        scope: ProcessEventScope[Any] = ProcessEventScope(
            root,
            instance_id,
            self.now,
            frozenset(t.cls for t in h.produced_types()),
            recorded_at=envelope.recorded_at,
        )
        await handler.handle_event(root, scope, envelope.event)
        self._after_process(h, key, scope)

    async def _deadline(self, h: HandlerConfig, pending: _Pending) -> None:
        key = (h.identity.key, pending.instance_id)
        if key in self._ended:
            return
        handler: Any = h.handler
        root = self._load(handler, key)
        scope: ProcessDeadlineScope[Any] = ProcessDeadlineScope(
            root,
            pending.instance_id,
            self.now,
            frozenset(t.cls for t in h.produced_types()),
            scheduled_for=pending.at,
        )
        await handler.handle_deadline(root, scope, pending.deadline)
        self._after_process(h, key, scope)

    def _load(self, handler: Any, key: tuple[str, str]) -> Any:
        root = handler.new()
        stored = self._roots.get(key)
        if stored is not None:
            root.unmarshal_binary(stored)
        return root

    def _after_process(
        self, h: HandlerConfig, key: tuple[str, str], scope: _ProcessScope[Any]
    ) -> None:
        self._log(h, scope.logs)
        if scope.ended:
            self._ended.add(key)
            self._roots.pop(key, None)
            self._pending = [
                p for p in self._pending if (p.handler, p.instance_id) != (h.identity.name, key[1])
            ]
        elif scope.mutated:
            self._roots[key] = scope.root.marshal_binary()
        for command in scope.commands:
            self._queue.append(lambda c=command: self._command(c))  # type: ignore[misc]
        for deadline, at in scope.deadlines:
            self._seq += 1
            self._pending.append(_Pending(at, self._seq, h.identity.name, key[1], deadline))
        self._release_due()

    def _release_due(self) -> None:
        due = sorted(p for p in self._pending if p.at <= self.now)
        self._pending = [p for p in self._pending if p.at > self.now]
        for p in due:
            h = self.config.handler_by_name(p.handler)
            assert h is not None
            self._queue.append(lambda h=h, p=p: self._deadline(h, p))  # type: ignore[misc]

    async def _project(self, h: HandlerConfig, envelope: Envelope) -> None:
        handler: Any = h.handler
        checkpoint = await handler.checkpoint_offset(envelope.stream_id)
        if checkpoint > envelope.offset:
            return  # already applied
        scope = ProjectionEventScope(
            stream_id=envelope.stream_id,
            offset=envelope.offset,
            checkpoint_offset=checkpoint,
            recorded_at=envelope.recorded_at,
            now=self.now,
        )
        result = await handler.handle_event(scope, envelope.event)
        self._log(h, scope.logs)
        if result != envelope.offset + 1:
            raise RuntimeError(
                f"optimistic concurrency conflict in projection {h.identity.name}: expected "
                f"checkpoint {envelope.offset + 1} for stream {envelope.stream_id}, got {result}"
            )


if TYPE_CHECKING:
    # Static proof that the scopes implement dogma's scope protocols.
    _aggregate: dogma.AggregateCommandScope[Any] = AggregateScope(object(), "", datetime.now(UTC))
    _event: dogma.ProcessEventScope[Any] = ProcessEventScope(object(), "", datetime.now(UTC))
    _deadline: dogma.ProcessDeadlineScope[Any] = ProcessDeadlineScope(
        object(), "", datetime.now(UTC), scheduled_for=datetime.now(UTC)
    )
    _integration: dogma.IntegrationCommandScope = IntegrationScope(datetime.now(UTC))
    _projection: dogma.ProjectionEventScope = ProjectionEventScope(
        stream_id="", offset=0, checkpoint_offset=0, recorded_at=datetime.now(UTC)
    )
    _reset: dogma.ProjectionResetScope = ProjectionScope(datetime.now(UTC))
