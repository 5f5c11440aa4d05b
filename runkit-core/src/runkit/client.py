"""``runkit.Client``: execute commands and observe events without running a node.

A client is what a web application, a script or an operator's tool uses to
send commands to a cluster. It reads membership from the store, offers each
command to the node that owns its partition over the node transport (mutual
TLS), falls back to appending to the partition's inbox (and waking the owner)
when no owner answers, and subscribes to a command's events on every node for
observers. It never owns a partition and never runs a handler; it joins the
node set as a *client* member only so that nodes accept its certificate.

::

    async with runkit.Client(
        runkit.with_application(app),
        runkit.with_persistence("postgresql://db/bank"),
    ) as client:
        await client.executor_for(app).execute_command(OpenAccount(...))
"""

from __future__ import annotations

import functools
import importlib
import logging
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from ._errors import ConfigurationError
from .config import ApplicationConfig
from .engine.backoff import backoff
from .engine.cluster.membership import Membership
from .engine.cluster.routing import Router
from .engine.cluster.trust import authenticator, make_identity
from .engine.commands.acceptance import Acceptor
from .engine.commands.inbox import EngineStopped, InboxWriter, inbox_name
from .engine.engine import read_partition_count
from .engine.envelope import register_types
from .engine.events.observers import Subscription
from .engine.executor import Executor
from .engine.partitions import partition_id
from .engine.settings import EngineSettings
from .engine.startup import wait_for_store
from .engine.streams import Widen
from .persistence import Provider, provider_from_url
from .persistence._urls import empty_store_hint
from .transport import NodeTransport

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .engine.cluster.status import ClusterStatus

__all__ = ["Client"]

_log = logging.getLogger("runkit.client")


@attrs.define
class _Making:
    """An application's acceptor, made once for every caller (``Client.acceptor``)."""

    done: anyio.Event = attrs.field(factory=anyio.Event)
    acceptor: Acceptor | None = None
    error: Exception | None = None


