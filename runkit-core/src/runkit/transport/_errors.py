"""Errors raised by the node transport."""

from __future__ import annotations

__all__ = ["CallTimeout", "PeerUnavailable", "ProtocolError", "RemoteError", "TransportError"]


class TransportError(Exception):
    """Base class of every error the node transport raises to a caller."""


class PeerUnavailable(TransportError):
    """Raised by a call when the peer cannot be reached, refuses us, or drops the connection.

    ``address`` is the peer address that was called and ``reason`` says what happened
    (connection refused, certificate not accepted, connection lost, ...);
    ``untrusted`` is true when a certificate was not trusted in the TLS handshake. The call
    may or may not have run on the peer when the connection broke mid-call.
    """

    def __init__(self, address: str, reason: str, *, untrusted: bool = False) -> None:
        self.address = address
        self.reason = reason
        #: The TLS handshake failed because one side did not trust the other's
        #: certificate: a configuration fault (see ``reason``), not an outage.
        self.untrusted = untrusted
        super().__init__(f"peer {address} is unavailable: {reason}")


class CallTimeout(TransportError):
    """Raised by a call that got no answer within its timeout.

    The request is cancelled on the peer (best effort) and the connection stays
    open for other calls.
    """

    def __init__(self, address: str, method: str, timeout: float) -> None:
        self.address = address
        self.method = method
        self.timeout = timeout
        super().__init__(f"call {method!r} to {address} timed out after {timeout:g} s")


class RemoteError(TransportError):
    """Raised by a call whose handler failed on the peer.

    ``code`` is a short machine-readable word (``unknown_method``,
    ``handler_error``, ``overloaded``, ``response_too_large`` or one chosen by a
    handler that raised ``RemoteError`` itself); ``message`` is the peer's
    one-line description. The peer logs the traceback; it is never sent.
    Handlers may raise it to answer with a chosen code.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ProtocolError(TransportError):
    """Raised when bytes on a connection do not follow the wire protocol.

    The connection it happened on is closed; ``reason`` is the logged cause.
    Also raised to a caller whose own request cannot be encoded within the
    frame size limit (then nothing is closed).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
