"""The methods a node serves its peers and clients over the node transport.

- ``offer``: an ``Offer`` of commands for one partition. The node accepts only
  if it runs that partition now; the commands join its next batch and the
  answer comes once they are durable (``ok``), else ``not_owner`` (or, if the
  partition stopped with them in a stream append it could not confirm, or
  with some of them committed, an ``OfferAnswer`` naming that append and the
  commands not committed; or, for a caller's commands that found no room in
  the partition's backlog within the offer's ``room_wait``, an ``OfferAnswer``
  saying it is busy). With
  ``reply_events`` the answer is an ``OfferAnswer`` carrying what the
  commands' chains published meanwhile: their events and done notes. Served
  as a deferred transport method: the batch's commit answers it.
- ``wake``: a ``Wake`` for one partition: something was appended to its inbox
  or deadline journal by another node; read it now rather than at the next poll.
- ``observe``: a stream of the events recorded on this node whose correlation
  ID is the one asked for (``WireEvents`` batches), until the caller leaves.

The calling side is ``routing.Router``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack
from typing import Any

import anyio

from ...transport import DeferredHandler, PeerInfo, Reply
from ..commands.acceptance import PartitionBusy, PartitionStopped
from ..commands.inbox import InboxEntry
from ..streams import Observed, UniqueEvents
from .wire import (
    ANSWER_BYTES,
    NOT_OWNER,
    OBSERVE_BATCH,
    OK,
    OfferAnswer,
    WireDone,
    WireEvent,
    decode_request,
    encoder,
    observe_decoder,
    offer_decoder,
    to_wire,
    wake_decoder,
)

__all__ = ["ClusterServer"]


class ClusterServer:
    """The methods a node serves to its peers (see the module docstring)."""

    def __init__(
        self,
        *,
        offer_local: Callable[
            [
                str,
                int,
                Sequence[InboxEntry],
                Callable[[bool | BaseException], None],
                float | None,
            ],
            None,
        ],
        wake_local: Callable[[str, int, str], None],
        subscribe_local: Callable[..., AbstractAsyncContextManager[Any]],
        attach_local: Callable[..., AbstractContextManager[None]],
    ) -> None:
        self._offer_local = offer_local
        self._wake_local = wake_local
        self._subscribe_local = subscribe_local
        self._attach_local = attach_local

    @property
    def unary(self) -> dict[str, Callable[[PeerInfo, bytes], Awaitable[bytes]]]:
        """The unary methods, for ``NodeTransport``."""
        return {"wake": self._wake}

    @property
    def deferred(self) -> dict[str, DeferredHandler]:
        """The methods answered without a task per request, for ``NodeTransport``.

        An offer waits only for the partition's batch, which runs anyway: the
        batch's commit answers it (no task, no cancel scope per offer, and one
        hop fewer between the partition's commit and the answer).
        """
        return {"offer": self._offer}

    @property
    def streams(self) -> dict[str, Callable[[PeerInfo, bytes], AsyncIterator[bytes]]]:
        """The stream methods, for ``NodeTransport``."""
        return {"observe": self._observe}

    def _offer(self, peer: PeerInfo, payload: bytes, reply: Reply) -> None:
        offer = decode_request(offer_decoder, payload)
        attached = ExitStack()
        receive = None
        if offer.reply_events:
            # Attached before the commands join a batch: the owner publishes a
            # command's events and its done note before it settles the command,
            # so once they are durable everything is in this stream already.
            # With what the chains published here recently, as an observe
            # stream would start (a repeated command's original events among them).
            send, receive = anyio.create_memory_object_stream[Observed](math.inf)
            attached.callback(receive.close)
            attached.callback(send.close)
            for chain in dict.fromkeys(e.envelope.correlation_id for e in offer.entries):
                attached.enter_context(self._attach_local(chain, send, replay=True))
            reply.on_cancel = attached.close

        def answer(result: bool | BaseException) -> None:
            if reply.done:
                return  # the caller left (or the connection closed): detached already
            try:
                events = () if receive is None else UniqueEvents(receive).drain()
                wired = tuple(to_wire(e) for e in events)
            finally:
                attached.close()
            if isinstance(result, PartitionBusy):
                busy = OfferAnswer(accepted=False, busy=(result.backlog or 0, result.limit or 0))
                reply.ok(encoder.encode(busy))
            elif isinstance(result, PartitionStopped):
                # Stopped with the commands in an unconfirmed append, or
                # with some of them committed: the gateway spills the others,
                # saying where they may be committed.
                stopped = None if result.commands is None else tuple(sorted(result.commands))
                answer = OfferAnswer(
                    accepted=False, unconfirmed=result.unconfirmed, stopped=stopped
                )
                reply.ok(encoder.encode(answer))
            elif isinstance(result, Exception):
                reply.fail(result)
            elif receive is None:
                reply.ok(OK if result is True else NOT_OWNER)
            elif result is not True:
                reply.ok(encoder.encode(OfferAnswer(accepted=False)))
            else:
                reply.ok(_answer_with(wired))

        try:
            self._offer_local(
                offer.app_key, offer.partition, offer.entries, answer, offer.room_wait
            )
        except BaseException:
            attached.close()
            raise

    async def _wake(self, peer: PeerInfo, payload: bytes) -> bytes:
        wake = decode_request(wake_decoder, payload)
        self._wake_local(wake.app_key, wake.partition, wake.what)
        return OK

    async def _observe(self, peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
        request = decode_request(observe_decoder, payload)
        subscription: Any = self._subscribe_local(request.correlation_id, replay=True)
        async with subscription as events:
            batch: list[WireEvent | WireDone] = []
            async for event in events:
                batch.append(to_wire(event))
                # Send what has arrived; wait for more only when nothing is pending.
                if len(batch) >= OBSERVE_BATCH or not _pending(events):
                    yield encoder.encode(tuple(batch))
                    batch = []


def _answer_with(events: tuple[WireEvent | WireDone, ...]) -> bytes:
    """An accepted offer's answer: with its chains' events if they fit, else without."""
    if len(events) <= OBSERVE_BATCH:
        answer = encoder.encode(OfferAnswer(accepted=True, events=events))
        if len(answer) <= ANSWER_BYTES:
            return answer
    return encoder.encode(OfferAnswer(accepted=True))


def _pending(events: object) -> bool:
    pending = getattr(events, "pending", None)
    return bool(pending()) if callable(pending) else False
