"""``Engine``: runs applications on partitions this node owns, until cancelled.

Per application the engine runs an ``AppRuntime`` (``runtime.py``): the
partition count (``<app>/meta``, ``meta.py``), one ``InboxWriter`` per
partition (acceptance), and a ``PartitionRunner`` that, for each owned
partition, reads the stream tail, starts the ``StreamWriter``, the
``PartitionCommands`` executor and the events side's consumers
(``consumers.partition_consumers(app, settings).run_partition(ctx)``;
``owned_partition.py``).

``run()`` runs until cancelled. On cancellation in-flight handlings are
abandoned (every durable step is atomic and repeatable, so a later owner
finishes them) and each partition's stream writer flushes what is already
committed, within ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio
import attrs

from .._errors import ConfigurationError
from ..config import ApplicationConfig
from ..persistence import Provider, provider_from_url
from .cluster.lone import LoneSubscriptions
from .cluster.ownership import Ownership
from .cluster.routing import NodeCluster, Router, node_cluster
from .cluster.serving import ClusterServer
from .commands.acceptance import Acceptor
from .commands.inbox import EngineStopped, InboxEntry
from .envelope import register_types
from .events.observers import Subscription
from .meta import MetaRecord, load_partition_count, meta_name, read_partition_count
from .runtime import AppRuntime
from .settings import EngineSettings
from .startup import wait_for_store
from .streams import EventBus, Widen, fed_subscription

if TYPE_CHECKING:
    from .cluster.status import ClusterStatus
    from .executor import Executor

# AppRuntime, EngineStopped and the meta helpers are re-exported for the callers
# that import them from here (runkit._run, runkit.client, tests, benchmarks).
__all__ = [
    "AppRuntime",
    "Engine",
    "EngineStopped",
    "MetaRecord",
    "load_partition_count",
    "meta_name",
    "read_partition_count",
]

_log = logging.getLogger("runkit.engine")


def _is_ownership(value: object) -> bool:
    return all(hasattr(value, name) for name in ("owns", "wait_changed", "generation"))


class Engine:
    """Runs Dogma applications; see ``runkit.Engine`` for the public description.

    ``Engine(*options)`` resolves ``runkit`` options into ``EngineSettings``;
    ``Engine.from_settings(settings)`` takes them directly.
    """

    def __init__(self, *options: object) -> None:
        try:
            resolve = importlib.import_module("runkit._options").resolve_options
        except ModuleNotFoundError as exc:
            raise RuntimeError(
                "runkit options are not available in this build; use Engine.from_settings()"
            ) from exc
        self._setup(resolve(options))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Engine:
        """Make an engine from settings (the internal construction path)."""
        engine = cls.__new__(cls)
        engine._setup(settings)
        return engine

    def _setup(self, settings: EngineSettings) -> None:
        keys: dict[str, ApplicationConfig] = {}
        problems = []
        for app in settings.applications:
            if app.identity.key in keys:
                problems.append(
                    f"application {app.identity} is registered twice "
                    f"(also as {keys[app.identity.key].identity})"
                )
            keys[app.identity.key] = app
            register_types(app.message_types())
        if problems:
            raise ConfigurationError("invalid engine configuration", problems)
        self.settings = settings
        self._apps = keys
        # The same ownership code a cluster uses: heartbeats in cluster/nodes and
        # rendezvous hashing over the live set (one node owns every partition).
        self._ownership_source: Ownership | Callable[[Provider], Ownership] = self._membership
        self._closing: list[Provider] = []  # providers the engine made for itself
        self.bus = EventBus()
        self._lone = LoneSubscriptions(self.bus)
        self._runtimes: dict[str, AppRuntime] = {}
        self._cluster: NodeCluster | None = None
        self._membership_view: Any = None
        self._state = "new"
        self._started: anyio.Event | None = None
        self._executors: dict[str, Executor] = {}

    @property
    def applications(self) -> tuple[ApplicationConfig, ...]:
        """The registered applications."""
        return tuple(self._apps.values())

    def use_ownership(self, ownership: Ownership | Callable[[Provider], Ownership]) -> None:
        """Replace the single-node ownership (membership plugs in here); before ``run()``.

        *ownership* is an ``Ownership``, or a factory called with the engine's
        provider when ``run()`` starts. If the ownership has an async
        ``run(*, task_status)`` method (membership's heartbeats), the engine
        starts it, and waits for it to report started, before any application.
        """
        if self._state != "new":
            raise RuntimeError("ownership can only be changed before run()")
        self._ownership_source = ownership

    def progress(self) -> dict[str, dict[int, dict[str, int]]]:
        """Per application key, per owned partition: progress counters for operators.

        The shape of ``membership.Progress`` (pass ``progress=engine.progress``
        to ``Membership`` to publish it with the heartbeat): ``stream_end``,
        ``inbox_position`` (durably fully processed), ``inbox_read`` and
        ``pending`` (commands in memory).
        """
        return {
            key: {index: p.progress() for index, p in list(rt.partitions.items())}
            for key, rt in self._runtimes.items()
        }

    def _membership(self, provider: Provider) -> Ownership:
        from .cluster.membership import Membership

        url = self.settings.persistence_url
        if url is not None and self.settings.persistence_provider is None:
            # Heartbeats get their own provider (their own connections): sharing
            # the data path's pool lets a busy node miss heartbeats and stop
            # taking work. A provider given by the caller is shared as it is.
            provider = provider_from_url(url)
            self._closing.append(provider)
        settings = self.settings
        fingerprint = None
        if self._cluster is not None:
            # No advertise address without a listen address: nothing would answer.
            # The listen address as bound (port 0 is given one).
            settings = attrs.evolve(
                settings,
                advertise_address=self._cluster.advertise_address,
                listen_address=self._cluster.listen_address,
            )
            fingerprint = self._cluster.identity.fingerprint
        membership = Membership(
            provider, settings, progress=self.progress, tls_fingerprint=fingerprint
        )
        self._membership_view = membership
        return membership

    def _resolve_ownership(self, provider: Provider) -> Ownership:
        source = self._ownership_source
        if _is_ownership(source):
            return cast(Ownership, source)
        return cast(Callable[[Provider], Ownership], source)(provider)

    @property
    def router(self) -> Router | None:
        """Routes to peers over the node transport (``None`` until ``run()`` starts)."""
        return None if self._cluster is None else self._cluster.router

    async def acceptor(self, app_key: str) -> Acceptor:
        """The application's acceptor (``executor.Gateway``); waits until started."""
        return (await self.runtime(app_key)).acceptor

    def subscribe(
        self,
        app_key: str,
        correlation_id: str,
        partition: int | None = None,
        widen: Widen | None = None,
    ) -> Subscription:
        """The chain's events recorded here and on the peers.

        With *partition* (the only one the chain can reach), only at its owner;
        with *widen*, see ``Router.observe``. Stopping the engine ends the
        subscription's block with ``EngineStopped``.
        """
        cluster = self._cluster
        view = self._membership_view
        if cluster is None or (
            cluster.listen_address is None and (view is None or not view.live_peers())
        ):
            # Alone, and not listening (the usual single node): nothing but this
            # node records events now, and the bus alone costs a fraction of a
            # routed observation. If peers join meanwhile, the subscription is
            # routed then (``LoneSubscriptions``). A listening node is always
            # routed: peers find it.
            return self._lone.subscribe(app_key, correlation_id, partition)
        router = cluster.router
        # The bus and the peers' streams deliver into one stream: no task per source.
        return fed_subscription(
            lambda send: self.bus.attached(correlation_id, send),
            lambda send: router.observation(app_key, correlation_id, send, partition, widen),
        )

    def _members(self) -> dict[uuid.UUID, Any]:
        view = self._membership_view
        return {} if view is None else view.live_members()

    def _offer_local(
        self,
        app_key: str,
        index: int,
        entries: Sequence[InboxEntry],
        done: Callable[[bool | BaseException], None],
        room_wait: float | None = None,
    ) -> None:
        runtime = self._runtimes.get(app_key)
        if runtime is None:
            done(False)
        else:
            runtime.offer_local(index, entries, done, room_wait=room_wait)

    def _wake_local(self, app_key: str, index: int, what: str) -> None:
        runtime = self._runtimes.get(app_key)
        if runtime is not None:
            runtime.wake_local(index, what)

    def executor_for(self, app: object) -> Executor:
        """The ``dogma.CommandExecutor`` of a registered application.

        *app* is the application object, its ``ApplicationConfig``, or its
        identity key. Raises ``ValueError`` for an unregistered application.
        """
        from .executor import Executor

        config = self._find(app)
        executor = self._executors.get(config.identity.key)
        if executor is None:
            executor = self._executors[config.identity.key] = Executor(self, config)
        return executor

    def _find(self, app: object) -> ApplicationConfig:
        if isinstance(app, ApplicationConfig):
            found = self._apps.get(app.identity.key)
        elif isinstance(app, str):
            found = self._apps.get(app.lower())
        else:
            found = next((c for c in self._apps.values() if c.app is app), None)
        if found is None:
            raise ValueError(
                f"{app!r} is not an application registered with this engine "
                f"(registered: {', '.join(str(c.identity) for c in self._apps.values()) or 'none'})"
            )
        return found

    async def runtime(self, app_key: str) -> AppRuntime:
        """The running application runtime; waits until the engine has started.

        Raises ``EngineStopped`` once the engine has stopped.
        """
        while self._state != "running":
            if self._state == "stopped":
                raise EngineStopped("the engine has stopped")
            if self._started is None:
                self._started = anyio.Event()
            await self._started.wait()
        return self._runtimes[app_key]

    async def reset_projection(self, app: object, handler: str) -> None:
        """Reset a projection of a running application and replay it from offset 0.

        *handler* is the projection's name or key. Delivery to it pauses on this
        node while ``handler.reset(scope)`` runs, then restarts from the start
        of every stream. Raises ``ValueError`` for an unknown application,
        ``LookupError`` for an unknown projection, and ``ProjectionNotResettable``
        when the handler does not support reset (``dogma.NotSupported``).
        """
        config = self._find(app)
        runtime = await self.runtime(config.identity.key)
        consumers = runtime.consumers
        if consumers is None:
            raise RuntimeError("this engine runs no event consumers")
        await consumers.reset_projection(handler, clock=self.settings.clock)

    async def status(self) -> ClusterStatus:
        """The cluster's status as this engine's store shows it: what ``runkit status`` prints.

        Nodes (live or expired, addresses, version), and per registered
        application its partitions (owner, inbox backlog, stream end, pending
        deadlines, poison counts) and consumers' lag; see
        ``runkit.engine.cluster.status``. Reads only. Works before, during and after
        ``run()`` (with the provider the engine runs on, else one of its own).
        """
        from .cluster.status import read_status

        apps = self.applications
        # After run(), a provider it made from the URL is closed: open one of our own.
        running = self._state != "stopped"
        provider = next((rt.provider for rt in self._runtimes.values() if running), None)
        provider = provider or self.settings.persistence_provider
        if provider is not None:
            return await read_status(provider, apps, now=self.settings.clock())
        if self.settings.persistence_url is None:
            raise ConfigurationError(
                "no persistence is configured",
                ["use runkit.with_persistence(url) or runkit.with_persistence_provider(p)"],
            )
        async with provider_from_url(self.settings.persistence_url) as own:
            own.set_read_only()  # not running: look, create nothing
            return await read_status(own, apps, now=self.settings.clock())

    async def run(self) -> None:
        """Run until cancelled, then shut down gracefully.

        Raises:
            runkit.ConfigurationError: no persistence is configured, the node
                cannot listen on its listen address, or it listens on a wildcard
                address with no advertise address.
            RuntimeError: the engine is already running or has run.
        """
        if self._state != "new":
            raise RuntimeError("Engine.run() may be called only once per engine")
        s = self.settings
        provider = s.persistence_provider
        owned = provider is None
        if provider is None:
            if s.persistence_url is None:
                raise ConfigurationError(
                    "no persistence is configured",
                    [
                        "use runkit.with_persistence(url) or runkit.with_persistence_provider(p), "
                        "or set DOGMA_PERSISTENCE_URL with runkit.from_environment()"
                    ],
                )
            provider = provider_from_url(s.persistence_url)
        self._state = "starting"
        try:
            # Fails at once on a wrong password or database, waits out an outage.
            await wait_for_store(provider, timeout=s.start_timeout)
            async with contextlib.AsyncExitStack() as stack:
                # Entered first, left last: peers can reach this node while its
                # partitions flush and it leaves membership.
                self._cluster = await stack.enter_async_context(
                    node_cluster(
                        settings=s,
                        provider=provider,
                        members=self._members,
                        server=ClusterServer(
                            offer_local=self._offer_local,
                            wake_local=self._wake_local,
                            subscribe_local=self.bus.subscribe,
                            attach_local=self.bus.attached,
                        ),
                    )
                )
                ownership = self._resolve_ownership(provider)
                # joined() keeps heartbeating while the apps wind down and leaves
                # only after they have flushed, so peers never take a partition
                # that is still being flushed.
                joined = getattr(ownership, "joined", None)
                if joined is not None:
                    await stack.enter_async_context(joined())
                tg = await stack.enter_async_context(anyio.create_task_group())
                view = self._membership_view
                if view is not None and self._cluster.listen_address is None:
                    # Its observations start on the bus alone while it sees no peer.
                    tg.start_soon(self._lone.watch, view, self._cluster.router)
                run_ownership = getattr(ownership, "run", None)
                if joined is None and run_ownership is not None:
                    await tg.start(run_ownership)
                for key, app in self._apps.items():
                    router = self._cluster.router if self._cluster is not None else None
                    # A membership ranks, for each application, only the nodes that run it.
                    for_app = getattr(ownership, "for_app", None)
                    app_ownership = for_app(key) if for_app is not None else ownership
                    rt = AppRuntime(app, s, provider, self.bus, app_ownership, router=router)
                    await tg.start(rt.run)
                    self._runtimes[key] = rt
                self._state = "running"
                _log.info(
                    "engine running: %d application(s), node %s",
                    len(self._apps),
                    s.node_id,
                    extra={"node_id": str(s.node_id)},
                )
                if self._started is not None:
                    self._started.set()
                await anyio.sleep_forever()
        finally:
            started = self._state == "running"
            self._state = "stopped"
            # Every subscription is fed by the bus (alone or with the peers).
            self.bus.end(
                functools.partial(
                    EngineStopped, "the engine stopped before an observer was satisfied"
                )
            )
            if self._started is not None:
                self._started.set()
            with anyio.CancelScope(shield=True):
                for extra in self._closing:
                    await extra.close()
                if owned:
                    await provider.close()
            if started:
                _log.info("engine stopped", extra={"node_id": str(s.node_id)})
            else:  # the error that ended the start says why: nothing stopped
                _log.debug("engine start abandoned", extra={"node_id": str(s.node_id)})
