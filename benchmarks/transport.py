"""Latency and throughput of the node transport on loopback, asyncio and trio.

Usage::

    uv run python benchmarks/transport.py [--calls N] [--backend asyncio|trio|both]

For each backend, in one process (server and client share the event loop and
the CPU, as two nodes on one host would not), measures:

=================  ============================================================
unary c=1          N sequential 32-byte calls: p50/p99 latency and calls/s
unary c=64         64 tasks sharing one connection, 4N calls in total
unary c=1, busy    N/10 sequential calls while 10 other tasks each spin for
                   0.2 ms per turn of the event loop (a turn takes ~2 ms, as
                   on a loaded node): the round trip in turns of the loop
deferred c=1/c=64  the same with a deferred handler (answered through a Reply,
                   no task per request on the server)
stream             one stream of 20N items (window 256): items/s
=================  ============================================================

``NodeTransport`` runs over mutual TLS 1.3 (self-signed identities, fingerprint
check, client proof). The ``raw`` rows are the same frames over a plain anyio
TCP stream with a minimal multiplexing client and server (no TLS, handshake,
flow control, keepalive or per-request tasks): the floor this design can reach.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel

from runkit.transport import NodeTransport, PeerInfo, Reply, TlsIdentity
from runkit.transport._frames import FrameDecoder, Request, Response, encode_frame

PAYLOAD = b"x" * 32
BUSY_TASKS, BUSY_TURN = 10, 0.0002  # the busy case: 10 tasks x 0.2 ms per loop turn
Call = Callable[[bytes], Awaitable[bytes]]


async def echo(peer: PeerInfo, payload: bytes) -> bytes:
    return payload


def echo_deferred(peer: PeerInfo, payload: bytes, reply: Reply) -> None:
    reply.ok(payload)


async def items(peer: PeerInfo, payload: bytes) -> AsyncIterator[bytes]:
    for _ in range(int(payload)):
        yield PAYLOAD


async def measure(call: Call, calls: int, concurrency: int) -> dict[str, float]:
    for _ in range(200):  # warm-up
        await call(PAYLOAD)
    latencies: list[float] = []
    per_task = calls // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            started = time.perf_counter()
            await call(PAYLOAD)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50": cuts[49] * 1e6, "p99": cuts[98] * 1e6, "rate": len(latencies) / elapsed}


async def measure_busy(call: Call, calls: int) -> dict[str, float]:
    """``measure`` at c=1 while other tasks keep every turn of the loop ~2 ms long."""
    stop = anyio.Event()

    async def spin() -> None:
        while not stop.is_set():
            until = time.perf_counter() + BUSY_TURN
            while time.perf_counter() < until:
                pass
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for _ in range(BUSY_TASKS):
            tg.start_soon(spin)
        row = await measure(call, calls, 1)
        stop.set()
    return row


async def bench_transport(calls: int) -> list[tuple[str, dict[str, float]]]:
    a, b = TlsIdentity.self_signed("bench-a"), TlsIdentity.self_signed("bench-b")
    members = {a.fingerprint, b.fingerprint}
    server = NodeTransport(
        node_id="bench-b",
        identity=b,
        authenticate=members.__contains__,
        unary={"echo": echo},
        streams={"items": items},
        deferred={"echo_deferred": echo_deferred},
    )
    client = NodeTransport(node_id="bench-a", identity=a, authenticate=members.__contains__)
    rows = []
    async with server, client, anyio.create_task_group() as tg:
        address: str = await tg.start(server.serve, "127.0.0.1:0")

        async def call(payload: bytes) -> bytes:
            return await client.call(address, "echo", payload)

        async def call_deferred(payload: bytes) -> bytes:
            return await client.call(address, "echo_deferred", payload)

        rows.append(("unary c=1", await measure(call, calls, 1)))
        rows.append(("unary c=64", await measure(call, calls * 4, 64)))
        rows.append(("unary c=1, busy", await measure_busy(call, calls // 10)))
        rows.append(("deferred c=1", await measure(call_deferred, calls, 1)))
        rows.append(("deferred c=64", await measure(call_deferred, calls * 4, 64)))
        count = calls * 20
        started = time.perf_counter()
        async with client.stream(address, "items", str(count).encode(), window=256) as stream:
            received = sum([1 async for _ in stream])
        assert received == count
        rows.append(("stream", {"rate": count / (time.perf_counter() - started)}))
        tg.cancel_scope.cancel()
    return rows


async def bench_raw(calls: int) -> list[tuple[str, dict[str, float]]]:
    async def serve_one(stream: anyio.abc.SocketStream) -> None:
        decoder = FrameDecoder()
        async with stream:
            try:
                async for chunk in stream:
                    out = [
                        encode_frame(Response(id=f.id, payload=f.payload))
                        for f in decoder.feed(chunk)
                        if isinstance(f, Request)
                    ]
                    await stream.send(b"".join(out))
            except anyio.BrokenResourceError:
                pass

    rows = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve_one)
        stream = await anyio.connect_tcp("127.0.0.1", port)
        waiting: dict[int, tuple[anyio.Event, list[bytes]]] = {}
        ids = itertools.count(1)
        lock = anyio.Lock()

        async def reader() -> None:
            decoder = FrameDecoder()
            async for chunk in stream:
                for frame in decoder.feed(chunk):
                    assert isinstance(frame, Response)
                    event, slot = waiting.pop(frame.id)
                    slot.append(frame.payload)
                    event.set()

        async def call(payload: bytes) -> bytes:
            request_id, event = next(ids), anyio.Event()
            slot: list[bytes] = []
            waiting[request_id] = (event, slot)
            frame = encode_frame(Request(id=request_id, method="echo", payload=payload))
            async with lock:
                await stream.send(frame)
            await event.wait()
            return slot[0]

        tg.start_soon(reader)
        rows.append(("raw unary c=1", await measure(call, calls, 1)))
        rows.append(("raw unary c=64", await measure(call, calls * 4, 64)))
        tg.cancel_scope.cancel()
    await stream.aclose()
    return rows


async def run(calls: int) -> list[tuple[str, dict[str, float]]]:
    return [*(await bench_raw(calls)), *(await bench_transport(calls))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", choices=["asyncio", "trio", "both"], default="both")
    args = parser.parse_args()
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(f"{'backend':8} {'case':16} {'p50 us':>8} {'p99 us':>8} {'per s':>10}")
    for backend in backends:
        for case, row in anyio.run(run, args.calls, backend=backend):
            p50 = f"{row['p50']:.0f}" if "p50" in row else "-"
            p99 = f"{row['p99']:.0f}" if "p99" in row else "-"
            print(f"{backend:8} {case:16} {p50:>8} {p99:>8} {row['rate']:>10,.0f}")


if __name__ == "__main__":
    main()
