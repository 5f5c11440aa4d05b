"""Errors raised by persistence providers.

Hierarchy::

    PersistenceError                 base; carries ``retryable`` and ``ambiguous``
    ├── Conflict                     an optimistic-concurrency condition failed
    ├── RecordNotFound (LookupError) a journal position is not live
    ├── LimitExceeded (ValueError)   an input is over a declared provider limit
    └── StoreUnavailable             the backend is unreachable, refuses us, or lacks the store

``retryable`` means the same call may succeed if made again (a transient backend
fault). ``ambiguous`` means a write may or may not have taken effect (for example
the response was lost): drivers never retry such writes silently, and callers
recover by reading back (a retried append then typically raises ``Conflict``).
"""

from __future__ import annotations

__all__ = ["Conflict", "LimitExceeded", "PersistenceError", "RecordNotFound", "StoreUnavailable"]


class PersistenceError(Exception):
    """Base class of every error a persistence provider raises."""

    def __init__(self, message: str, *, retryable: bool = False, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous


class Conflict(PersistenceError):
    """An optimistic-concurrency condition failed; nothing was changed.

    Raised by ``Journal.append`` when the position is not the journal's end
    (``position`` is set), and by ``Keyspace.set`` when the supplied revision is
    not the key's current revision (``key`` and ``revision`` are set; ``revision``
    is the *supplied* one).
    """

    def __init__(
        self,
        store: str,
        name: str,
        *,
        position: int | None = None,
        key: bytes | None = None,
        revision: str | None = None,
    ) -> None:
        if position is not None:
            message = f"{store} {name!r}: conflict appending at position {position}"
        else:
            message = (
                f"{store} {name!r}: conflict setting key {key!r} "
                f"at revision {revision!r} (not the key's current revision)"
            )
        super().__init__(message)
        self.store = store
        self.name = name
        self.position = position
        self.key = key
        self.revision = revision

    @classmethod
    def journal(cls, name: str, position: int) -> Conflict:
        """A conflicting append at *position* of journal *name*."""
        return cls("journal", name, position=position)

    @classmethod
    def keyspace(cls, name: str, key: bytes, revision: str) -> Conflict:
        """A conflicting set of *key* in keyspace *name* with the supplied *revision*."""
        return cls("keyspace", name, key=bytes(key), revision=revision)


class RecordNotFound(PersistenceError, LookupError):
    """A journal position was never written, or has been truncated."""

    def __init__(self, name: str, position: int) -> None:
        super().__init__(f"journal {name!r}: no record at position {position}")
        self.name = name
        self.position = position


class LimitExceeded(PersistenceError, ValueError):
    """An input is larger than the provider's declared limit.

    Raised before any I/O, so nothing was changed.
    """

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes, over this provider's limit of {limit} bytes")
        self.what = what
        self.size = size
        self.limit = limit


class StoreUnavailable(PersistenceError):
    """The backend cannot be used: unreachable, refusing this client, or lacking the store.

    Raised by a provider that cannot connect, and by a read-only provider (see
    ``Provider.set_read_only``) whose backend resources do not exist.
    ``retryable`` tells an outage (the server is down or unreachable; it may
    come back) from a fault that waiting cannot cure (authentication failed,
    the database or schema does not exist, permission denied): the engine
    retries the first at start-up and fails at once on the second. The
    message carries the backend's own reason, never a password.
    """
