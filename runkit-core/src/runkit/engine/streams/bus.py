"""The in-process event bus: ``EventBus``, its notes, ``UniqueEvents``, ``Widen``.

Durable stream events are published on the bus by correlation ID, for observers
of ``execute_command`` on this node and for peers that observe chains remotely.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager, contextmanager

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .records import StreamEvent

__all__ = [
    "RECENT_EVENTS",
    "RECENT_SECONDS",
    "CommandDone",
    "EventBus",
    "Observed",
    "Stopped",
    "UniqueEvents",
    "Widen",
    "end_subscriptions",
    "fed_subscription",
]


@attrs.frozen
class CommandDone:
    """A note on the ``EventBus``: a command of a chain is done on its owner.

    ``conclusive`` says that every event the command recorded was published on
    the bus before this note (handled just now, or re-delivered), so a
    subscriber that saw none knows it recorded none. A repeated command whose
    original events cannot be re-delivered is done but not conclusive.
    """

    correlation_id: str
    command_id: str
    conclusive: bool


@attrs.frozen
class Stopped(CommandDone):
    """A note a stopping gateway delivers to its open subscriptions: nothing more comes.

    A caller waiting on the subscription raises ``error()``. It is a
    ``CommandDone`` of no command, so whatever passes notes on (a peer's
    observe stream, an offer's answer) needs no case for it: no caller waits
    for that command. Ending subscriptions this way costs a call nothing
    until the gateway stops.
    """

    error: Callable[[], Exception] = attrs.field(kw_only=True)


def end_subscriptions(
    sends: Iterable[MemoryObjectSendStream[Observed]], error: Callable[[], Exception]
) -> None:
    """Deliver a ``Stopped`` note carrying *error* into each of *sends*."""
    note = Stopped("", "", False, error=error)
    for send in sends:
        # A subscription being left may have closed its stream already.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(note)


#: What a subscription yields.
Observed = StreamEvent | CommandDone


class UniqueEvents:
    """A subscription's events, each stream event (stream ID, offset) at most once.

    The bus may publish an event again (a repeated command's original events are
    redelivered for observers that joined later), and a subscription fed by the
    bus and the peers gets the same event from several sources; a subscriber
    that has already seen it must not see it twice. Notes pass through.
    """

    def __init__(self, receive: AsyncIterator[Observed]) -> None:
        self._receive = receive
        self._seen: set[tuple[str, int]] = set()

    def __aiter__(self) -> UniqueEvents:
        return self

    def pending(self) -> int:
        """Events received from a memory stream and not yet taken (some may be repeats)."""
        if isinstance(self._receive, MemoryObjectReceiveStream):
            return self._receive.statistics().current_buffer_used
        return 0

    def drain(self) -> list[Observed]:
        """Take what has been received and not yet taken, without waiting."""
        if not isinstance(self._receive, MemoryObjectReceiveStream):
            return []
        taken: list[Observed] = []
        while True:
            try:
                event = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return taken
            if self._first(event):
                taken.append(event)

    async def __anext__(self) -> Observed:
        while True:
            event = await self._receive.__anext__()
            if self._first(event):
                return event

    def _first(self, event: Observed) -> bool:
        # Notes always pass; a stream event only the first time it is seen.
        if isinstance(event, CommandDone):
            return True
        key = (event.stream_id, event.offset)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


#: Something that delivers a chain's items into a stream while inside: the
#: bus (``EventBus.attached``) or the peers (``Router.observation``).
Source = Callable[[MemoryObjectSendStream[Observed]], AbstractContextManager[None]]


@asynccontextmanager
async def fed_subscription(*sources: Source) -> AsyncIterator[UniqueEvents]:
    """One stream that every source delivers into while inside; each event once.

    The sources are entered in order and left in reverse, before the stream
    closes, so none delivers into a closed stream.
    """
    send, receive = anyio.create_memory_object_stream[Observed](math.inf)
    with send, receive, ExitStack() as stack:
        for source in sources:
            stack.enter_context(source(send))
        yield UniqueEvents(receive)


class Widen:
    """A one-way signal: a chain's subscription should now cover every node it may reach.

    The executor sets it once the command's done note shows that processes may
    carry the chain on (or the command went to an inbox); the router opens its
    peer streams from the callbacks, at once and without a task per call.
    """

    __slots__ = ("_callbacks", "_set")

    def __init__(self) -> None:
        self._set = False
        self._callbacks: list[Callable[[], object]] = []

    def set(self) -> None:
        """Set the signal (again: no effect) and run the callbacks registered so far."""
        if self._set:
            return
        self._set = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        """Whether ``set`` has been called."""
        return self._set

    def on_set(self, callback: Callable[[], object]) -> None:
        """Run *callback* when the signal is set (now, if it already is)."""
        if self._set:
            callback()
        else:
            self._callbacks.append(callback)


#: Events and notes a node keeps after publishing them, for subscriptions that
#: start late (``subscribe(replay=True)``): a peer that subscribes after a
#: reconnect, or to a node that has just taken a partition over, still gets
#: what the chain recorded meanwhile. Bounded by count and by age.
RECENT_EVENTS = 10_000
RECENT_SECONDS = 60.0


class EventBus:
    """In-process fan-out of published events to subscribers, by correlation ID.

    The bus also keeps the most recent events and notes (``RECENT_EVENTS``,
    for at most ``RECENT_SECONDS``), so that a subscription made with
    ``replay=True`` starts with what its chain already published here.
    """

    def __init__(
        self,
        *,
        recent_events: int = RECENT_EVENTS,
        recent_seconds: float = RECENT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._subscribers: dict[str, set[MemoryObjectSendStream[Observed]]] = {}
        self._recent: dict[str, deque[Observed]] = {}
        # (when, correlation ID) per kept item, oldest first: the oldest entry
        # for an ID is always the head of that ID's deque.
        self._order: deque[tuple[float, str]] = deque()
        self._recent_events = recent_events
        self._recent_seconds = recent_seconds
        self._clock = clock

    @asynccontextmanager
    async def subscribe(
        self, correlation_id: str, *, replay: bool = False
    ) -> AsyncIterator[AsyncIterator[Observed]]:
        """Receive every event published after this call whose correlation ID matches.

        With *replay*, the subscription first receives the chain's events and
        notes this bus still keeps, in the order they were published. Each
        stream event is delivered once per subscription, even if published again.
        """
        # What fed_subscription does for one source, without its exit stack and
        # second generator (cluster.lone does the same for a lone node's calls).
        send, receive = anyio.create_memory_object_stream[Observed](math.inf)
        with send, receive, self.attached(correlation_id, send, replay=replay):
            yield UniqueEvents(receive)

    @contextmanager
    def attached(
        self, correlation_id: str, send: MemoryObjectSendStream[Observed], *, replay: bool = False
    ) -> Iterator[None]:
        """Deliver the chain's events (as ``subscribe`` does) into *send* while inside.

        For a subscription that also takes a peer's events into the same
        stream; the caller owns *send* and closes it after leaving.
        """
        subscribers = self._subscribers.setdefault(correlation_id, set())
        subscribers.add(send)
        if replay:
            self._expire(self._clock())
            for item in self._recent.get(correlation_id, ()):
                send.send_nowait(item)
        try:
            yield
        finally:
            subscribers.discard(send)
            if not subscribers:
                self._subscribers.pop(correlation_id, None)

    def end(self, error: Callable[[], Exception]) -> None:
        """Tell every subscriber that nothing more will be published (``Stopped``)."""
        end_subscriptions([s for sends in self._subscribers.values() for s in sends], error)

    def has_subscribers(self, correlation_id: str) -> bool:
        """Whether anyone is subscribed to *correlation_id* now."""
        return correlation_id in self._subscribers

    def publish(self, events: Iterable[StreamEvent]) -> None:
        """Deliver *events* to the matching subscribers (never blocks), and keep them."""
        for event in events:
            self._deliver(event.envelope.correlation_id, event)

    def note(self, note: CommandDone) -> None:
        """Deliver a chain note to the subscribers of its correlation ID, and keep it."""
        self._deliver(note.correlation_id, note)

    def _deliver(self, correlation_id: str, item: Observed) -> None:
        now = self._clock()
        kept = self._recent.get(correlation_id)
        if kept is None:
            kept = self._recent[correlation_id] = deque()
        kept.append(item)
        self._order.append((now, correlation_id))
        self._expire(now)
        for send in self._subscribers.get(correlation_id, ()):
            send.send_nowait(item)

    def _expire(self, now: float) -> None:
        order, recent = self._order, self._recent
        while order and (
            len(order) > self._recent_events or now - order[0][0] > self._recent_seconds
        ):
            _, correlation_id = order.popleft()
            kept = recent[correlation_id]
            kept.popleft()
            if not kept:
                del recent[correlation_id]
