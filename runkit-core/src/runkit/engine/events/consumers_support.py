"""Shared plumbing for the event consumers: options, retries, checkpoints, handler logging.

Private to the events side of the engine (``consumers``, ``processes``,
``deadlines``, ``projections``); nothing here is public API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import msgspec

from ...persistence import Conflict, Keyspace, PersistenceError
from ..backoff import backoff
from ..logs import RateLimitedLog, describe_error

if TYPE_CHECKING:
    from ..settings import EngineSettings

__all__ = [
    "ConsumerCheckpoint",
    "ConsumerOptions",
    "HandlerLogger",
    "Restarts",
    "backoff_delay",
    "close_iterator",
    "sleep_backoff",
]


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ConsumerOptions:
    """Tuning of the event consumers; the defaults suit production.

    Attributes:
        retry_initial: Seconds to wait after a handler's first failure; doubles
            on each further failure, with jitter.
        retry_max: Cap of the wait between attempts, in seconds.
        max_attempts: Failed attempts at handling one message before a process
            records it as poisoned and moves on. Projections never give up
            (skipping an event would break ADR-26 exactly-once); they keep
            retrying at ``retry_max``.
        checkpoint_interval: Seconds between writes of a process routing consumer's
            stream checkpoint (checkpoints only bound redelivery after a
            restart; per-instance positions make redelivery harmless).
        compact_interval: Seconds between ``compact()`` calls per projection.
        first_compact_delay: Ceiling of the wait, after the node starts, before
            its first round of ``compact()`` calls (then one every
            ``compact_interval``). The wait is drawn from the upper half of
            ``min(first_compact_delay, compact_interval)``, so nodes started
            together do not compact at once, and a node restarted more often
            than ``compact_interval`` still compacts; it also gives membership
            time to settle, so only the node that owns a projection's
            compaction runs it.
        process_concurrency: Process instances one home partition handles at
            once (each instance's deliveries in order, different instances
            concurrently; 1 handles them strictly in order), and events a
            routing consumer (handler, partition) has in flight.
        deadline_rescan_interval: Longest a deadline timer sleeps without
            re-reading the engine clock and its deadline journal. Deadlines
            appended by this node wake the timer at once; this bounds how late
            one appended by another node (or a jump of an injected clock) is seen.
        process_cache_size: Idle process instances each home partition keeps
            in memory (state and live root), so handling a delivery of a
            cached instance costs no read.
    """

    retry_initial: float = attrs.field(default=0.1, validator=_positive)
    retry_max: float = attrs.field(default=30.0, validator=_positive)
    max_attempts: int = attrs.field(default=8, validator=_positive)
    checkpoint_interval: float = attrs.field(default=1.0, validator=_positive)
    compact_interval: float = attrs.field(default=3600.0, validator=_positive)
    first_compact_delay: float = attrs.field(default=60.0, validator=_positive)
    process_concurrency: int = attrs.field(default=32, validator=_positive)
    deadline_rescan_interval: float = attrs.field(default=5.0, validator=_positive)
    process_cache_size: int = attrs.field(default=10_000, validator=_positive)

    @classmethod
    def from_settings(cls, settings: EngineSettings, **overrides: Any) -> ConsumerOptions:
        """Options that share the engine's retry policy (``max_attempts``, delays).

        The intervals are read from settings of the same names when
        ``EngineSettings`` has them (it does not yet), else the defaults apply.
        """
        values: dict[str, Any] = {
            "retry_initial": settings.retry_base_delay,
            "retry_max": settings.retry_max_delay,
            "max_attempts": settings.max_attempts,
        }
        for name in _INTERVALS:
            value = getattr(settings, name, None)
            if value is not None:
                values[name] = value
        values.update(overrides)
        return cls(**values)


_INTERVALS = ("checkpoint_interval", "compact_interval", "deadline_rescan_interval")


def backoff_delay(options: ConsumerOptions, attempt: int) -> float:
    """Seconds to wait after failed attempt number *attempt* (1-based): capped, with jitter."""
    return backoff(attempt, options.retry_initial, options.retry_max)


async def sleep_backoff(options: ConsumerOptions, attempt: int) -> None:
    """Sleep for ``backoff_delay(options, attempt)``."""
    await anyio.sleep(backoff_delay(options, attempt))


class Restarts:
    """The backoff of a consumer that restarts after store errors.

    Only failures in a row count: a run that lasted ``retry_max`` or longer
    before it failed was healthy, so the count starts again. Otherwise errors
    scattered over a node's life would leave every later restart waiting the
    full cap.
    """

    def __init__(self, options: ConsumerOptions) -> None:
        self._options = options
        self._failures = 0
        self._started = anyio.current_time()

    def begin(self) -> None:
        """A run starts now."""
        self._started = anyio.current_time()

    async def failed(self) -> None:
        """The run failed: sleep for the backoff of the failures in a row so far."""
        if anyio.current_time() - self._started >= self._options.retry_max:
            self._failures = 0
        self._failures += 1
        await sleep_backoff(self._options, self._failures)


@attrs.frozen
class HandlerLogger:
    """What ``scope.log(fmt, *args)`` writes to: a logger, prefixed with the handler."""

    logger: logging.Logger
    prefix: str

    def log(self, fmt: str, *args: object) -> None:
        """Log a %-style message at INFO, naming the handler (and instance)."""
        self.logger.info("%s: " + fmt, self.prefix, *args)


Clock = Callable[[], datetime]


async def close_iterator(iterator: AsyncIterator[object]) -> None:
    """Close an abandoned async iterator (generators must be closed in their task on trio)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


_checkpoint_log = logging.getLogger("runkit.engine.events.processes")
_save_log = RateLimitedLog(_checkpoint_log, 10.0)
_int_encoder = msgspec.msgpack.Encoder()
_int_decoder = msgspec.msgpack.Decoder(int)


class ConsumerCheckpoint:
    """A process routing consumer's stream offset, saved with conditional writes.

    ``value`` is the lowest offset not yet done (the caller moves it);
    ``save_periodically`` writes it in the background, and ``save`` once more
    as the consumer stops. It only bounds redelivery after a restart.
    """

    def __init__(self, store: Keyspace, key: bytes) -> None:
        self._store = store
        self._key = key
        self._revision = ""
        self._saved = 0
        self.value = 0

    async def load(self) -> None:
        data, self._revision = await self._store.get(self._key)
        self.value = self._saved = _int_decoder.decode(data) if data else 0

    async def save(self) -> None:
        value = self.value
        if value <= self._saved:
            return
        try:
            self._revision = await self._store.set(
                self._key, _int_encoder.encode(value), self._revision
            )
            self._saved = value
        except Conflict:
            # Another owner wrote it (we may have lost the partition): take its
            # revision and let the next save decide.
            data, self._revision = await self._store.get(self._key)
            self._saved = _int_decoder.decode(data) if data else 0

    async def save_periodically(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await self.save()
            except PersistenceError as exc:
                # The store is failing (an outage): one line, at most one per interval.
                _save_log.warning(
                    self._key,
                    "cannot save checkpoint %r; will retry: %s",
                    self._key,
                    describe_error(exc),
                )
            else:
                _save_log.reset(self._key)
