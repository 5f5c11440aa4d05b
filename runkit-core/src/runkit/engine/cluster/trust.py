"""Who a member is and whom it trusts: its TLS identity and the peers it accepts.

``make_identity`` gives a node or client its certificate: the operator's files,
or a self-signed one made at start. ``authenticator`` accepts a peer whose
certificate fingerprint a live member published in its heartbeat record, the
trust model without an operator's CA (ADR 0005).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta

import anyio

from ...persistence import Provider
from ...transport import TlsIdentity
from .nodes import NodeRecord, list_nodes

__all__ = ["EXPIRY_WARNING", "authenticator", "make_identity"]

_log = logging.getLogger("runkit.engine.cluster.trust")

#: A certificate that expires sooner than this after start is logged as a warning.
EXPIRY_WARNING = timedelta(days=30)


def make_identity(node_id: str, cert: str | None, key: str | None, ca: str | None) -> TlsIdentity:
    """The node's TLS identity: the operator's files, or a fresh self-signed certificate.

    Logs a warning when the operator's certificate expires within ``EXPIRY_WARNING``:
    peers refuse it from then on.
    """
    if cert is None or key is None:
        return TlsIdentity.self_signed(node_id)
    identity = TlsIdentity.load(cert, key, ca)
    expires = identity.not_valid_after
    left = expires - datetime.now(UTC)
    if left < EXPIRY_WARNING:
        _log.warning(
            "the TLS certificate in %s (%s) expires at %s UTC, in %.1f days: peers refuse "
            "it from then on; renew it and restart this process",
            cert,
            identity.subject,
            f"{expires:%Y-%m-%d %H:%M:%S}",
            left / timedelta(days=1),
        )
    return identity


def authenticator(
    provider: Provider,
    members: Callable[[], Mapping[uuid.UUID, NodeRecord]],
    *,
    refresh_interval: float = 1.0,
) -> Callable[[str], Awaitable[bool]]:
    """Accept a peer whose certificate fingerprint a live member published.

    A fingerprint not in this member's view is looked for in the store's
    heartbeat records (a member that has just joined), read at most once per
    *refresh_interval* (the heartbeat interval) and shared by the handshakes
    waiting meanwhile: a new member is accepted within about an interval of
    its first heartbeat, and strangers' connections, however many, cost at
    most one read per interval.
    """
    lock = anyio.Lock()
    records: list[NodeRecord] = []
    read_at = -math.inf

    async def authenticate(fingerprint: str) -> bool:
        nonlocal records, read_at
        if any(r.tls_fingerprint == fingerprint for r in members().values()):
            return True
        async with lock:
            if anyio.current_time() - read_at >= refresh_interval:
                started = anyio.current_time()
                try:
                    records = await list_nodes(provider)
                except Exception as exc:  # keep the last records; expired ones fail is_live
                    _log.info(
                        "reading the heartbeat records to authenticate a peer failed: %s", exc
                    )
                # Only a read that ended counts: one cancelled with its handshake
                # (timed out) leaves the read to the next handshake.
                read_at = started
        now = datetime.now(UTC)
        return any(r.tls_fingerprint == fingerprint and r.is_live(now) for r in records)

    return authenticate
