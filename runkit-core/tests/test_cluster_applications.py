"""Nodes of different applications on one store own only their applications' partitions.

The node set (``cluster/nodes``) is store-wide, and each heartbeat names the
applications its node runs. A partition of application X is owned by the
rendezvous winner among the live nodes that run X: a node of another
application, which has no runtime for X, must never win it (its commands would
wait in the inbox for ever, and status would name it as owner).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from runkit.config import ApplicationConfig, build
from runkit.engine.engine import Engine
from runkit.engine.partitions import instance_workload, partition_id, partition_of
from runkit.engine.settings import EngineSettings
from runkit.rendezvous import winner
from runkit_memory import MemoryProvider

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import (
    APP_KEY,
    FAST,
    REGISTRY,
    App,
    Deposit,
    Notifier,
    settled,
    setup,
    splitting_node_ids,
    wait_until,
)

OTHER_KEY = "d0000000-0000-4000-8000-000000000001"
PARTITIONS = 4


def _other() -> ApplicationConfig:
    notifier = Notifier(key="d0000000-0000-4000-8000-000000000002", name="other-notifier")
    return build(App(notifier, key=OTHER_KEY, name="other"), registry=REGISTRY)


@asynccontextmanager
async def _nodes(
    silo: str, *apps: tuple[uuid.UUID, tuple[ApplicationConfig, ...]]
) -> AsyncIterator[list[Engine]]:
    """Engines on one memory silo, each with its node ID and applications, seeing each other."""
    settings: dict[str, Any] = {**FAST, "heartbeat_interval": 0.1, "partition_count": PARTITIONS}
    engines = [
        Engine.from_settings(
            EngineSettings(
                applications=configs,
                persistence_provider=MemoryProvider(silo),
                node_id=node_id,
                **settings,
            )
        )
        for node_id, configs in apps
    ]
    async with anyio.create_task_group() as tg:
        for engine, (_, configs) in zip(engines, apps, strict=True):
            tg.start_soon(engine.run)
            if configs:
                await engine.runtime(configs[0].identity.key)
        await wait_until(
            lambda: all(
                e._membership_view is not None and len(e._membership_view.live_nodes()) == len(apps)
                for e in engines
            )
        )
        yield engines
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("other", ["another application", "no application"])
async def test_a_node_of_another_application_wins_none_of_its_partitions(other: str) -> None:
    s = setup()
    silo = f"two-apps-{uuid.uuid4()}"
    a_id, b_id = splitting_node_ids(PARTITIONS, APP_KEY)
    # An account whose partition B would win if it ranked every live node.
    account = next(
        account
        for account in (f"acc-{i}" for i in range(1000))
        if winner(
            partition_id(
                APP_KEY, partition_of(instance_workload(s.accounts_key, account), PARTITIONS)
            ),
            (a_id, b_id),
        )
        == b_id
    )
    b_apps = (_other(),) if other == "another application" else ()
    async with _nodes(silo, (a_id, (s.config,)), (b_id, b_apps)) as (a, _):
        with anyio.fail_after(10):
            await a.executor_for(s.app).execute_command(Deposit(account, 1, "x"))
        await settled(MemoryProvider(silo), timeout=10)
        status = await a.status()
    assert [call[1] for call in s.accounts.calls] == ["x"]
    owners = {p.owner for p in status.application(APP_KEY).partitions}
    assert owners == {str(a_id)}


async def test_nodes_running_overlapping_applications_share_only_what_both_run() -> None:
    s = setup()
    other = _other()
    silo = f"overlapping-apps-{uuid.uuid4()}"
    a_id, b_id = splitting_node_ids(PARTITIONS, APP_KEY)
    async with _nodes(silo, (a_id, (s.config, other)), (b_id, (s.config,))) as (a, b):

        async def owned(engine: Engine, app_key: str) -> set[int]:
            return set((await engine.runtime(app_key)).partitions)

        await wait_until(
            lambda: (
                len(a._runtimes[APP_KEY].partitions) + len(b._runtimes[APP_KEY].partitions)
                == PARTITIONS
                and len(a._runtimes[OTHER_KEY].partitions) == PARTITIONS
            )
        )
        mine, theirs = await owned(a, APP_KEY), await owned(b, APP_KEY)
        status = await a.status()
    # The shared application is split between the two; the other runs on A alone.
    assert mine
    assert theirs
    assert not mine & theirs
    assert {p.owner for p in status.application(OTHER_KEY).partitions} == {str(a_id)}
