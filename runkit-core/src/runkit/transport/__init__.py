"""Node-to-node transport: framed RPC over mutual TLS on anyio streams.

Independent of the engine (which builds on it). See ``docs/adr/0005-node-transport.md``.
"""

from ._errors import CallTimeout as CallTimeout
from ._errors import PeerUnavailable as PeerUnavailable
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteError as RemoteError
from ._errors import TransportError as TransportError
from ._peer import PeerInfo as PeerInfo
from ._server import DeferredHandler as DeferredHandler
from ._server import Reply as Reply
from ._server import StreamHandler as StreamHandler
from ._server import UnaryHandler as UnaryHandler
from ._tls import TlsIdentity as TlsIdentity
from ._tls import certificate_fingerprint as certificate_fingerprint
from ._transport import NodeTransport as NodeTransport

__all__ = [
    "CallTimeout",
    "DeferredHandler",
    "NodeTransport",
    "PeerInfo",
    "PeerUnavailable",
    "ProtocolError",
    "RemoteError",
    "Reply",
    "StreamHandler",
    "TlsIdentity",
    "TransportError",
    "UnaryHandler",
    "certificate_fingerprint",
]
