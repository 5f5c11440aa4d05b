"""Shared plumbing for the event consumers: options, retries and handler logging.

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

from ..backoff import backoff

if TYPE_CHECKING:
    from ..settings import EngineSettings

__all__ = [
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
        checkpoint_interval: Seconds between writes of a process consumer's
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
        process_concurrency: Events one process consumer (handler, partition)
            handles at once: each instance's events in order, different
            instances concurrently. 1 handles the stream strictly in order.
        deadline_rescan_interval: Longest a deadline timer sleeps without
            re-reading the engine clock and its deadline journal. Deadlines
            appended by this node wake the timer at once; this bounds how late
            one appended by another node (or a jump of an injected clock) is seen.
        process_cache_size: Process instances each process handler keeps in
            memory on this node (root, record and revision), so handling an
            event of a cached instance costs no read (ADR 0006).
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
