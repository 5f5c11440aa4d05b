"""A runkit node process for ``test_cluster``: one node of a cluster on one store.

Usage: ``python cluster_runner.py CONFIG`` where CONFIG is a JSON object with
``url`` (the persistence URL: PostgreSQL, or DynamoDB on moto), ``node_id``,
``listen`` (``host:port``), ``ready`` (a file created once the node runs),
``heartbeat`` (seconds) and ``backend``. The node runs the commands
harness application (an aggregate and an integration) with membership, the
node transport on ``listen`` and mutual TLS (self-signed, trusted by the
fingerprint in its heartbeat), until it is killed or gets SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import setup

import runkit
from runkit.persistence import provider_from_url


async def main(config: dict[str, Any]) -> None:
    s = setup()
    async with provider_from_url(config["url"]) as provider:
        engine = runkit.Engine(
            runkit.with_application(s.config),
            runkit.with_persistence_provider(provider),
            runkit.with_node_id(config["node_id"]),
            runkit.with_listen_address(config["listen"]),
            runkit.with_heartbeat_interval(config["heartbeat"]),
            runkit.with_partition_count(8),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            await engine.runtime(s.config.identity.key)
            await anyio.Path(config["ready"]).touch()
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    anyio.run(main, settings, backend=settings.get("backend", "asyncio"))