class Client:
    """Executes commands of registered applications on a cluster (see the module docstring).

    Takes ``with_application``, ``with_persistence`` (or
    ``with_persistence_provider``), ``with_tls``, ``with_node_id``,
    ``with_heartbeat_interval``, ``with_start_timeout`` and
    ``from_environment()``. Use it as an async context manager;
    ``executor_for(app)`` is a ``dogma.CommandExecutor``.

    Its member ID is random unless ``with_node_id`` is given in code: it never
    takes ``DOGMA_NODE_ID``, so it can run in a node's environment (that is the
    node's ID, and a member with it would collide with the node).
    """

    def __init__(self, *options: object) -> None:
        resolve = importlib.import_module("runkit._options").resolve_options
        settings: EngineSettings = resolve(options, client=True)
        # A client neither listens nor is reached: it calls nodes.
        self.settings = attrs.evolve(settings, listen_address=None, advertise_address=None)
        self._apps = {app.identity.key: app for app in settings.applications}
        for app in settings.applications:
            register_types(app.message_types())
        self._acceptors: dict[str, _Making] = {}
        self._executors: dict[str, Executor] = {}
        self._router: Router | None = None
        self._provider: Provider | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._entered = False
        self._left = False

    async def __aenter__(self) -> Self:
        # A second entry would join membership again under the same node ID
        # (and fail as NodeIdInUse after waiting for the first one to expire).
        if self._entered:
            raise RuntimeError(
                "this runkit.Client is already entered: use one `async with` at a time"
            )
        s = self.settings
        self._left = False
        async with AsyncExitStack() as stack:
            self._entered = True
            stack.callback(setattr, self, "_entered", False)  # left (or failed to enter)
            provider = s.persistence_provider
            if provider is None:
                if s.persistence_url is None:
                    raise ConfigurationError(
                        "no persistence is configured",
                        [
                            "use runkit.with_persistence(url) or set DOGMA_PERSISTENCE_URL "
                            "with runkit.from_environment(): the client reads membership "
                            "from the cluster's store"
                        ],
                    )
                provider = provider_from_url(s.persistence_url)
                stack.push_async_callback(provider.close)
            await wait_for_store(provider, timeout=s.start_timeout)
            identity = make_identity(str(s.node_id), s.tls_cert, s.tls_key, s.tls_ca)
            membership = Membership(
                provider, s, tls_fingerprint=identity.fingerprint, role="client"
            )
            await stack.enter_async_context(membership.joined())
            transport = await stack.enter_async_context(
                NodeTransport(
                    node_id=str(s.node_id),
                    identity=identity,
                    authenticate=authenticator(
                        provider, membership.live_members, refresh_interval=s.heartbeat_interval
                    ),
                )
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            router = Router(
                transport,
                membership.live_members,
                self_id=s.node_id,
                self_is_node=False,
                store=provider,
            )
            router.start(tg)
            self._router, self._provider, self._tg = router, provider, tg
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._left = True
        if self._router is not None:
            # Leaving stops the streams that feed the calls' subscriptions.
            self._router.end(
                functools.partial(
                    EngineStopped, "the client was left before an observer was satisfied"
                )
            )
        self._router = self._tg = self._provider = None  # the provider may be closed below
        self._acceptors.clear()
        if stack is not None:
            await stack.aclose()

    async def _acceptor_for(self, app: ApplicationConfig) -> Acceptor:
        """Open the application's inboxes, once some node has started it.

        Like an engine's executor before ``run()``, the client waits for the
        application to start (its partition count in the store), up to the
        start timeout.
        """
        provider, router, stack, tg = self._provider, self._router, self._stack, self._tg
        if provider is None or router is None or stack is None or tg is None:
            raise self._not_open()  # left before this task started
        s = self.settings
        key = app.identity.key
        deadline = anyio.current_time() + s.start_timeout
        attempts = 0
        while (count := await read_partition_count(provider, key)) is None:
            if anyio.current_time() >= deadline:
                hint = empty_store_hint(s.persistence_url or "")
                raise ConfigurationError(
                    f"application {app.identity} has never run on this store "
                    f"(waited {s.start_timeout:g} s for a node to start it)",
                    [
                        hint
                        or "start a node of the cluster (runkit run ...) before sending it commands"
                    ],
                )
            attempts += 1
            await anyio.sleep(backoff(attempts, 0.05, 1.0))
        # All the inboxes open before any writer starts, and a failure closes
        # those already open: a failed attempt leaves nothing behind.
        async with AsyncExitStack() as opened:
            journals = [
                await opened.enter_async_context(
                    await provider.journals.open(inbox_name(key, index))
                )
                for index in range(count)
            ]
            stack.push_async_callback(opened.pop_all().aclose)
        writers = [
            InboxWriter(
                journal,
                batch_limit=s.inbox_batch_limit,
                record_limit=provider.limits.max_record_bytes,
                max_attempts=s.max_attempts,
                retry_max_delay=s.retry_max_delay,
            )
            for journal in journals
        ]
        for writer in writers:
            await tg.start(writer.run)

        async def offer(index: int, entries: list[Any], room_wait: float | None) -> bool:
            if self._left:
                # A caller offering again after a busy answer, say: its
                # transport is closed.
                raise self._not_open()
            return await router.offer(
                key, index, partition_id(key, index), entries, room_wait=room_wait
            )

        def wake(index: int) -> None:
            router.wake(key, index, partition_id(key, index))

        return Acceptor(app, count, writers, remote=offer, wake=wake, limits=provider.limits)

    # -- executor.Gateway --

    async def acceptor(self, app_key: str) -> Acceptor:
        """The application's acceptor, made on first use (raises if the client is not entered)."""
        if self._router is None:
            raise self._not_open()
        making = self._acceptors.get(app_key)
        if making is not None and making.acceptor is not None:
            return making.acceptor  # made: no wait (an anyio wait would yield even so)
        if making is None:
            # Made in the client's task group, not the caller's task: a caller
            # that is cancelled leaves it to finish for the next one.
            assert self._tg is not None
            making = self._acceptors[app_key] = _Making()
            self._tg.start_soon(self._make, app_key, making)
        await making.done.wait()
        if making.acceptor is None:
            # No error: the client was left while the application was awaited.
            raise making.error or EngineStopped(
                "the client was left before the command was accepted"
            )
        return making.acceptor

    async def _make(self, app_key: str, making: _Making) -> None:
        # A task per application: one waiting for a node to start it holds up no other.
        try:
            making.acceptor = await self._acceptor_for(self._apps[app_key])
        except Exception as exc:
            making.error = exc
            # The next call tries again (a node may have started the application by then).
            if self._acceptors.get(app_key) is making:
                del self._acceptors[app_key]
        finally:
            making.done.set()  # also when the client is left: its callers then raise

    def subscribe(
        self,
        app_key: str,
        correlation_id: str,
        partition: int | None = None,
        widen: Widen | None = None,
    ) -> Subscription:
        """The chain's events, from every live node (or only *partition*'s owner).

        With *widen*, see ``Router.observe``. Leaving the client ends the
        subscription's block with ``EngineStopped``.
        """
        if self._router is None:
            raise self._not_open()
        return self._router.observe(app_key, correlation_id, partition, widen)

    # -- public --

    def executor_for(self, app: object) -> Executor:
        """The ``dogma.CommandExecutor`` of a registered application (object, config or key)."""
        config = self._find(app)
        executor = self._executors.get(config.identity.key)
        if executor is None:
            executor = self._executors[config.identity.key] = Executor(self, config)
        return executor

    async def status(self) -> ClusterStatus:
        """The cluster's status, as ``runkit status`` shows it."""
        from .engine.cluster.status import read_status

        if self._provider is None:
            raise self._not_open()
        # Without applications (a client that only looks), as `runkit status`
        # without arguments: the applications the nodes' heartbeats mention.
        return await read_status(
            self._provider,
            tuple(self._apps.values()),
            now=self.settings.clock(),
            discover=not self._apps,
        )

    def _not_open(self) -> Exception:
        if self._left:
            # A call that was under way when the client was left, or one made
            # after: either way it ends as a call does when its engine stops.
            return EngineStopped(
                "the client was left; use it inside `async with runkit.Client(...)`"
            )
        return RuntimeError("use the client inside `async with runkit.Client(...)`")

    def _find(self, app: object) -> ApplicationConfig:
        if isinstance(app, ApplicationConfig):
            found = self._apps.get(app.identity.key)
        elif isinstance(app, str):
            found = self._apps.get(app.lower())
        else:
            found = next((c for c in self._apps.values() if c.app is app), None)
        if found is None:
            raise ValueError(f"{app!r} is not an application registered with this client")
        return found
