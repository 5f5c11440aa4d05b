"""A runkit node process for ``test_engine_crash``: started, then killed with SIGKILL.

Usage: ``python crash_runner.py CONFIG`` where CONFIG is a JSON object:

- ``dsn``, ``schema``: the PostgreSQL store (libpq DSN and schema);
- ``seed``, ``count``: the workload (``engine_faults_app.workload``);
- ``order_seed``: the order this node's client executes the workload in;
- ``execute``: whether this node's client executes the workload at all;
- ``ack``: a file to which each acknowledged idempotency key is appended, one
  per line, written before the next command can be acknowledged (a SIGKILL
  loses no acknowledgement that was reported);
- ``done``: a file created once every key is acknowledged;
- ``disabled``, ``projection_delay``, ``process_delay``: see ``BankApp``;
- ``backend``: the anyio backend to run on;
- ``node_id``, ``heartbeat``, ``listen``: for a node of a cluster, its node ID,
  heartbeat interval (seconds) and listen address (``host:port``);
- ``log``: log from ``INFO`` up to stderr, as ``runkit run`` does.

The node runs the whole application (commands, process, deadlines,
projection) and never exits by itself: the test kills it.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))
from engine_faults_app import APP_KEY, BankApp, execute_all, running, workload

from runkit_postgres import PostgresProvider


class _AckLog(list[str]):
    """A list of acknowledged keys that writes each one through to a file at once."""

    def __init__(self, path: str) -> None:
        super().__init__()
        # Line-buffered: every key reaches the OS (and survives our SIGKILL)
        # before execute_all can return to the client for the next command.
        self._file = open(path, "a", buffering=1)  # noqa: SIM115

    def append(self, key: str) -> None:
        self._file.write(key + "\n")
        self._file.flush()
        super().append(key)


async def main(config: dict[str, Any]) -> None:
    async with PostgresProvider(config["dsn"], schema=config["schema"]) as provider:
        app = BankApp(
            provider,
            disabled=config.get("disabled", ()),
            projection_delay=config.get("projection_delay", 0.0),
            process_delay=config.get("process_delay", 0.0),
        )
        cluster: dict[str, Any] = {}
        if "node_id" in config:
            cluster["node_id"] = uuid.UUID(config["node_id"])
        if "heartbeat" in config:
            cluster["heartbeat_interval"] = config["heartbeat"]
        if "listen" in config:
            cluster["listen_address"] = config["listen"]
        async with running(
            provider,
            app.config(),
            retry_max_delay=0.2,
            # The engine's default unless a round asks otherwise.
            materialise_delay=config.get("materialise_delay", 1.0),
            **cluster,
        ) as engine:
            if config.get("execute", True):
                commands = workload(config["seed"], config["count"])
                random.Random(config["order_seed"]).shuffle(commands)
                acknowledged = _AckLog(config["ack"])
                await execute_all(
                    engine.executor_for(APP_KEY),
                    commands,
                    acknowledged,
                    concurrency=16,
                    timeout=600,
                )
                await anyio.Path(config["done"]).touch()
            await anyio.sleep_forever()


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    if settings.get("log"):
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    anyio.run(main, settings, backend=settings.get("backend", "asyncio"))
