"""The work behind ``runkit run`` and ``runkit poison`` (kept out of cli.py so
that ``runkit env`` and ``runkit drivers`` stay fast to start)."""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Sequence
from typing import TextIO

import anyio

from . import config
from ._backends import run_arguments
from ._cli_output import heartbeat_age, node_address, print_table
from ._collector import tuned_collector
from ._environment import ENVIRONMENT
from ._errors import CLIError, ConfigurationError
from ._loading import application_object
from ._options import Option, from_environment, with_application, with_persistence
from .cli import DEFAULT_MEMORY_URL
from .engine.commands.poison import PoisonedCommand, get_poisoned, list_poisoned, requeue
from .engine.engine import Engine, EngineStopped, meta_name, read_partition_count
from .persistence import Provider, provider_from_url, redact_url
from .persistence._urls import empty_store_hint

__all__ = ["nodes_command", "poison_command", "run_node"]


def _engine(spec: str, options: Sequence[Option], out: TextIO) -> tuple[Engine, str]:
    """Build the engine ``runkit run`` runs, and the persistence URL it uses."""
    app = application_object(spec)
    env = ENVIRONMENT.load()
    try:
        all_options = [with_application(app), from_environment(), *options]
        url = env.persistence_url
        if url is None:
            url = DEFAULT_MEMORY_URL
            all_options.append(with_persistence(url))
            out.write(
                f"DOGMA_PERSISTENCE_URL is not set; using the embedded memory driver ({url}): "
                "state is lost when the process exits\n"
            )
        return Engine(*all_options), url
    except ConfigurationError:
        raise
    except (ValueError, TypeError) as exc:
        # The options validate at the call: what they refuse is configuration.
        raise CLIError(str(exc)) from None


def run_node(
    spec: str, *, out: TextIO, backend: str = "asyncio", options: Sequence[Option] = ()
) -> int:
    """Run a node for the application at *spec* until SIGINT/SIGTERM.

    *options* (from ``runkit run``'s flags) beat the environment.
    """
    engine, url = _engine(spec, options, out)
    names = ", ".join(a.identity.name for a in engine.applications)
    out.write(f"starting node {engine.settings.node_id} for {names}\n")
    out.flush()

    async def announce() -> None:
        try:
            for app in engine.applications:
                await engine.runtime(app.identity.key)
        except EngineStopped:
            return  # it failed to start; engine.run() raises the reason
        loop = "" if backend == "asyncio" else f" ({backend})"
        out.write(
            f"running {names} on {redact_url(url)}{loop}; Ctrl-C or SIGTERM stops it gracefully\n"
        )
        out.flush()

    async def serve() -> None:
        # Signals are caught before the engine starts, so none is lost in between.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                engine_scope = anyio.CancelScope()

                async def run_engine() -> None:
                    with engine_scope:
                        await engine.run()
                    tg.cancel_scope.cancel()  # stopped: no more signals to wait for

                tg.start_soon(run_engine)
                tg.start_soon(announce)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not engine_scope.cancel_called:
                        out.write(
                            f"received {name}: stopping (finishing in-flight work; "
                            "send it again to stop at once)\n"
                        )
                        out.flush()
                        engine_scope.cancel()
                        continue
                    # A graceful stop can take as long as the store's timeouts
                    # (a store that stopped answering): the operator insists.
                    # What is committed is durable; what is not, its callers
                    # retry, and the next owner takes over as after a crash.
                    out.write(f"received {name} again: stopping at once\n")
                    out.flush()
                    os._exit(128 + signum)

    # The process is the node's: tune the collector for it (about 15% less CPU).
    with tuned_collector():
        anyio.run(serve, **run_arguments(backend))
    out.write("stopped\n")
    return 0


async def _partition_count(provider: Provider, app_key: str, url: str) -> int:
    # Read-only: an operator command must not create metadata.
    count = await read_partition_count(provider, app_key)
    if count is None:
        hint = empty_store_hint(url)
        raise CLIError(
            f"application {app_key} has never run on this store (no {meta_name(app_key)})"
            + (f"; {hint}" if hint else "")
        )
    return count


