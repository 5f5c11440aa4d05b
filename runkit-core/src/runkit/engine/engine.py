"""``Engine``: runs applications on partitions this node owns, until cancelled.

The engine builds, per application: the partition count (``<app>/meta``), one
``InboxWriter`` per partition (acceptance), and a ``PartitionRunner`` that, for
each owned partition, reads the stream tail, starts the ``StreamWriter``, the
``PartitionCommands`` executor and the events side's consumers
(``consumers.partition_consumers(app, settings).run_partition(ctx)``).

``run()`` runs until cancelled. On cancellation in-flight handlings are
abandoned (every durable step is atomic and repeatable, so a later owner
finishes them) and each partition's stream writer flushes what is already
committed, within ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio
import attrs
import msgspec
from anyio.abc import TaskStatus

from .._errors import ConfigurationError
from ..config import ApplicationConfig
from ..persistence import Conflict, PersistenceError, Provider, provider_from_url
from .backoff import backoff
from .cluster.ownership import Ownership
from .cluster.routing import ClusterServer, NodeCluster, Router, serve_cluster
from .commands.acceptance import Acceptor, PartitionStopped, idempotency_name, prune_idempotency
from .commands.aggregates import AggregateInstances
from .commands.batches import PartitionCommands
from .commands.inbox import EngineStopped, InboxEntry, InboxWriter, inbox_name
from .commands.materialiser import Materialiser
from .envelope import Envelope, register_types
from .events.observers import Subscription, merged
from .logs import describe_error
from .partitions import NodeContext, PartitionContext, PartitionRunner, partition_id, partition_of
from .settings import EngineSettings
from .startup import wait_for_store
from .streams import (
    EventBus,
    OwnershipLost,
    PartitionStream,
    StreamWriter,
    read_tail,
    stream_name,
)

if TYPE_CHECKING:
    from .cluster.status import ClusterStatus
    from .executor import Executor

__all__ = ["AppRuntime", "Engine", "EngineStopped", "MetaRecord", "meta_name"]

_log = logging.getLogger("runkit.engine")


def meta_name(app_key: str) -> str:
    """The name of an application's metadata keyspace."""
    return f"{app_key}/meta"


class MetaRecord(msgspec.Struct, frozen=True, kw_only=True):
    """``<app>/meta`` key ``partitions``: fixed when the application first starts."""

    partition_count: int
    created_at: datetime


_META_KEY = b"partitions"
#: Events at the end of a partition's stream a new owner publishes again.
REPUBLISH_ON_TAKEOVER = 256
_meta_decoder = msgspec.msgpack.Decoder(MetaRecord)


async def read_partition_count(provider: Provider, app_key: str) -> int | None:
    """The application's partition count, or ``None`` if it has never started (read-only)."""
    async with await provider.keyspaces.open(meta_name(app_key)) as ks:
        value, _ = await ks.get(_META_KEY)
    return _meta_decoder.decode(value).partition_count if value else None


async def load_partition_count(
    provider: Provider, app_key: str, default: int, now: datetime
) -> int:
    """Read the application's partition count, storing *default* if it has none yet."""
    failures = 0
    async with await provider.keyspaces.open(meta_name(app_key)) as ks:
        while True:
            try:
                value, _ = await ks.get(_META_KEY)
                if value:
                    return _meta_decoder.decode(value).partition_count
                record = MetaRecord(partition_count=default, created_at=now)
                await ks.set(_META_KEY, msgspec.msgpack.encode(record), "")
                return default
            except Conflict:
                continue  # another node (or our own ambiguous write) created it; read it
            except PersistenceError as exc:
                failures += 1
                if failures >= 10 or not (exc.retryable or exc.ambiguous):
                    raise
                await anyio.sleep(backoff(failures, 0.02, 1.0))


def _consumers_module() -> Any | None:
    # The events side is optional at this seam: without it, partitions run commands only.
    if importlib.util.find_spec("runkit.engine.events.consumers") is None:
        return None
    return importlib.import_module("runkit.engine.events.consumers")


