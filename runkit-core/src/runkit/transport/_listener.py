"""The accept loop: one that outlives running out of file descriptors."""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

__all__ = ["accept_forever"]

_log = logging.getLogger("runkit.transport")

# The node is out of a resource for now (a connection flood, a low `ulimit -n`):
# accepting again at once would spin, and giving up would end the node.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# One pending connection went wrong (reset before it was accepted, or a network
# error accept(2) reports for it, which its man page says to treat like EAGAIN):
# skip it. The list trio's listener skips.
_CONNECTION_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)  # ENONET is Linux's alone
)
_RETRY_DELAY = 0.1
_WARNING_INTERVAL = 10.0


async def accept_forever(
    listener: anyio.abc.SocketListener,
    handler: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
    *,
    label: str,
) -> None:
    """Accept connections on *listener* until cancelled, each served by *handler* in a task.

    Unlike ``Listener.serve``, an accept that fails for want of file
    descriptors or memory is retried (with a rate-limited warning).
    """
    warned_at = -math.inf
    failures = 0
    async with anyio.create_task_group() as tg:
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                code = _errno(exc)
                if code in _CONNECTION_ERRNOS:
                    continue
                if code not in _CAPACITY_ERRNOS:
                    raise
                failures += 1
                if anyio.current_time() - warned_at >= _WARNING_INTERVAL:
                    warned_at = anyio.current_time()
                    _log.warning(
                        "cannot accept connections on %s: %s (%s), %d failed accept(s) since "
                        "the last warning; retrying every %g s. If this persists, raise the "
                        "open file limit (ulimit -n) or find what holds the connections",
                        label,
                        errno.errorcode.get(code, str(code)),
                        os.strerror(code),
                        failures,
                        _RETRY_DELAY,
                    )
                    failures = 0
                await anyio.sleep(_RETRY_DELAY)
                continue
            tg.start_soon(handler, stream)


def _errno(exc: BaseException) -> int | None:
    """The errno of *exc*, or of the ``OSError`` trio's backend wraps in ``BrokenResourceError``."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    return cause.errno if cause is not None else None
