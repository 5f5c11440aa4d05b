"""Projection delivery per Dogma ADR-26, ``compact()`` and ``reset()``.

One consumer runs per (projection handler, owned partition). The handler owns
the checkpoints (ADR-26), so the engine stores nothing for projections:

1. ``offset = await handler.checkpoint_offset(stream_id)`` and read the
   partition stream from there;
2. for each event of a type the handler routes, call ``handle_event`` with
   ``scope.checkpoint_offset = offset``;
3. a result of ``event.offset + 1`` means applied: adopt it. Anything else is
   an OCC mismatch (another node or an operator moved the handler's
   checkpoint): adopt the handler's value, skipping forward or re-reading the
   stream from there. ``scope.checkpoint_offset`` itself is no mismatch but a
   handler bug (equal checkpoints must apply the event): it is retried like an
   error.

Errors (from ``checkpoint_offset`` or ``handle_event``) are retried for ever
with capped backoff: skipping an event would break exactly-once application,
and a stuck projection stalls only itself on that partition.

``MINIMIZE`` handlers deliver one event at a time across all partitions of this
node (a lock shared through the ``ConsumerSet``); ``MAXIMIZE`` handlers run the
partitions in parallel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import anyio
import attrs

import dogma

from ...config import ApplicationConfig, HandlerConfig, HandlerKind, RouteKind
from ...persistence import PersistenceError
from ..logs import LogContext, RateLimitedLog, describe_error
from .consumers_support import (
    ConsumerOptions,
    HandlerLogger,
    Restarts,
    close_iterator,
    sleep_backoff,
)

if TYPE_CHECKING:
    from ..partitions import PartitionContext
    from ..streams import StreamEvent

__all__ = [
    "ProjectionCompactScope",
    "ProjectionControl",
    "ProjectionEventScope",
    "ProjectionNotResettable",
    "ProjectionResetScope",
    "compact_projection",
    "reset_projection",
    "run_projection",
]

_log = logging.getLogger("runkit.engine.events.projections")
# Repeated failures (a store outage, a handler failing until fixed): one line
# per key per interval after the first.
_repeat_log = RateLimitedLog(_log, 10.0)
T = TypeVar("T")


class _Projection(Protocol):
    """The parts of ``dogma.ProjectionMessageHandler`` the engine calls."""

    async def handle_event(self, scope: ProjectionEventScope, event: dogma.Event) -> int: ...
    async def checkpoint_offset(self, stream_id: str) -> int: ...
    async def compact(self, scope: ProjectionCompactScope) -> None: ...
    async def reset(self, scope: ProjectionResetScope) -> None: ...


class ProjectionNotResettable(RuntimeError):
    """``reset_projection`` was asked to reset a projection whose ``reset()`` is not supported."""


@attrs.frozen
class ProjectionEventScope:
    """The scope of one ``handle_event`` call (dogma's ``ProjectionEventScope``)."""

    stream_id: str
    offset: int
    checkpoint_offset: int
    recorded_at: datetime
    _clock: Callable[[], datetime] = attrs.field(alias="clock")
    _logger: HandlerLogger = attrs.field(alias="logger")

    def now(self) -> datetime:
        """The engine's current time (UTC)."""
        return self._clock()

    def log(self, fmt: str, *args: object) -> None:
        """Log a %-style message attributed to the projection."""
        self._logger.log(fmt, *args)


@attrs.frozen
class ProjectionCompactScope:
    """The scope of a ``compact()`` call (dogma's ``ProjectionCompactScope``)."""

    _clock: Callable[[], datetime] = attrs.field(alias="clock")
    _logger: HandlerLogger = attrs.field(alias="logger")

    def now(self) -> datetime:
        """The engine's current time (UTC)."""
        return self._clock()

    def log(self, fmt: str, *args: object) -> None:
        """Log a %-style message attributed to the projection."""
        self._logger.log(fmt, *args)


@attrs.frozen
class ProjectionResetScope(ProjectionCompactScope):
    """The scope of a ``reset()`` call (dogma's ``ProjectionResetScope``)."""


def _logger_for(config: HandlerConfig) -> HandlerLogger:
    return HandlerLogger(_log, f"projection {config.identity.name}")


class ProjectionControl:
    """Pauses a projection's delivery on this node, for ``reset``.

    Every delivery loop of the projection runs inside ``delivering()``;
    ``paused()`` cancels those loops, waits for them to leave, and holds new
    ones back until it exits. Loops then start again from the handler's
    (reset) checkpoint.
    """

    def __init__(self) -> None:
        # A handler's first failure gets a traceback once per kind of error per
        # minute on this node, not once per partition: a projection whose own
        # database goes away fails on every partition at once.
        self.tracebacks = RateLimitedLog(_log, 60.0)
        self._scopes: set[anyio.CancelScope] = set()
        self._resumed = anyio.Event()
        self._resumed.set()
        self._idle = anyio.Event()
        self._idle.set()
        self._pause_lock = anyio.Lock()

    @contextlib.asynccontextmanager
    async def delivering(self) -> AsyncIterator[anyio.CancelScope]:
        """Run one delivery attempt; the scope is cancelled when a pause begins."""
        while not self._resumed.is_set():
            await self._resumed.wait()
        with anyio.CancelScope() as scope:
            if not self._scopes:
                self._idle = anyio.Event()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)
                if not self._scopes:
                    self._idle.set()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Stop every delivery loop of the projection until the block exits."""
        async with self._pause_lock:
            self._resumed = anyio.Event()
            try:
                for scope in list(self._scopes):
                    scope.cancel()
                await self._idle.wait()
                yield
            finally:
                self._resumed.set()


async def run_projection(
    ctx: PartitionContext,
    config: HandlerConfig,
    *,
    options: ConsumerOptions,
    control: ProjectionControl,
    serialise: anyio.Lock | None,
) -> None:
    """Deliver the partition's events to one projection, per ADR-26, until cancelled.

    *serialise* is the handler's node-wide lock when it prefers ``MINIMIZE``.
    After a ``reset`` (signalled through *control*) delivery starts again from
    the handler's checkpoint.
    """
    restarts = Restarts(options)
    while True:
        failed = False
        restarts.begin()
        async with control.delivering():  # exits normally when a reset cancels it
            try:
                await _deliver(
                    ctx, config, options=options, serialise=serialise, tracebacks=control.tracebacks
                )
                return
            except PersistenceError as exc:
                # Reading the stream failed: start again from the handler's checkpoint.
                failed = True
                _repeat_log.warning(
                    (config.identity.key, ctx.index),
                    "%s on partition %d: persistence error; restarting delivery: %s",
                    config.describe(),
                    ctx.index,
                    describe_error(exc),
                )
        if failed:
            await restarts.failed()


async def _deliver(
    ctx: PartitionContext,
    config: HandlerConfig,
    *,
    options: ConsumerOptions,
    serialise: anyio.Lock | None,
    tracebacks: RateLimitedLog,
) -> None:
    handler = cast(_Projection, config.handler)
    logger = _logger_for(config)
    routed = frozenset(t.id for t in config.types_of(RouteKind.HANDLES_EVENT))
    stream_id = ctx.partition_id
    what = f"{config.describe()} on partition {ctx.index}"

    async def read_checkpoint() -> int:
        value = await handler.checkpoint_offset(stream_id)
        _check_offset(value, "checkpoint_offset()", config)
        return value

    checkpoint = await _retrying(
        options, f"checkpoint_offset() of {what}", read_checkpoint, tracebacks=tracebacks
    )
    while True:
        reread = False
        # Only the handled types wake this delivery (ADR-26: the checkpoint
        # moves only with a handled event, so skipping the rest is free).
        events = ctx.stream.read(checkpoint, types=routed)
        try:
            async for event in events:
                if event.offset < checkpoint:
                    continue
                expected = event.offset + 1
                result = await _retrying(
                    options,
                    # Rendered only on failure: this is the hot path.
                    functools.partial(_describe_delivery, what, ctx.index, event),
                    _delivery(
                        handler,
                        config=config,
                        ctx=ctx,
                        event=event,
                        checkpoint=checkpoint,
                        logger=logger,
                        serialise=serialise,
                    ),
                    tracebacks=tracebacks,
                )
                if result != expected:
                    _log.info(
                        "%s: optimistic concurrency conflict at offset %d "
                        "(checkpoint %d): the handler is at %d; resuming from there",
                        what,
                        event.offset,
                        checkpoint,
                        result,
                    )
                    if result <= event.offset:
                        reread = True
                checkpoint = result
                if reread:
                    break
        finally:
            await close_iterator(events)
        if not reread:
            return  # the stream ended (only in tests: a real stream never ends)


def _delivery(
    handler: _Projection,
    *,
    config: HandlerConfig,
    ctx: PartitionContext,
    event: StreamEvent,
    checkpoint: int,
    logger: HandlerLogger,
    serialise: anyio.Lock | None,
) -> Callable[[], Awaitable[int]]:
    async def deliver() -> int:
        scope = ProjectionEventScope(
            stream_id=event.stream_id,
            offset=event.offset,
            checkpoint_offset=checkpoint,
            recorded_at=event.recorded_at,
            clock=ctx.now,
            logger=logger,
        )
        message = event.message()  # a fresh copy per attempt (ADR-32)
        if serialise is None:
            result = await handler.handle_event(scope, message)
        else:
            async with serialise:
                result = await handler.handle_event(scope, message)
        _check_offset(result, "handle_event()", config)
        if result == checkpoint:
            # Equal checkpoints mean "apply it and return offset + 1" (ADR-26):
            # adopting this would deliver the same event again at once, for ever.
            raise ValueError(
                f"{config.describe()}: handle_event() at offset {event.offset} returned "
                f"scope.checkpoint_offset ({checkpoint}) without applying the event; "
                "when the checkpoints agree it must apply it and return offset + 1"
            )
        return result

    return deliver


def _describe_delivery(what: str, partition: int, event: StreamEvent) -> str:
    about = LogContext.of_message(event.envelope, partition=partition)
    return f"handle_event() at offset {event.offset} of {what} ({about})"


def _check_offset(value: object, what: str, config: HandlerConfig) -> None:
    if type(value) is not int or value < 0:
        raise TypeError(f"{config.describe()}: {what} must return an int >= 0, got {value!r}")


async def _retrying(
    options: ConsumerOptions,
    what: str | Callable[[], str],
    call: Callable[[], Awaitable[T]],
    *,
    tracebacks: RateLimitedLog,
) -> T:
    """Call until it succeeds; the first failure is logged with its traceback, repeats briefly.

    A retryable ``PersistenceError`` (the projection's own store calls while
    the store is away) is an outage, not a bug in the handler: it is logged on
    one line, without a traceback, from the first attempt. Other errors get a
    traceback on their first failure if *tracebacks* (the projection's, on this
    node) admits their type; other partitions failing alike log one line.
    """
    attempt = 0
    described = ""
    while True:
        try:
            result = await call()
        except Exception as exc:
            attempt += 1
            described = described or (what if isinstance(what, str) else what())
            if (
                attempt == 1
                and not (isinstance(exc, PersistenceError) and exc.retryable)
                and tracebacks.admit(f"{type(exc).__module__}.{type(exc).__qualname__}") is not None
            ):
                _log.exception("%s failed; retrying", described)
            else:
                _repeat_log.warning(
                    described,
                    "%s failed (attempt %d); retrying: %s",
                    described,
                    attempt,
                    describe_error(exc),
                )
        else:
            if attempt:
                _repeat_log.reset(described)
            return result
        await sleep_backoff(options, attempt)


async def compact_projection(config: HandlerConfig, *, clock: Callable[[], datetime]) -> None:
    """Call the projection's ``compact()`` once; errors propagate to the caller."""
    handler = cast(_Projection, config.handler)
    await handler.compact(ProjectionCompactScope(clock=clock, logger=_logger_for(config)))