class AppRuntime:
    """One application on this node: acceptance and its owned partitions."""

    def __init__(
        self,
        app: ApplicationConfig,
        settings: EngineSettings,
        provider: Provider,
        bus: EventBus,
        ownership: Ownership,
        *,
        router: Router | None = None,
    ) -> None:
        self.app = app
        self.router = router
        self.settings = settings
        self.provider = provider
        self.bus = bus
        self.ownership = ownership
        self.partition_count = 0
        self.inbox_writers: list[InboxWriter] = []
        self.partitions: dict[int, PartitionCommands] = {}
        self._acceptor: Acceptor | None = None
        self._consumers: Any = None

    @property
    def acceptor(self) -> Acceptor:
        """Routes and accepts commands (available once started)."""
        if self._acceptor is None:
            raise RuntimeError("the application runtime has not started")
        return self._acceptor

    @property
    def consumers(self) -> Any:
        """The events-side consumers (``consumers.EventConsumers``), once started."""
        return self._consumers

    @property
    def app_key(self) -> str:
        """The application's identity key."""
        return self.app.identity.key

    def partition_of(self, workload: str) -> int:
        """The partition index of a workload key."""
        return partition_of(workload, self.partition_count)

    async def accept(self, envelopes: Sequence[Envelope]) -> None:
        """``PartitionContext.accept``: durably accept handler-produced commands."""
        await self.acceptor.accept_envelopes(envelopes)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run acceptance and owned partitions until cancelled."""
        s = self.settings
        self.partition_count = await load_partition_count(
            self.provider, self.app_key, s.partition_count, s.clock()
        )
        if self.partition_count != s.partition_count:
            _log.info(
                "application %s keeps its %d partitions (configured: %d)",
                self.app.identity,
                self.partition_count,
                s.partition_count,
                extra={"app": self.app_key},
            )
        module = _consumers_module()
        if module is not None:
            self._consumers = module.partition_consumers(
                self.app, s, live_nodes=getattr(self.ownership, "live_nodes", None)
            )
            # Deadlines for a home partition owned elsewhere wake its owner.
            self._consumers.remote_wake = lambda index: self._wake_remote(index, "deadlines")
        async with AsyncExitStack() as stack:
            for index in range(self.partition_count):
                journal = await self.provider.journals.open(inbox_name(self.app_key, index))
                stack.push_async_callback(journal.close)
                self.inbox_writers.append(
                    InboxWriter(
                        journal,
                        batch_limit=s.inbox_batch_limit,
                        record_limit=self.provider.limits.max_record_bytes,
                        max_attempts=s.max_attempts,
                        retry_max_delay=s.retry_max_delay,
                    )
                )
            self._acceptor = Acceptor(
                self.app,
                self.partition_count,
                self.inbox_writers,
                local=self.partitions.get,
                remote=self._offer_remote if self.router is not None else None,
                wake=self._wake_remote if self.router is not None else None,
            )
            async with anyio.create_task_group() as tg:
                for writer in self.inbox_writers:
                    await tg.start(writer.run)
                runner = PartitionRunner(
                    self.app_key, self.partition_count, self.ownership, self._run_partition
                )
                tg.start_soon(runner.run)
                if self._consumers is not None:
                    await tg.start(self._consumers.run_node, self._node_context())
                if s.idempotency_retention is not None:
                    tg.start_soon(self._prune_markers, s.idempotency_retention)
                task_status.started()

    async def _prune_markers(self, retention: float) -> None:
        # One node prunes: the owner of partition 0 (ownership moves it on failover).
        first = partition_id(self.app_key, 0)
        while True:
            await anyio.sleep(min(3600.0, retention / 4))
            if not self.ownership.owns(first):
                continue
            cutoff = self.settings.clock() - timedelta(seconds=retention)
            try:
                pruned = await prune_idempotency(self.provider, self.app_key, cutoff)
            except PersistenceError as exc:
                _log.warning(
                    "application %s: pruning idempotency markers failed: %s",
                    self.app.identity.name,
                    describe_error(exc),
                    extra={"app": self.app_key},
                )
                continue
            if pruned:
                _log.info(
                    "application %s: pruned %d idempotency markers",
                    self.app.identity.name,
                    pruned,
                    extra={"app": self.app_key},
                )

    async def _offer_remote(self, index: int, entries: list[InboxEntry]) -> bool:
        assert self.router is not None
        return await self.router.offer(
            self.app_key, index, partition_id(self.app_key, index), entries
        )

    def _wake_remote(self, index: int, what: str = "inbox") -> None:
        if self.router is not None:
            self.router.wake(self.app_key, index, partition_id(self.app_key, index), what)

    async def offer_local(self, index: int, entries: Sequence[InboxEntry]) -> bool:
        """Handle commands a peer offered, if this node runs the partition; whether it did."""
        commands = self.partitions.get(index)
        if commands is None:
            return False
        try:
            await commands.execute_local(entries)
        except PartitionStopped:
            return False
        return True

    def wake_local(self, index: int, what: str) -> None:
        """A peer appended to this partition's inbox or deadlines: read them now."""
        if what == "deadlines":
            if self._consumers is not None:
                self._consumers.wake_timer(index)
            return
        commands = self.partitions.get(index)
        if commands is not None:
            commands.poke()

    def _node_context(self) -> NodeContext:
        return NodeContext(
            app=self.app,
            settings=self.settings,
            node_id=str(self.settings.node_id),
            partition_count=self.partition_count,
            provider=self.provider,
            accept=self.accept,
            partition_of=self.partition_of,
            now=self.settings.clock,
        )

    async def _run_partition(self, index: int) -> None:
        s = self.settings
        pid = partition_id(self.app_key, index)
        context = {"app": self.app_key, "partition": index}
        async with AsyncExitStack() as stack:
            journals = self.provider.journals
            stream_journal = await journals.open(stream_name(self.app_key, index))
            stack.push_async_callback(stream_journal.close)
            inbox = await journals.open(inbox_name(self.app_key, index))
            stack.push_async_callback(inbox.close)
            idempotency = await self.provider.keyspaces.open(idempotency_name(self.app_key))
            stack.push_async_callback(idempotency.close)

            tail = await read_tail(stream_journal)
            inbox_end = (await inbox.bounds()).end
            _log.info(
                "application %s: taking partition %d: stream offset %d, %d inbox records pending",
                self.app.identity.name,
                index,
                tail.next_offset,
                max(0, inbox_end - tail.inbox_position),
                extra=context,
            )
            stream = PartitionStream(pid, stream_journal, next_offset=tail.next_offset)
            # The previous owner may have committed events and died before its
            # observers (here or on peers) heard of them: publish the stream's
            # last events again; observers skip what they have already seen.
            republish = min(tail.next_offset, REPUBLISH_ON_TAKEOVER)
            if republish:
                self.bus.publish(await stream.events_at(tail.next_offset - republish, republish))
            aggregates = AggregateInstances(
                self.provider,
                self.app_key,
                site_key=s.site_key,
                clock=s.clock,
                snapshot_every=s.snapshot_every,
                cache_size=s.instance_cache_size,
            )
            stack.push_async_callback(aggregates.close)
            materialiser = Materialiser(
                self.provider,
                self.app,
                aggregates,
                truncate=s.truncate_aggregate_journals,
                retry_base_delay=s.retry_base_delay,
                retry_max_delay=s.retry_max_delay,
            )
            if tail.materialised is not None:
                # Aggregate events a previous owner committed but had not yet
                # written to their instance journals (ADR 0007).
                await materialiser.recover_from(
                    stream_journal, tail.materialised, tail.next_position
                )
            writer = StreamWriter(
                stream_journal,
                stream,
                self.bus,
                tail,
                clock=s.clock,
                batch_limit=s.stream_batch_limit,
                record_limit=self.provider.limits.max_record_bytes,
                progress_interval=s.progress_interval,
                retry_max_delay=s.retry_max_delay,
                watermark=materialiser.watermark,
            )
            inbox_writer = self.inbox_writers[index]
            lost = False
            try:
                async with anyio.create_task_group() as tg:
                    commands = PartitionCommands(
                        app=self.app,
                        settings=s,
                        index=index,
                        provider=self.provider,
                        inbox=inbox,
                        inbox_writer=inbox_writer,
                        idempotency=idempotency,
                        writer=writer,
                        stream=stream,
                        bus=self.bus,
                        tail=tail,
                        inbox_end=inbox_end,
                        aggregates=aggregates,
                        materialiser=materialiser,
                        backlog_limit=s.backlog_limit,
                    )
                    await tg.start(materialiser.run)
                    await tg.start(writer.run)
                    inbox_writer.listener = commands.notify
                    await tg.start(commands.run)
                    self.partitions[index] = commands
                    if self._consumers is not None:
                        ctx = PartitionContext(
                            app=self.app,
                            settings=s,
                            index=index,
                            partition_id=pid,
                            partition_count=self.partition_count,
                            provider=self.provider,
                            stream=stream,
                            accept=self.accept,
                            partition_of=self.partition_of,
                            now=s.clock,
                        )
                        await tg.start(self._consumers.run_partition, ctx)
            except BaseException as exc:
                lost = _is_ownership_lost(exc)
                if not lost:
                    raise
                _log.warning(
                    "application %s: lost partition %d (another node owns it now)",
                    self.app.identity.name,
                    index,
                    extra=context,
                )
            finally:
                inbox_writer.listener = None
                self.partitions.pop(index, None)
                if not lost:
                    with anyio.move_on_after(s.shutdown_timeout, shield=True):
                        try:
                            await writer.flush()
                            # Derived state too, so a restart need not rebuild it,
                            # and a record saying so for the next owner.
                            await materialiser.flush()
                            await writer.record_watermark(materialiser.covered)
                        except Exception as exc:  # e.g. OwnershipLost: the next owner repairs
                            _log.info(
                                "application %s: partition %d: final stream flush skipped: %s",
                                self.app.identity.name,
                                index,
                                describe_error(exc),
                                extra=context,
                            )
                # Whatever is still queued was not committed: its local callers
                # fall back to the inbox.
                writer.close()