def _summary(p: PoisonedCommand) -> tuple[str, ...]:
    error = p.record.error.strip().splitlines()[-1] if p.record.error.strip() else ""
    return (
        str(p.partition),
        p.command_id,
        p.description[:40],
        str(p.record.attempts),
        error[:60],
    )


def poison_command(spec: str, action: str, command_id: str | None, *, out: TextIO) -> int:
    """``runkit poison list|show|requeue``: operate on the store the nodes use."""
    built = config.build(application_object(spec))
    env = ENVIRONMENT.load()
    if env.persistence_url is None:
        raise CLIError("set DOGMA_PERSISTENCE_URL to the store the application's nodes use")
    url = env.persistence_url
    key = built.identity.key

    async def go() -> int:
        provider = provider_from_url(url)
        if action != "requeue":
            provider.set_read_only()  # inspecting must not create (or change) anything
        try:
            count = await _partition_count(provider, key, url)
            if action == "list":
                rows = [_summary(p) async for p in list_poisoned(provider, key, count)]
                if not rows:
                    out.write(f"no poisoned commands for {built.identity.name}\n")
                    return 0
                print_table(
                    [("partition", "command", "description", "attempts", "error"), *rows], out
                )
                out.write(f"{len(rows)} poisoned command(s)\n")
                return 0
            assert command_id is not None
            if action == "show":
                found = await get_poisoned(provider, key, count, command_id)
                if found is None:
                    out.write(f"no poisoned command {command_id}\n")
                    return 1
                env_ = found.record.entry.envelope
                out.write(
                    f"command      {found.command_id}\n"
                    f"partition    {found.partition}\n"
                    f"description  {env_.description}\n"
                    f"type         {env_.type_id}\n"
                    f"correlation  {env_.correlation_id}\n"
                    f"created at   {env_.created_at.isoformat()}\n"
                    f"handler      {found.record.handler_key}\n"
                    f"attempts     {found.record.attempts}\n"
                    f"poisoned at  {found.record.poisoned_at.isoformat()}\n"
                    "error:\n" + textwrap.indent(found.record.error.rstrip(), "    ") + "\n"
                )
                return 0
            done = await requeue(provider, key, count, command_id)
            if not done:
                out.write(f"no poisoned command {command_id} (already requeued?)\n")
                return 1
            out.write(f"requeued {command_id}; the partition's owner will handle it again\n")
            return 0
        finally:
            with anyio.CancelScope(shield=True):
                await provider.close()

    return anyio.run(go)


def nodes_command(*, out: TextIO) -> int:
    """``runkit nodes``: the heartbeat records in the store, live or expired."""
    from datetime import UTC, datetime

    from .engine.cluster.nodes import list_nodes

    env = ENVIRONMENT.load()
    if env.persistence_url is None:
        raise CLIError("set DOGMA_PERSISTENCE_URL to the store the nodes use")
    url = env.persistence_url

    async def go() -> int:
        provider = provider_from_url(url)
        provider.set_read_only()  # inspecting must not create (or change) anything
        try:
            records = await list_nodes(provider)
        finally:
            with anyio.CancelScope(shield=True):
                await provider.close()
        if not records:
            hint = empty_store_hint(url)
            out.write(
                "no nodes have heartbeat records in this store"
                + (f" ({hint})" if hint else "")
                + "\n"
            )
            return 0
        now = datetime.now(UTC)
        rows: list[tuple[str, ...]] = [
            ("node", "state", "role", "address", "started", "last heartbeat")
        ]
        for r in records:
            state = "live" if r.is_live(now) else "expired"
            age = heartbeat_age(now, r.written_at)
            rows.append(
                (
                    str(r.node_id),
                    state,
                    r.role,
                    node_address(r.advertise_address, r.listen_address),
                    r.started_at.isoformat(timespec="seconds"),
                    age,
                )
            )
        print_table(rows, out)
        # Clients (runkit.Client) own no partitions: counted apart, as runkit status does.
        nodes = [r for r in records if r.role != "client"]
        live = sum(1 for r in nodes if r.is_live(now))
        clients = sum(1 for r in records if r.role == "client" and r.is_live(now))
        out.write(
            f"{live} live node(s), {len(nodes) - live} expired"
            + (f"; {clients} live client(s)" if clients else "")
            + "\n"
        )
        return 0

    return anyio.run(go)
