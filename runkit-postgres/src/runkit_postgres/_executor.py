"""Run blocking psycopg calls in worker threads, cancellably, and map their errors.

psycopg's async API works on asyncio only, and an anyio cancel scope closes its
connections; so the driver uses the sync ``ConnectionPool`` and runs each
operation in a worker thread (``anyio.to_thread``), at most ``pool_max_size``
at a time. When the caller is cancelled, the thread is abandoned at once, a
cancel request is sent to the server for the statement it is running, and the
connection goes back to the pool only after that request has been handled, so
it stays usable and the cancel can never hit someone else's statement.

The pool is created on the first call, after one probe connection succeeded
(see ``_connecting``): a wrong password or database name fails that call at
once with the server's reason, as a non-retryable ``StoreUnavailable``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import socket
import threading
from collections.abc import Callable
from typing import Final, TypeVar

import anyio
import anyio.to_thread
import psycopg
import psycopg.errors
from psycopg import Connection
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from runkit.persistence import PersistenceError, StoreUnavailable

from ._config import Settings, scrub
from ._connecting import ConnectFailed, PoolWatch, discard, probe, using_pool
from ._sql import configure_connection, configure_read_only_connection

__all__ = ["Executor", "Operation"]

T = TypeVar("T")

#: What one operation does with a connection, in a worker thread.
Operation = Callable[[Connection[tuple[object, ...]]], T]

_log = logging.getLogger("runkit_postgres")

#: Attempts of a read, or of a write that certainly did not reach the server.
_MAX_ATTEMPTS: Final = 3
_BACKOFF_SECONDS: Final = 0.05
#: How long a cancelled call waits for the server to acknowledge the cancel
#: request, and then for the statement to end.
_CANCEL_TIMEOUT: Final = 10.0
#: Seconds an attempt to replace a lost connection goes on before the pool
#: starts a fresh one (``_reconnect_now``). psycopg_pool doubles the wait between
#: attempts (1, 2, 4 ... s) for up to 5 minutes by default, so after an outage
#: its next attempt could come as long after the server was back as the outage
#: had lasted. Restarted every 3 s, attempts are at most 2 s apart, however long
#: the server is away.
_RECONNECT_TIMEOUT: Final = 3.0

# SQLSTATEs after which the same call may succeed: the statement was rolled
# back (serialization failure, deadlock, lock or statement timeout, shortage
# of resources) or the server is restarting.
_TRANSIENT_STATES: Final = frozenset(
    {"40001", "40P01", "55P03", "57014", "53000", "53100", "53200", "53300", "53400"}
)
# ... of which these are worth retrying at once inside the driver.
_RETRY_STATES: Final = frozenset({"40001", "40P01", "53300"})
# The session is gone: admin/crash shutdown, cannot connect now.
_DISCONNECT_STATES: Final = frozenset({"57P01", "57P02", "57P03"})
# The schema or a table vanished: it was dropped behind the driver's back.
_MISSING_STATES: Final = frozenset({"3F000", "42P01"})

# Pool names are unique per executor, so the warning filter can tell pools apart.
_POOL_NUMBERS = itertools.count(1)


class _Abandoned(Exception):
    """Raised in a worker thread whose caller was cancelled before it started."""


class _Call:
    """The state one operation shares between the event loop and its worker thread.

    ``lock`` orders the worker's use of the connection against a cancel: the
    worker holds a connection only between publishing it (``conn``) and
    withdrawing it, and withdrawing waits while a cancel request is in flight.
    ``waiter`` is only created by a canceller that must wait for the worker
    (creating an Event for every call would cost more than the rest of this).
    """

    __slots__ = ("abandoned", "cancel_sent", "conn", "lock", "sent", "waiter")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Connection[tuple[object, ...]] | None = None
        self.abandoned = False  # the caller was cancelled; do no (more) work
        self.cancel_sent = False  # a server-side cancel was sent for our statement
        self.sent = False  # the operation started talking to the server
        self.waiter: threading.Event | None = None


def _sever(conn: Connection[tuple[object, ...]]) -> None:
    """Shut *conn*'s socket down, so that a worker thread blocked on it returns.

    A server that stops answering (stopped, or a network that drops packets)
    would otherwise hold the thread, and with it the process at exit, for as
    long as the operating system keeps the connection.
    """
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass  # closed meanwhile: nothing to wake


class Executor:
    """The connection pool, the thread limiter and the retry and error policy."""

    def __init__(self, conninfo: str, settings: Settings, *, display: str) -> None:
        self._conninfo = conninfo
        self._display = display
        self._settings = settings
        self._pool: ConnectionPool[Connection[tuple[object, ...]]] | None = None
        self._pool_lock = threading.Lock()
        self._closed = False
        self._read_only = False
        self._watch = PoolWatch(
            f"runkit-postgres:{settings.schema}:{next(_POOL_NUMBERS)}", display, conninfo
        )
        # Threads never outnumber connections: more would only queue in the pool.
        self._limiter = anyio.CapacityLimiter(settings.pool_max_size)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def read_only(self) -> bool:
        """Whether every session is read-only (``default_transaction_read_only``)."""
        return self._read_only

    def set_read_only(self) -> None:
        """Make every session read-only; only before the first call."""
        with self._pool_lock:
            if self._pool is not None:
                raise RuntimeError("set_read_only() must be called before the provider is used")
            self._read_only = True

    def _get_pool(self) -> ConnectionPool[Connection[tuple[object, ...]]]:
        """Create and open the pool on first use (in a worker thread: it may block).

        Raises ``ConnectFailed`` if the probe connection fails; the pool is not
        created then, so the next call probes again.
        """
        with self._pool_lock:
            if self._closed:
                raise PoolClosed("the provider is closed")
            if self._pool is not None:
                return self._pool
        # Not under the lock: close() takes it on the event loop, and must not
        # wait for a connection attempt. Racing first calls may probe twice.
        probe(self._conninfo)
        with self._pool_lock:
            if self._closed:
                raise PoolClosed("the provider is closed")
            if self._pool is None:
                pool: ConnectionPool[Connection[tuple[object, ...]]] = ConnectionPool(
                    self._conninfo,
                    kwargs={"autocommit": True, "fallback_application_name": "runkit"},
                    min_size=self._settings.pool_min_size,
                    max_size=self._settings.pool_max_size,
                    timeout=self._settings.pool_timeout,
                    reconnect_timeout=_RECONNECT_TIMEOUT,
                    reconnect_failed=_reconnect_now,
                    configure=(
                        configure_read_only_connection if self._read_only else configure_connection
                    ),
                    name=self._watch.name,
                    open=False,
                )
                self._watch.register()
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    async def close(self) -> None:
        """Close the pool and wait for its threads. Idempotent."""
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pool.close)

    def _work(self, call: _Call, operation: Operation[T]) -> T:
        """The worker thread's side of ``run``."""
        if call.abandoned:  # unlocked: a stale read only costs the check below
            raise _Abandoned
        with using_pool(self._watch), self._get_pool().connection() as conn:
            with call.lock:
                if call.abandoned:
                    raise _Abandoned  # never seen: the caller has left
                call.conn = conn
                call.sent = True
            canceled = False
            try:
                return operation(conn)
            except psycopg.errors.QueryCanceled:
                canceled = True
                raise
            finally:
                with call.lock:  # waits for an in-flight cancel request
                    call.conn = None
                    stale_cancel = call.cancel_sent and not canceled
                    waiter = call.waiter
                if stale_cancel and not conn.closed:
                    # The statement finished before the cancel arrived (or the
                    # cancel request failed); a late signal could hit the next
                    # statement, so the connection is not reused.
                    discard(conn)
                if waiter is not None:
                    waiter.set()

    def _cancel(self, call: _Call) -> None:
        """Cancel *call*'s statement server-side and wait until it has ended."""
        with call.lock:
            call.abandoned = True
            conn = call.conn
            if conn is None:
                # Not started, still waiting for a connection (it will see
                # ``abandoned`` and give up without touching the server), or
                # already done with its connection.
                return
            call.cancel_sent = True  # whatever happens, the worker will not reuse conn
            try:
                conn.cancel_safe(timeout=_CANCEL_TIMEOUT)
            except Exception as exc:
                # The statement may run on; waiting for it could take forever.
                # Expected while the server goes away (an outage, a restart):
                # one line, not a traceback; the connection is not reused.
                _log.warning(
                    "could not cancel a statement server-side (its connection is dropped): %s",
                    scrub(str(exc).splitlines()[0] if str(exc) else repr(exc), self._conninfo),
                )
                _sever(conn)
                return
            waiter = call.waiter = threading.Event()
        if not waiter.wait(_CANCEL_TIMEOUT):
            _log.warning(
                "a cancelled statement did not end within %ss (its connection is dropped)",
                _CANCEL_TIMEOUT,
            )
            _sever(conn)

    async def run(self, operation: Operation[T], *, what: str, write: bool) -> T:
        """Run *operation* with a pooled connection in a worker thread.

        Errors become ``PersistenceError`` whose message starts with *what*.
        Reads, and writes that certainly never reached the server, are retried
        a few times when the failure is transient; a write whose outcome is
        unknown is never retried (its error is ``ambiguous``).
        """
        attempt = 1
        while True:
            if self._closed:
                raise PersistenceError(f"{what}: the provider is closed")
            call = _Call()
            try:
                result = await anyio.to_thread.run_sync(
                    self._work, call, operation, abandon_on_cancel=True, limiter=self._limiter
                )
            except ConnectFailed as exc:
                state = "is unreachable" if exc.retryable else "refused the connection"
                raise StoreUnavailable(
                    f"{what}: {self._display!r} {state}: {exc.reason}", retryable=exc.retryable
                ) from None
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._cancel, call)
                raise
            except (psycopg.Error, PoolTimeout) as exc:
                error = self.translate(exc, what=what, write=write, sent=call.sent)
                if not self._should_retry(exc, error, attempt=attempt):
                    raise error from None
                _log.info("retrying after a transient error (attempt %d): %s", attempt, error)
            else:
                if self._watch.last_error is not None:
                    self._watch.recovered()
                return result
            attempt += 1
            # Full jitter, so that racing retriers spread out.
            await anyio.sleep(random.uniform(0, _BACKOFF_SECONDS * 2**attempt))

    @staticmethod
    def _should_retry(exc: BaseException, error: PersistenceError, *, attempt: int) -> bool:
        if attempt >= _MAX_ATTEMPTS or not error.retryable or error.ambiguous:
            return False
        if isinstance(exc, PoolTimeout | PoolClosed):
            return False  # already waited pool_timeout; or closed for good
        if isinstance(exc, psycopg.Error) and exc.sqlstate in _RETRY_STATES:
            return True  # the statement was rolled back: safe for writes too
        # A lost connection: reads always, writes only if never sent (not ambiguous).
        return _is_disconnect(exc)

    def translate(
        self, exc: BaseException, *, what: str, write: bool, sent: bool
    ) -> PersistenceError:
        """Map a psycopg or pool error to a ``PersistenceError`` with honest flags.

        ``retryable``: the same call may succeed later. ``ambiguous``: a write
        may have taken effect although it failed (the connection was lost after
        the statement was sent).
        """
        # The first line is the message; CONTEXT and DETAIL lines may quote data.
        lines = str(exc).strip().splitlines() or [""]
        detail = scrub(f"{type(exc).__name__}: {lines[0]}", self._conninfo)
        if isinstance(exc, PoolClosed):
            return PersistenceError(f"{what}: the provider is closed")
        if isinstance(exc, PoolTimeout):
            last = self._watch.last_error
            cause = (
                f"the last connection attempt failed: {last}"
                if last is not None
                else "is the server overloaded, or every connection in use?"
            )
            return StoreUnavailable(
                f"{what}: no connection to {self._display!r} within "
                f"{self._settings.pool_timeout:g}s (pool_max_size="
                f"{self._settings.pool_max_size}); {cause}",
                retryable=True,
            )
        state = exc.sqlstate if isinstance(exc, psycopg.Error) else None
        if _is_disconnect(exc):
            ambiguous = write and sent
            suffix = "; the write may or may not have taken effect" if ambiguous else ""
            return PersistenceError(
                f"{what}: lost the connection to {self._display!r}: {detail}{suffix}",
                retryable=True,
                ambiguous=ambiguous,
            )
        if state in _MISSING_STATES:
            return PersistenceError(
                f"{what}: the schema {self._settings.schema!r} or one of its tables is "
                f"missing (dropped while in use?): {detail}"
            )
        return PersistenceError(f"{what}: {detail}", retryable=state in _TRANSIENT_STATES)


def _reconnect_now(pool: ConnectionPool[Connection[tuple[object, ...]]]) -> None:
    """Called by the pool when it gave up replacing a connection: try again at once.

    Giving up freed the connection's slot; ``check()`` lets the pool grow into
    it, with a first attempt now and a fresh backoff. Waiting for an operation
    to ask for a connection instead is not enough: operations already waiting
    for one (as many as there are threads) ask only once, and then wait for up
    to ``pool_timeout``.
    """
    with contextlib.suppress(PoolClosed):  # closing: nothing more to connect
        pool.check()


def _is_disconnect(exc: BaseException) -> bool:
    """Whether *exc* means the session ended (rather than one statement failing)."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith("08") or state in _DISCONNECT_STATES