def _is_ownership(value: object) -> bool:
    return all(hasattr(value, name) for name in ("owns", "wait_changed", "generation"))


def _is_ownership_lost(exc: BaseException) -> bool:
    if isinstance(exc, OwnershipLost):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_ownership_lost(e) for e in exc.exceptions)
    return False


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
            settings = attrs.evolve(settings, advertise_address=self._cluster.advertise_address)
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
        """Routes to peers over the node transport (``None`` without a listen address)."""
        return None if self._cluster is None else self._cluster.router

    async def acceptor(self, app_key: str) -> Acceptor:
        """The application's acceptor (``executor.Gateway``); waits until started."""
        return (await self.runtime(app_key)).acceptor

    def subscribe(
        self, app_key: str, correlation_id: str, partition: int | None = None
    ) -> Subscription:
        """The chain's events recorded here and, with a listen address, on the peers.

        With *partition* (the only one the chain can reach), only at its owner.
        """
        local = self.bus.subscribe(correlation_id)
        if self._cluster is None:
            return local
        return merged(local, self._cluster.router.observe(app_key, correlation_id, partition))

    def _members(self) -> dict[uuid.UUID, Any]:
        view = self._membership_view
        return {} if view is None else view.live_members()

    async def _offer_local(self, app_key: str, index: int, entries: Sequence[InboxEntry]) -> bool:
        runtime = self._runtimes.get(app_key)
        return runtime is not None and await runtime.offer_local(index, entries)

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
        provider = next((rt.provider for rt in self._runtimes.values()), None)
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
            runkit.ConfigurationError: no persistence is configured.
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
                if s.listen_address is not None:
                    # Entered first, left last: peers can reach this node
                    # while its partitions flush and it leaves membership.
                    self._cluster = await stack.enter_async_context(
                        serve_cluster(
                            settings=s,
                            provider=provider,
                            members=self._members,
                            server=ClusterServer(
                                offer_local=self._offer_local,
                                wake_local=self._wake_local,
                                subscribe_local=self.bus.subscribe,
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
                run_ownership = getattr(ownership, "run", None)
                if joined is None and run_ownership is not None:
                    await tg.start(run_ownership)
                for key, app in self._apps.items():
                    router = self._cluster.router if self._cluster is not None else None
                    rt = AppRuntime(app, s, provider, self.bus, ownership, router=router)
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
            self._state = "stopped"
            if self._started is not None:
                self._started.set()
            with anyio.CancelScope(shield=True):
                for extra in self._closing:
                    await extra.close()
                if owned:
                    await provider.close()
            _log.info("engine stopped", extra={"node_id": str(s.node_id)})
