"""Start-up: wait for the store to be reachable, or fail with its reason.

At start-up the engine provisions its provider (the first call that connects)
through ``wait_for_store``. A failure that waiting cannot cure (a rejected
password, a missing database or schema: ``PersistenceError.retryable`` is
false) is raised at once. An unreachable store (retryable) is tried again with
capped, jittered backoff and one log line per attempt::

    store unreachable (connection refused ...); retrying in 1.6 s, giving up in 52 s

and an attempt that hangs (a store that accepts connections but does not
answer, a driver retrying inside the call) logs every ``PROGRESS_INTERVAL``
seconds that it is still waiting, so the operator sees progress early. This
goes on until ``EngineSettings.start_timeout`` (``with_start_timeout``,
``DOGMA_START_TIMEOUT``, ``runkit run --start-timeout``) has passed; then
``StoreUnavailable`` says how long it tried, why it failed, what to check and
how to wait longer. Outages *after* start-up are survived by the engine's
components themselves; this only covers the first contact.
"""

from __future__ import annotations

import logging
from typing import Final

import anyio

from ..persistence import PersistenceError, Provider, StoreUnavailable
from .backoff import backoff
from .logs import describe_error

__all__ = ["wait_for_store"]

_log = logging.getLogger("runkit.engine.startup")

#: Seconds before the first retry (the ceiling of the first jittered delay) ...
RETRY_BASE: Final = 2.0
#: ... doubling per attempt up to this.
RETRY_CAP: Final = 10.0
#: Every attempt may take this long, even the last one when less time is left.
MIN_ATTEMPT: Final = 1.0
#: Seconds between two "no answer yet" lines while one attempt hangs.
PROGRESS_INTERVAL: Final = 10.0

# Where the start timeout is set: a node under `runkit run`, a runkit.Client
# (`runkit execute` among them) or an engine embedded in code.
_RAISE_TIMEOUT: Final = (
    "to wait longer, raise the start timeout (DOGMA_START_TIMEOUT or "
    "runkit run --start-timeout; runkit.with_start_timeout() in code)"
)


async def wait_for_store(provider: Provider, *, timeout: float) -> None:
    """Provision *provider*, retrying while the store is unreachable, for up to *timeout* s.

    Args:
        provider: The provider to provision (``Provider.provision``).
        timeout: Seconds to keep trying an unreachable store; an attempt still
            running when they are up is abandoned (each attempt gets at least
            ``MIN_ATTEMPT`` seconds, so the bound may be exceeded by that).

    Raises:
        PersistenceError: at once, for a failure that is not ``retryable``
            (its message names the server's reason).
        StoreUnavailable: ``retryable``, when the store is still unreachable
            after *timeout* seconds.
    """
    deadline = anyio.current_time() + timeout
    attempt = 0
    reason = ""
    cause: BaseException | None = None
    while True:
        attempt += 1
        remaining = deadline - anyio.current_time()
        bound = max(remaining, MIN_ATTEMPT)
        try:
            await _attempt(provider, bound, attempt, deadline)
        except TimeoutError:
            # Keep an earlier attempt's reason: it says more than the timeout.
            reason = reason or f"no answer within {bound:.1f} s"
        except PersistenceError as exc:
            if not exc.retryable:
                raise
            reason, cause = describe_error(exc), exc
        else:
            if attempt > 1:
                _log.info("store reachable after %d attempts", attempt)
            return
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise StoreUnavailable(
                f"the store is still unreachable after {timeout:g} s ({attempt} attempt"
                f"{'' if attempt == 1 else 's'}): {reason}; check that the store is running "
                "and that the persistence URL names the right host and port; " + _RAISE_TIMEOUT,
                retryable=True,
            ) from cause
        delay = min(backoff(attempt, RETRY_BASE, RETRY_CAP), remaining)
        _log.warning(
            "store unreachable (%s); retrying in %.1f s, giving up in %.0f s",
            reason,
            delay,
            remaining,
        )
        await anyio.sleep(delay)


async def _attempt(provider: Provider, bound: float, attempt: int, deadline: float) -> None:
    """One ``provision()`` of at most *bound* seconds, logging while it hangs.

    Its exception is raised as is (not in a group), like a plain call's.
    """
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_report_hanging, attempt, deadline)
        try:
            with anyio.fail_after(bound):
                await provider.provision()
        except Exception as exc:
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error


async def _report_hanging(attempt: int, deadline: float) -> None:
    started = anyio.current_time()
    while True:
        await anyio.sleep(PROGRESS_INTERVAL)
        now = anyio.current_time()
        _log.warning(
            "no answer from the store yet (attempt %d, waiting %.0f s); giving up in %.0f s",
            attempt,
            now - started,
            max(deadline - now, 0),
        )
