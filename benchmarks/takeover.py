"""How long a new partition owner's takeover scan takes over a long stretch of stream.

Usage::

    uv run python benchmarks/takeover.py [--drivers memory,postgres,s3,dynamodb]
        [--records 100,3000] [--repeat 3] [--backend asyncio|uvloop|trio]

For each driver it writes a stream journal whose every record is committed
while the inbox command at position 0 is still pending (an integration
command retried for minutes under load), so a new owner's scan must read
back over all of them. It then times ``read_tail`` (pages of growing size)
and, as the baseline in the same run, the record-by-record scan it replaced
(one ``get`` per record), alternating, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import anyio

from runkit._backends import BACKENDS, run_arguments
from runkit.engine.streams import (
    StreamRecord,
    decode_stream_record,
    encode_stream_record,
    read_tail,
)
from runkit.persistence import Journal, RecordNotFound

sys.path.insert(0, str(Path(__file__).resolve().parent))

import targets
from persistence import machine


async def record_by_record(journal: Journal) -> set[str]:
    """The scan before pages: the published IDs, one ``get`` per record."""
    bounds = await journal.bounds()
    last = decode_stream_record(await journal.get(bounds.end - 1))
    published: set[str] = set(last.command_ids)
    position, record = bounds.end - 1, last
    while record.inbox_end > last.inbox_position and position > bounds.begin:
        position -= 1
        try:
            record = decode_stream_record(await journal.get(position))
        except RecordNotFound:
            break
        published.update(record.command_ids)
    return published


async def run_driver(name: str, sizes: list[int], repeat: int) -> list[str]:
    rows = []
    async with targets.load(name).open_target() as target:
        for size in sizes:
            journal = await target.provider.journals.open(f"takeover-{uuid.uuid4()}/stream/0")
            for position in range(size):
                record = StreamRecord(
                    first_offset=0,
                    inbox_position=0,
                    inbox_end=position + 1,
                    written_at=datetime.now(UTC),
                    writer="previous-owner",
                    command_ids=(str(uuid.uuid4()),),
                )
                await journal.append(position, encode_stream_record(record))
            paged: list[float] = []
            single: list[float] = []
            for _ in range(repeat):
                start = time.perf_counter()
                tail = await read_tail(journal)
                paged.append(time.perf_counter() - start)
                start = time.perf_counter()
                found = await record_by_record(journal)
                single.append(time.perf_counter() - start)
                assert tail.published == found, "the scans disagree"
            p, s = statistics.median(paged), statistics.median(single)
            rows.append(f"| {name} | {size:,} | {p * 1000:,.1f} | {s * 1000:,.1f} | {p / s:.3f} |")
            await journal.close()
    return rows


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}; backend {args.backend}; medians of {args.repeat}", flush=True)
    sizes = [int(n) for n in args.records.split(",")]
    rows = []
    for name in args.drivers.split(","):
        rows += await run_driver(name, sizes, args.repeat)
    print()
    print("| driver | records scanned | paged scan ms | record-by-record ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--drivers",
        default="memory,postgres",
        help=f"comma-separated targets (available: {', '.join(targets.available())})",
    )
    parser.add_argument("--records", default="100,3000", help="comma-separated scan lengths")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", default="asyncio", choices=BACKENDS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    anyio.run(main, arguments, **run_arguments(arguments.backend))
