"""Store calls of the membership: bounded in time, failures logged once per outage."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import anyio

from ..logs import describe_error

__all__ = ["MEMBERSHIP_LOG", "StoreCalls", "StoreTimeout"]

#: One logger for every part of the membership (operators filter on it).
MEMBERSHIP_LOG = logging.getLogger("runkit.engine.cluster.membership")

_T = TypeVar("_T")


class StoreTimeout(Exception):
    """A store call took longer than the membership allows (its outcome is unknown)."""


class StoreCalls:
    """Runs the heartbeat's store calls with a time bound and reports their failures.

    A failure is logged once (a warning) until the same kind of call, reading
    or writing, succeeds again; the caller logs the recovery when ``recovered``
    says there was an outage.
    """

    def __init__(self, node_id: uuid.UUID, timeout: float) -> None:
        self.timeout = timeout
        self._node_id = node_id
        self._extra = {"node_id": str(node_id)}
        self._failing = {False: False, True: False}  # by "reading"

    async def bounded(self, call: Awaitable[_T]) -> _T:
        """Await *call*, abandoning it after the timeout. :raises StoreTimeout:"""
        with anyio.move_on_after(self.timeout) as scope:
            return await call
        assert scope.cancelled_caught
        raise StoreTimeout(f"a store call took longer than {self.timeout:.1f}s")

    def failed(self, what: str, exc: BaseException, *, reading: bool = False) -> None:
        """Report that the node could not do *what* (logged at the first failure only)."""
        if not self._failing[reading]:
            MEMBERSHIP_LOG.warning(
                "node %s could not %s (will keep trying): %s",
                self._node_id,
                what,
                describe_error(exc),
                extra=self._extra,
            )
        self._failing[reading] = True

    def recovered(self, *, reading: bool = False) -> bool:
        """Note a success; whether it ends an outage (so the caller logs that)."""
        was_failing = self._failing[reading]
        self._failing[reading] = False
        return was_failing
