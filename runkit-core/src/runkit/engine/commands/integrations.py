"""Integration handling: run ``handle_command`` and keep its events only on success.

Integrations may have side effects, so execution is at least once: a crash
after the side effect and before the events are published runs the handler
again. Events recorded by a failed attempt are discarded. The concurrency
preference is applied by the dispatcher (``commands``): commands of a
``MINIMIZE`` integration all map to one partition (the handler key is their
workload key) and run there one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import dogma

from ...config import HandlerConfig
from ..envelope import Envelope, to_message
from ._handling import EventRecorder, handler_log
from .inbox import InboxEntry
from .poison import HandlerBug

__all__ = ["execute_integration"]


class _Scope:
    """The ``dogma.IntegrationCommandScope`` given to ``handle_command``."""

    def __init__(self, recorder: EventRecorder) -> None:
        self._recorder = recorder

    def now(self) -> datetime:
        return self._recorder.clock()

    def log(self, fmt: str, *args: object) -> None:
        r = self._recorder
        handler_log(r.handler, r.command, None, fmt, args)

    def record_event(self, event: dogma.Event) -> None:
        self._recorder.record(event)


async def execute_integration(
    handler: HandlerConfig,
    entry: InboxEntry,
    *,
    site_key: str | None,
    clock: Callable[[], datetime],
    max_bytes: int,
) -> tuple[Envelope, ...]:
    """Handle *entry* once; return the events it recorded (at most *max_bytes*, see
    ``EventRecorder``).

    Raises ``HandlerBug`` for bugs and whatever the handler raised.
    """
    recorder = EventRecorder(
        handler,
        entry.envelope,
        instance_id=None,
        site_key=site_key,
        clock=clock,
        max_bytes=max_bytes,
    )
    command = to_message(entry.envelope)
    integration: Any = handler.handler
    try:
        await integration.handle_command(_Scope(recorder), command)
    except dogma.UnexpectedMessage as exc:
        raise HandlerBug(f"{handler.describe()} raised UnexpectedMessage: {exc}") from exc
    except Exception as exc:
        failure = recorder.failure(exc)
        if failure is exc:
            raise
        raise failure from exc
    recorder.check()
    return tuple(recorder.events)
