"""What a process handler sees: the handler protocol and its event and deadline scopes.

A scope buffers the handler's effects (root mutations, ending the instance,
commands to execute, deadlines to schedule) until the home partition commits
them as the instance's step (``process_state.handle_group``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import dogma

from ..envelope import Envelope, encode, new_envelope, validate_new
from ..ids import derived_id
from ..partitions import instance_workload
from .consumers_support import HandlerLogger
from .deadlines import DeadlineEntry
from .process_instances import OutboxDeadline, ProcessRoot

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from .processes import ProcessRunner

__all__ = [
    "ProcessBug",
    "ProcessDeadlineScope",
    "ProcessEventScope",
    "ProcessHandler",
    "ProcessScope",
]

_log = logging.getLogger("runkit.engine.events.processes")


class ProcessHandler(Protocol):
    """The parts of ``dogma.ProcessMessageHandler`` the engine calls."""

    def new(self) -> ProcessRoot: ...
    async def route_event_to_instance(self, event: dogma.Event) -> str | None: ...
    async def handle_event(
        self, root: ProcessRoot, scope: ProcessEventScope, event: dogma.Event
    ) -> None: ...
    async def handle_deadline(
        self, root: ProcessRoot, scope: ProcessDeadlineScope, deadline: dogma.Deadline
    ) -> None: ...


class ProcessBug(Exception):
    """A handler did something no retry can fix; the message is poisoned at once."""


class ProcessScope:
    """What ``handle_event``/``handle_deadline`` may do; effects are buffered until commit."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: ProcessRoot,
        cause: Envelope,
    ) -> None:
        self._runner = runner
        self._ctx = ctx
        self._instance_id = instance_id
        self._root = root
        self._cause = cause
        self._logger = HandlerLogger(
            _log, f"process {runner.config.identity.name} instance {instance_id}"
        )
        self.mutated = False
        self.ended = False
        self.commands: list[Envelope] = []
        self.deadlines: list[OutboxDeadline] = []
        self.bug: Exception | None = None

    @property
    def instance_id(self) -> str:
        """The ID of the process instance."""
        return self._instance_id

    def now(self) -> datetime:
        """The engine's current time (UTC)."""
        return self._ctx.now()

    def log(self, fmt: str, *args: object) -> None:
        """Log a %-style message attributed to the process instance."""
        self._logger.log(fmt, *args)

    def _check_not_ended(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"{what}: process instance {self._instance_id!r} has ended")

    def mutate(self, fn: Callable[[ProcessRoot], object]) -> None:
        """Change the root by calling ``fn(root)``; the change is persisted on success."""
        self._check_not_ended("mutate()")
        fn(self._root)
        self.mutated = True

    def end(self) -> None:
        """End the instance: its state and pending deadlines are discarded."""
        self.ended = True

    def _produced_id(self, kind: str, index: int) -> str:
        # Deterministic: handling the same cause again (redelivery, a retried
        # commit) yields the same IDs, so the commands side deduplicates them.
        return derived_id(self._cause.message_id, f"{self._runner.key}/{kind}/{index}")

    def _fail(self, error: Exception) -> Exception:
        self.bug = self.bug or error
        return error

    def execute_command(self, command: dogma.Command) -> None:
        """Execute *command* once the handler returns successfully."""
        self._check_not_ended("execute_command()")
        if type(command) not in self._runner.executes:
            raise self._fail(
                ProcessBug(
                    f"{self._runner.config.describe()} executed a "
                    f"{type(command).__qualname__} without an executes_command route for it"
                )
            )
        handler = self._runner.app.command_handler(type(command))
        if handler is None or handler.disabled:
            raise self._fail(
                ProcessBug(
                    f"{self._runner.config.describe()} executed a "
                    f"{type(command).__qualname__}, which no enabled handler of the "
                    "application handles"
                )
            )
        try:
            validate_new(command)
        except dogma.ValidationError as exc:
            self._fail(exc)
            raise
        self.commands.append(
            new_envelope(
                command,
                app_key=self._cause.app_key,
                site_key=self._cause.site_key,
                created_at=self._ctx.now(),
                message_id=self._produced_id("command", len(self.commands)),
                causation_id=self._cause.message_id,
                correlation_id=self._cause.correlation_id,
                source_handler=self._runner.key,
                source_instance=self._instance_id,
                validated=True,
            )
        )

    def schedule_deadline(self, deadline: dogma.Deadline, at: datetime) -> None:
        """Schedule *deadline* to come back to this instance at *at* (never earlier)."""
        self._check_not_ended("schedule_deadline()")
        if not isinstance(at, datetime):
            raise TypeError(
                f"schedule_deadline(): at must be a datetime, got {type(at).__qualname__} {at!r}"
            )
        # Naive as Python defines it: no tzinfo, or one that gives no offset.
        if at.utcoffset() is None:
            raise ValueError(
                f"schedule_deadline(): {at!r} is a naive datetime; "
                "use a timezone-aware datetime in UTC"
            )
        if type(deadline) not in self._runner.schedules:
            raise self._fail(
                ProcessBug(
                    f"{self._runner.config.describe()} scheduled a "
                    f"{type(deadline).__qualname__} without a schedules_deadline route for it"
                )
            )
        at = at.astimezone(UTC)
        try:
            validate_new(deadline, scheduled_for=at)
        except dogma.ValidationError as exc:
            self._fail(exc)
            raise
        deadline_id = self._produced_id("deadline", len(self.deadlines))
        envelope = new_envelope(
            deadline,
            app_key=self._cause.app_key,
            site_key=self._cause.site_key,
            created_at=self._ctx.now(),
            message_id=deadline_id,
            causation_id=self._cause.message_id,
            correlation_id=self._cause.correlation_id,
            source_handler=self._runner.key,
            source_instance=self._instance_id,
            scheduled_for=at,
            validated=True,
        )
        home = self._ctx.partition_of(instance_workload(self._runner.key, self._instance_id))
        self.deadlines.append(
            OutboxDeadline(
                partition=home,
                entry=DeadlineEntry(
                    handler_key=self._runner.key,
                    instance_id=self._instance_id,
                    deadline_id=deadline_id,
                    scheduled_for=at,
                    envelope=encode(envelope),
                ),
            )
        )


class ProcessEventScope(ProcessScope):
    """The scope of ``handle_event`` (dogma's ``ProcessEventScope``)."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: ProcessRoot,
        cause: Envelope,
        *,
        recorded_at: datetime,
    ) -> None:
        super().__init__(runner, ctx, instance_id, root, cause)
        self._recorded_at = recorded_at

    @property
    def recorded_at(self) -> datetime:
        """When the event being handled was recorded."""
        return self._recorded_at


class ProcessDeadlineScope(ProcessScope):
    """The scope of ``handle_deadline`` (dogma's ``ProcessDeadlineScope``)."""

    def __init__(
        self,
        runner: ProcessRunner,
        ctx: PartitionContext,
        instance_id: str,
        root: ProcessRoot,
        cause: Envelope,
        *,
        scheduled_for: datetime,
    ) -> None:
        super().__init__(runner, ctx, instance_id, root, cause)
        self._scheduled_for = scheduled_for

    @property
    def scheduled_for(self) -> datetime:
        """The time the deadline being handled was scheduled for."""
        return self._scheduled_for
