"""Run blocking psycopg calls in worker threads, cancellably, and map their errors.

psycopg's async API works on asyncio only, and an anyio cancel scope closes its
connections; so the driver uses the sync ``ConnectionPool`` and runs each
operation in a worker thread (``anyio.to_thread``), at most ``pool_max_size``
at a time. When the caller is cancelled, a cancel request is sent to the server
for the statement its thread is running, and the connection goes back to the
pool only after that request has been handled, so it stays usable and the
cancel can never hit someone else's statement. The caller returns once its
thread is done: a thread still waiting for a connection gives up within
``_WAIT_SLICE``, so the bound on threads holds through cancellations too.

The pool is created on the first call, after one probe connection succeeded
(see ``_connecting``): a wrong password or database name fails that call at
once with the server's reason, as a non-retryable ``StoreUnavailable``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
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

__all__ = ["Executor", "Interrupt", "Interrupted", "Operation"]

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
#: Seconds a worker waits for a pooled connection before it checks whether its
#: caller has left (psycopg_pool's wait cannot be interrupted).
_WAIT_SLICE: Final = 0.05

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
    """Raised in a worker thread whose call was cancelled before it had a connection."""


class Interrupted(Exception):
    """``Executor.run`` was stopped with ``Interrupt.stop()``; its operation had no effect.

    Its statement was cancelled server-side, or never sent.
    """


class _Call:
    """The state one operation shares between the event loop and its worker thread.

    ``lock`` orders the worker's use of the connection against a cancel: the
    worker holds a connection only between publishing it (``conn``) and
    withdrawing it, and withdrawing waits while a cancel request is in flight.
    ``waiter`` is only created by a canceller that must wait for the worker
    (creating an Event for every call would cost more than the rest of this).
    """

    __slots__ = ("abandoned", "busy", "cancel_sent", "conn", "lock", "sent", "waiter")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: Connection[tuple[object, ...]] | None = None
        self.abandoned = False  # the caller was cancelled; do no (more) work
        self.busy = False  # the worker thread is in ``_work``
        self.cancel_sent = False  # a server-side cancel was sent for our statement
        self.sent = False  # the operation started talking to the server
        self.waiter: threading.Event | None = None


class Interrupt:
    """Lets a task other than the caller stop one ``Executor.run`` (a grouped statement).

    ``stop()`` cancels the statement server-side (or keeps it from starting)
    and returns once its worker thread is done with it; ``run`` then raises
    ``Interrupted``, or returns the result if the statement had already ended.
    """

    __slots__ = ("_call", "_executor", "_waiting", "requested")

    def __init__(self) -> None:
        self.requested = False
        self._waiting: anyio.CancelScope | None = None  # while run waits for a thread token
        self._call: _Call | None = None  # the attempt in flight
        self._executor: Executor | None = None

    async def stop(self) -> None:
        """Stop the run; shielded, since it only waits for the worker thread.

        Only the first call does anything.
        """
        if self.requested:
            return
        self.requested = True
        if self._waiting is not None:
            self._waiting.cancel()
        call, executor = self._call, self._executor
        if call is not None and executor is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(executor._cancel, call, limiter=executor._threads)


def _drop_timed_out_waiters(pool: ConnectionPool[Connection[tuple[object, ...]]]) -> None:
    """Take the places of timed-out ``getconn`` calls out of the pool's queue.

    psycopg_pool leaves a timed-out waiter queued until a connection comes
    back: waiting in slices, as ``_connection`` does, would add one per slice
    and thread for as long as an outage lasts (memory, and a pool that grows
    for clients nobody is). The queue is psycopg_pool's own, so it is only
    touched if it looks as expected (as in psycopg_pool 3.3).
    """
    waiting = getattr(pool, "_waiting", None)
    lock = getattr(pool, "_lock", None)
    if not isinstance(waiting, collections.deque) or lock is None:
        return
    with lock:
        live = [w for w in waiting if getattr(w, "error", None) is None]
        if len(live) != len(waiting):
            waiting.clear()
            waiting.extend(live)


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
        # A call holds its token until its thread is done, cancelled or not:
        # anyio's asyncio backend releases a ``to_thread`` limiter's token as
        # soon as the call is abandoned, so ``_threads`` (which also runs the
        # cancellers, as many again) is only there to keep off anyio's default.
        self._limiter = anyio.CapacityLimiter(settings.pool_max_size)
        self._threads = anyio.CapacityLimiter(2 * settings.pool_max_size)

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
        with call.lock:
            if call.abandoned:
                raise _Abandoned
            call.busy = True
        try:
            with using_pool(self._watch), self._connection(call) as conn:
                with call.lock:
                    if call.abandoned:
                        raise _Abandoned  # the caller does not wait for this
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
                    if stale_cancel and not conn.closed:
                        # The statement finished before the cancel arrived (or
                        # the cancel request failed); a late signal could hit
                        # the next statement, so the connection is not reused.
                        discard(conn)
        finally:
            with call.lock:
                call.busy = False
                waiter = call.waiter
            if waiter is not None:
                waiter.set()

    @contextlib.contextmanager
    def _connection(self, call: _Call) -> Iterator[Connection[tuple[object, ...]]]:
        """A pooled connection, as ``pool.connection()``, unless the call is abandoned first.

        The wait for it goes in slices, so that an abandoned call's thread ends
        soon (rather than after ``pool_timeout``) and gives its place back.
        """
        pool = self._get_pool()
        deadline = time.monotonic() + self._settings.pool_timeout
        while True:
            try:
                conn = pool.getconn(timeout=min(_WAIT_SLICE, max(0.0, deadline - time.monotonic())))
                break
            except PoolTimeout:
                _drop_timed_out_waiters(pool)
                if time.monotonic() >= deadline:
                    raise
                if call.abandoned:  # unlocked: read again within a slice
                    raise _Abandoned from None
        try:
            with conn:
                yield conn
        finally:
            pool.putconn(conn)

    def _cancel(self, call: _Call) -> None:
        """Cancel *call*'s statement server-side and wait until its thread is done.

        Several cancellers (the caller and an ``Interrupt``) may race: the
        first sends the cancel request, all wait.
        """
        with call.lock:
            call.abandoned = True
            conn = call.conn
            if not call.busy and conn is None:
                # Not started (it will see ``abandoned`` and give up without
                # touching the server), or done.
                return
            if conn is not None and not call.cancel_sent:
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
            waiter = call.waiter = call.waiter or threading.Event()
        # Without a connection the worker is waiting for one (a slice) or probing.
        if not waiter.wait(_CANCEL_TIMEOUT) and conn is not None:
            _log.warning(
                "a cancelled statement did not end within %ss (its connection is dropped)",
                _CANCEL_TIMEOUT,
            )
            _sever(conn)

    async def run(
        self,
        operation: Operation[T],
        *,
        what: str,
        write: bool,
        interrupt: Interrupt | None = None,
    ) -> T:
        """Run *operation* with a pooled connection in a worker thread.

        Errors become ``PersistenceError`` whose message starts with *what*.
        Reads, and writes that certainly never reached the server, are retried
        a few times when the failure is transient; a write whose outcome is
        unknown is never retried (its error is ``ambiguous``).

        :raises Interrupted: if *interrupt* was stopped and the operation had no effect.
        """
        attempt = 1
        if interrupt is not None:
            interrupt._executor = self
        while True:
            if self._closed:
                raise PersistenceError(f"{what}: the provider is closed")
            call = _Call()
            try:
                await self._acquire(interrupt)
                try:
                    if interrupt is not None:
                        interrupt._call = call
                    result = await anyio.to_thread.run_sync(
                        self._work, call, operation, abandon_on_cancel=True, limiter=self._threads
                    )
                except anyio.get_cancelled_exc_class():
                    # Still holding the token: the thread counts until it is done.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self._cancel, call, limiter=self._threads)
                    raise
                finally:
                    self._limiter.release()
                    if interrupt is not None:
                        interrupt._call = None
            except ConnectFailed as exc:
                state = "is unreachable" if exc.retryable else "refused the connection"
                raise StoreUnavailable(
                    f"{what}: {self._display!r} {state}: {exc.reason}", retryable=exc.retryable
                ) from None
            except _Abandoned:
                raise Interrupted from None  # only an interrupt abandons a call its caller awaits
            except (psycopg.Error, PoolTimeout) as exc:
                if interrupt is not None and interrupt.requested:
                    if isinstance(exc, psycopg.errors.QueryCanceled):
                        raise Interrupted from None  # rolled back
                    raise self.translate(exc, what=what, write=write, sent=call.sent) from None
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

    async def _acquire(self, interrupt: Interrupt | None) -> None:
        """Take a thread token; raise ``Interrupted`` if *interrupt* is stopped first."""
        if interrupt is None:
            await self._limiter.acquire()
            return
        acquired = False
        with anyio.CancelScope() as interrupt._waiting:
            if not interrupt.requested:
                await self._limiter.acquire()
                acquired = True
        interrupt._waiting = None
        if not acquired:
            raise Interrupted

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