async def reset_projection(
    app: ApplicationConfig,
    handler: str,
    *,
    clock: Callable[[], datetime],
    control: ProjectionControl | None = None,
) -> None:
    """Reset a projection (operator command): clear its data and rebuild it from offset 0.

    *handler* is the projection's name or identity key. With *control* (from a
    running engine's ``ConsumerSet.projection_control``) delivery to the
    projection on this node stops first and restarts afterwards from the
    handler's checkpoint, which ``reset()`` has set back to 0. Without it (no
    engine running), only ``reset()`` is called; the next engine run starts
    from offset 0.

    Raises:
        LookupError: the application has no projection called *handler*.
        ProjectionNotResettable: the projection's ``reset()`` raised
            ``dogma.NotSupported``.
    """
    config = app.handler_by_name(handler) or app.handler_by_key(handler)
    if config is None or config.kind is not HandlerKind.PROJECTION:
        raise LookupError(f"application {app.identity} has no projection named {handler!r}")
    target = cast(_Projection, config.handler)
    scope = ProjectionResetScope(clock=clock, logger=_logger_for(config))
    async with contextlib.AsyncExitStack() as stack:
        if control is not None:
            await stack.enter_async_context(control.paused())
        try:
            await target.reset(scope)
        except dogma.NotSupported as exc:
            raise ProjectionNotResettable(
                f"{config.describe()} does not support reset(): {exc}"
            ) from exc
    _log.info("%s: reset; rebuilding from offset 0", config.describe())


if TYPE_CHECKING:
    # Static proof that the scopes implement dogma's protocols.
    _event_scope: type[dogma.ProjectionEventScope] = ProjectionEventScope
    _compact_scope: type[dogma.ProjectionCompactScope] = ProjectionCompactScope
    _reset_scope: type[dogma.ProjectionResetScope] = ProjectionResetScope
