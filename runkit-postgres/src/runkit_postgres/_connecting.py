"""The first connection, what its failure means, and psycopg_pool's outage warnings.

libpq reports a failed connection as an ``OperationalError`` without a SQLSTATE,
so the server's reason is recognised from its (English) text: a rejected
password, a missing role or database, a refused permission cannot be cured by
waiting (``retryable=False``); anything else (refused, timed out, unresolvable
host, server starting up, too many clients) may pass (``retryable=True``).

While the server is down, psycopg_pool logs a multi-line warning for every
reconnection attempt of every pool; ``_PoolWarnings`` replaces those of runkit's
pools with one line per pool per ``POOL_WARNING_INTERVAL``, counting the rest,
and remembers the last reason so that a pool timeout can name it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from runkit.engine.logs import RateLimitedLog

from ._config import scrub

__all__ = [
    "POOL_WARNING_INTERVAL",
    "ConnectFailed",
    "PoolWatch",
    "connect_reason",
    "discard",
    "probe",
    "using_pool",
]

_log = logging.getLogger("runkit_postgres")

#: Seconds between two "cannot connect" lines of one pool during an outage.
POOL_WARNING_INTERVAL: Final = 10.0
#: Seconds the first connection may take when the URL sets no connect_timeout.
PROBE_TIMEOUT: Final = 10

# Server (and libpq) reasons that waiting cannot cure: SQLSTATE 28P01/28000
# (authentication, pg_hba, role), 3D000 (database), 42501 (CONNECT privilege),
# and a client that has no password or cannot get the TLS it requires.
_PERMANENT: Final = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "does not exist",
    "permission denied",
    "no password supplied",
    "ssl was required",
    "certificate verify failed",
    # A connection parameter libpq refuses (a conninfo given directly, unchecked).
    "invalid integer value",
    'value: "',
)


# The pool a worker thread is using: psycopg_pool logs a lost connection from
# the thread that returns it, without naming the pool. ``discarded`` marks a
# connection the driver closed itself (``discard``), which is no outage.
_THREAD = threading.local()


class ConnectFailed(Exception):
    """The first connection failed; ``reason`` is one line, scrubbed of the password."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def connect_reason(exc: BaseException, conninfo: str) -> str:
    """The reason a connection failed, on one line and without the password."""
    text = str(exc).strip().removeprefix("connection failed:")
    lines = (" ".join(line.split()) for line in text.splitlines())
    return scrub("; ".join(line for line in lines if line), conninfo) or type(exc).__name__


def probe(conninfo: str) -> None:
    """Open and close one connection, or raise ``ConnectFailed`` with the server's reason.

    Run in a worker thread before the pool is created, so that a fault in the
    configuration fails the first call at once instead of after the pool's
    timeout, with the reason libpq gave instead of a generic one.
    """
    params = conninfo_to_dict(conninfo)
    timeout = {} if "connect_timeout" in params else {"connect_timeout": PROBE_TIMEOUT}
    try:
        psycopg.connect(conninfo, autocommit=True, **timeout).close()  # type: ignore[arg-type]
    except psycopg.Error as exc:
        reason = connect_reason(exc, conninfo)
        lowered = reason.lower()
        permanent = any(p in lowered for p in _PERMANENT)
        raise ConnectFailed(reason, retryable=not permanent) from None


class PoolWatch:
    """What the warning filter knows of one of runkit's pools."""

    def __init__(self, name: str, display: str, conninfo: str) -> None:
        self.name = name
        self.display = display
        self.conninfo = conninfo
        #: The reason of the pool's last failed connection attempt, until one succeeds.
        self.last_error: str | None = None

    def register(self) -> None:
        """Route the pool's connection warnings through the rate-limited log."""
        _WARNINGS.watch(self)

    def recovered(self) -> None:
        """Called once an operation succeeded after connection failures."""
        if self.last_error is not None:
            self.last_error = None
            suppressed = _WARNINGS.limited.reset(self.name)
            _log.info(
                "connected to %r again (%d more failed attempts since the last warning)",
                self.display,
                suppressed,
            )


def discard(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Close *conn*, borrowed from a pool, so that the pool replaces it when it is returned.

    Call it inside ``using_pool``: the pool's "discarding closed connection"
    warning for it is then dropped, since nothing was lost.
    """
    _THREAD.discarded = True
    conn.close()


class using_pool:  # noqa: N801 - used like a function: ``with using_pool(watch):``
    """Mark the current worker thread as using *watch*'s pool for the block."""

    __slots__ = ("_watch",)

    def __init__(self, watch: PoolWatch) -> None:
        self._watch = watch

    def __enter__(self) -> None:
        _THREAD.watch = self._watch
        _THREAD.discarded = False

    def __exit__(self, *exc: object) -> None:
        _THREAD.watch = None
        _THREAD.discarded = False


class _PoolWarnings(logging.Filter):
    """A filter on the ``psycopg.pool`` logger for the connection warnings of our pools."""

    _TEMPLATES: Final = frozenset(
        {
            "error connecting in %r: %s",
            "reconnection attempt in pool %r failed after %s sec",
        }
    )
    _LOST: Final = frozenset(
        {"discarding closed connection: %s", "discarding broken connection: %s"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.limited = RateLimitedLog(_log, POOL_WARNING_INTERVAL)
        self._pools: weakref.WeakValueDictionary[str, PoolWatch] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._installed = False

    def watch(self, pool: PoolWatch) -> None:
        with self._lock:
            self._pools[pool.name] = pool
            if not self._installed:
                logging.getLogger("psycopg.pool").addFilter(self)
                self._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.msg in self._LOST:
            watch: PoolWatch | None = getattr(_THREAD, "watch", None)
            if watch is None:
                return True
            if _THREAD.discarded:
                _THREAD.discarded = False
                _log.debug("replaced a connection closed on purpose in %r", watch.display)
                return False
            self.limited.warning(
                (watch.name, "lost"),
                "lost a connection to %r (closed by the server or the network); replacing it",
                watch.display,
            )
            return False
        if record.msg not in self._TEMPLATES or not isinstance(args, tuple) or not args:
            return True
        pool = self._pools.get(str(args[0]))
        if pool is None:
            return True  # not one of ours
        if record.msg.startswith("error connecting"):
            cause = args[1] if len(args) > 1 else ""
            reason = (
                connect_reason(cause, pool.conninfo)
                if isinstance(cause, BaseException)
                else str(cause)
            )
            pool.last_error = reason
            self.limited.warning(
                pool.name,
                "cannot connect to %r (the pool keeps trying): %s",
                pool.display,
                reason,
            )
        else:
            # The pool gives up on an attempt after a few seconds on purpose
            # and starts a fresh one at once (``_executor._reconnect_now``):
            # the outage goes on, nothing more.
            self.limited.warning(
                pool.name,
                "cannot connect to %r (the pool keeps trying): %s",
                pool.display,
                pool.last_error or "the server does not answer",
            )
        return False


_WARNINGS: Final = _PoolWarnings()
