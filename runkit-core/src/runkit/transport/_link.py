"""One framed connection: a coalescing writer, a reader and keepalive.

Shared by both ends. The owner supplies a ``dispatch`` callback for the frames
that carry requests and answers; ``Ping``, ``Pong`` and ``Goodbye`` are handled
here. Any failure closes only this connection.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from collections.abc import Callable

import anyio
import anyio.abc
import anyio.lowlevel

from ._errors import ProtocolError
from ._frames import Frame, FrameDecoder, Goodbye, Ping, Pong, encode_frame

__all__ = ["Link", "LinkClosed"]

_log = logging.getLogger("runkit.transport")

# Frames per queued batch the writer sends in one TLS write (why: one write per
# frame costs ~60x the throughput of a batch, rpc.md section 4.5).
_MAX_BATCH_BYTES = 256 * 1024
_QUEUE_FRAMES = 1024
# Bytes the outgoing queue may hold (the batch being written included). The
# frame bound alone let a peer that reads slowly make a node hold 1,024 frames
# of up to the frame size limit (4 GiB at the default 4 MiB); this keeps it to
# two default-size frames, enough to keep a fast link busy. An empty queue
# always takes one frame, so a frame of any allowed size can still be sent.
_QUEUE_BYTES = 8 * 1024 * 1024
# Frames the reader's path queues without waiting (pongs, cancels, refusals) are
# this small; they count against the frame bound only, so a queue that is full
# of bytes (a peer reading a large stream slowly) does not close the connection
# for a pong. The frame bound still catches a peer that never reads.
_CONTROL_BYTES = 4 * 1024
_CLOSE_GRACE = 1.0
# The largest frame a sender writes itself on an idle link. Such a frame fits
# the transport's buffer (asyncio pauses writing at 64 KiB), so its write waits
# only while the peer is not reading; a larger frame's transfer time dwarfs the
# loop turn an inline write saves, and it goes through the queue.
_INLINE_BYTES = 64 * 1024


class LinkClosed(Exception):
    """The link is closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Link:
    """A framed, kept-alive connection over an established (TLS) byte stream.

    Outgoing frames go through one queue drained by a single writer task,
    which coalesces whatever is queued into one write. The queue is bounded
    both in frames and in bytes (an empty queue takes a frame of any size):
    ``send`` waits for room, in turn. Frames sent from the reader's path
    (``send_nowait``) never wait: if the queue is full the peer is not reading
    what we send while still sending to us, and the connection is closed.

    ``send(frame, inline=True)`` (a request) writes a small frame from the
    sender's own task when nothing is queued or being written, which saves
    the writer task's turn of the event loop (one loop iteration, about a
    millisecond on a busy node) on every idle-link request. Whatever is sent
    meanwhile queues behind it, so order and coalescing under load are kept.
    The sender's cancellation does not cut that write short (the TLS stream
    would be unreadable after it): the sender leaves once its frame is
    written, and a peer that reads none of it for two keepalive intervals
    has the link closed.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        label: str,
        max_frame_size: int,
        keepalive_interval: float,
        decoder: FrameDecoder,
    ) -> None:
        self.label = label
        self.max_frame_size = max_frame_size
        self._stream = stream
        self._decoder = decoder
        self._interval = keepalive_interval
        # How long an inline write may wait for the peer to read (see _write_inline).
        self._patience = 2 * keepalive_interval
        self._tx, self._rx = anyio.create_memory_object_stream[bytes](_QUEUE_FRAMES)
        self._queued_bytes = 0  # in the queue or in the writer's batch
        self._waiting: deque[_Waiter] = deque()  # senders waiting for room, in turn
        self._reason: str | None = None
        self._goodbye = False
        self._service: anyio.CancelScope | None = None
        self._writer_done = anyio.Event()
        self._inline: anyio.Event | None = None  # set while a sender writes its frame itself
        self._last_received = anyio.current_time()

    @property
    def closed(self) -> bool:
        """Whether the link is closing or closed (no new requests should use it)."""
        return self._reason is not None

    @property
    def reason(self) -> str:
        """Why the link closed (empty while open)."""
        return self._reason or ""

    def encode(self, frame: Frame) -> bytes:
        """Encode *frame* for this link. :raises ProtocolError: if over the size limit."""
        return encode_frame(frame, self.max_frame_size)

    async def send(self, frame: Frame, *, inline: bool = False) -> None:
        """Queue *frame*, waiting for room; with *inline*, write it now if the link is idle.

        *inline* suits a lone frame that someone waits on (a request); a
        producer of many frames (a stream) leaves it off, so that its frames
        are coalesced into few writes. A frame over 64 KiB is queued anyway.

        :raises ProtocolError: if the frame exceeds the size limit (link stays open).
        :raises LinkClosed: if the link is closed.
        """
        data = self.encode(frame)
        if self._reason is not None:
            raise LinkClosed(self._reason)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            # Idle: nothing queued or being written (an inline write counts as queued).
            if (
                inline
                and not self._queued_bytes
                and not self._waiting
                and len(data) <= _INLINE_BYTES
            ):
                await self._write_inline(data)
            # Not yielding here lets a producer queue several frames before the
            # writer runs, so they leave in one TLS write (a stream: ~3x the items/s).
            elif self._waiting or not self._put(data):
                await self._put_in_turn(data)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise LinkClosed(self.reason or "connection closed") from None

    async def _write_inline(self, data: bytes) -> None:
        """Write *data* from the sender's task; frames sent meanwhile queue behind it."""
        done = self._inline = anyio.Event()
        self._queued_bytes += len(data)  # the link is busy: others queue
        patience = self._patience
        deadline = anyio.current_time() + patience if math.isfinite(patience) else math.inf
        try:
            # Shielded: TLS takes the whole record when the write starts, and a
            # write cut short leaves the peer unable to read anything after it,
            # which would fail every call on the link for one caller's timeout.
            # The write waits only while the peer is not reading.
            with anyio.CancelScope(shield=True, deadline=deadline) as scope:
                await self._stream.send(data)
            if scope.cancelled_caught:
                self.close(f"the peer read nothing of a frame for {patience:g} s", goodbye=False)
                raise LinkClosed(self.reason)
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            self.close(f"connection lost while sending: {exc!r}", goodbye=False)
            raise LinkClosed(self.reason) from None
        finally:
            self._queued_bytes -= len(data)
            self._inline = None
            done.set()
            self._admit()

    def send_nowait(self, frame: Frame) -> bool:
        """Queue *frame* if there is room; return whether it was queued.

        A small frame (a control frame) needs room in the frame bound only.
        """
        return self._reason is None and self._enqueue(frame)

    def _enqueue(self, frame: Frame, *, bounded: bool = True) -> bool:
        try:
            data = self.encode(frame)
            return self._put(data, bounded=bounded and len(data) > _CONTROL_BYTES)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False

    def _put(self, data: bytes, *, bounded: bool = True) -> bool:
        """Queue *data* if there is room; return whether it was queued.

        :raises anyio.ClosedResourceError: if the queue is closed.
        """
        if bounded and self._queued_bytes and self._queued_bytes + len(data) > _QUEUE_BYTES:
            return False
        try:
            self._tx.send_nowait(data)
        except anyio.WouldBlock:
            return False
        self._queued_bytes += len(data)
        return True

    async def _put_in_turn(self, data: bytes) -> None:
        """Wait until the writer queues *data* (after the senders waiting before it)."""
        waiter = _Waiter(data)
        self._waiting.append(waiter)
        try:
            await waiter.done.wait()
        except BaseException:
            # Cancelled once queued, the frame still goes (as with a memory stream).
            if not waiter.done.is_set():
                self._waiting.remove(waiter)
                self._admit()  # those behind it may fit
            raise
        if not waiter.queued:
            raise anyio.ClosedResourceError

    def _admit(self) -> None:
        """Queue the waiting senders' frames, in turn, while there is room."""
        while self._waiting:
            waiter = self._waiting[0]
            try:
                if not self._put(waiter.data):
                    return
                waiter.queued = True
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the link is closing: it fails with LinkClosed
            self._waiting.popleft()
            waiter.done.set()

    def _release_waiters(self) -> None:
        """Fail the senders still waiting for room: the queue is closed."""
        while self._waiting:
            self._waiting.popleft().done.set()

    def close(self, reason: str, *, goodbye: bool = True) -> None:
        """Start closing: stop reading, flush the queue (with a ``Goodbye``), then close."""
        if self._reason is None:
            self._reason = reason
            self._goodbye = goodbye
        if self._service is not None:
            self._service.cancel()

    async def run(self, dispatch: Callable[[Frame], None]) -> str:
        """Read and dispatch frames until the link closes; return the reason.

        *dispatch* may raise ``ProtocolError`` to close the link.
        """
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_loop)
                async with anyio.create_task_group() as service:
                    self._service = service.cancel_scope
                    if self._reason is not None:
                        service.cancel_scope.cancel()
                    service.start_soon(self._keepalive)
                    service.start_soon(self._read_loop, dispatch)
                if self._goodbye:
                    # Over the byte bound if need be: it is small and the last one.
                    self._enqueue(Goodbye(reason=self.reason[:1000]), bounded=False)
                self._tx.close()
                self._release_waiters()
                with anyio.move_on_after(_CLOSE_GRACE):
                    await self._writer_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tx.close()
            self._rx.close()
            self._release_waiters()
            await anyio.aclose_forcefully(self._stream)
        return self.reason

    async def _read_loop(self, dispatch: Callable[[Frame], None]) -> None:
        reason, goodbye = "the peer closed the connection", False
        try:
            while True:
                chunk = await self._stream.receive()
                self._last_received = anyio.current_time()
                for frame in self._decoder.feed(chunk):
                    if isinstance(frame, Goodbye):
                        reason = f"the peer said goodbye: {frame.reason}"
                        return
                    self._handle(frame, dispatch)
        except anyio.EndOfStream:
            pass
        except anyio.get_cancelled_exc_class():
            reason = "connection closed"
            raise
        except ProtocolError as exc:
            reason, goodbye = f"protocol error: {exc.reason}", True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        except Exception as exc:
            _log.exception("bug while reading from %s; closing the connection", self.label)
            reason, goodbye = f"internal error: {exc!r}", True
        finally:
            self.close(reason, goodbye=goodbye)

    def _handle(self, frame: Frame, dispatch: Callable[[Frame], None]) -> None:
        if isinstance(frame, Ping):
            if not self.send_nowait(Pong()):
                raise ProtocolError("the peer sends faster than it reads")
        elif not isinstance(frame, Pong):
            dispatch(frame)

    async def _write_loop(self) -> None:
        try:
            async for data in self._rx:
                parts, size = [data], len(data)
                while size < _MAX_BATCH_BYTES:
                    try:
                        more = self._rx.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    parts.append(more)
                    size += len(more)
                if self._inline is not None:  # a sender is writing its frame: after it
                    await self._inline.wait()
                await self._stream.send(parts[0] if len(parts) == 1 else b"".join(parts))
                self._queued_bytes -= size
                self._admit()
        except (
            # A TLS stream raises EndOfStream on a write once the peer has closed its
            # session (a peer node shutting down): the connection is gone, as for the others.
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            ssl.SSLError,
            OSError,
        ) as exc:
            self.close(f"connection lost while sending: {exc!r}", goodbye=False)
        finally:
            self._writer_done.set()

    async def _keepalive(self) -> None:
        if not math.isfinite(self._interval):
            return
        while True:
            await anyio.sleep(self._interval / 4)
            idle = anyio.current_time() - self._last_received
            if idle >= 2 * self._interval:
                self.close(f"keepalive: nothing received from the peer for {idle:.1f} s")
                return
            if idle >= self._interval:
                self.send_nowait(Ping())


class _Waiter:
    """A sender waiting for room in the queue; ``done`` once queued or refused."""

    __slots__ = ("data", "done", "queued")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = anyio.Event()
        self.queued = False
