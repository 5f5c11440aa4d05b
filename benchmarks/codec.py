"""Per-message CPU costs: dogma's JSON codec (pure vs msgspec) and new message IDs.

Usage::

    uv run python benchmarks/codec.py [--seconds S]

For a few bank messages it measures, in one run, microseconds per
``marshal_binary()`` and per ``unmarshal_binary()`` with the pure-Python
reference back-end and with the msgspec back-end (``dogma-api[fast]``), and
the speed-up. Both back-ends produce the same bytes; the script checks that
before timing. A second table gives microseconds per new random message ID:
``str(uuid.uuid4())``, as the engine makes them, against
``runkit.engine.ids.new_id()`` and other ways of making one.

Each figure is the best of five repeats of a loop lasting about ``S / 5``
seconds (so noise from other processes only inflates it).
"""

from __future__ import annotations

import argparse
import os
import time
import timeit
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import bank.messages as bm
import dogma
from dogma import _codec
from runkit.engine.ids import new_id

MESSAGES: list[dogma.Message] = [
    bm.DepositStarted(
        transaction_id="d7b4ad43-5a4b-4fa7-a6a4-51f8a4a0c2f1", account_id="acct-0001", amount=1500
    ),
    bm.AccountCredited(
        transaction_id="d7b4ad43-5a4b-4fa7-a6a4-51f8a4a0c2f1",
        account_id="acct-0001",
        transaction_type=bm.TransactionType.DEPOSIT,
        amount=1500,
    ),
    bm.AccountDebited(
        transaction_id="0c36c1c3-06ff-4a56-9d1e-9e0f1c6f3a20",
        account_id="acct-0001",
        transaction_type=bm.TransactionType.WITHDRAWAL,
        amount=2500,
        scheduled_time=datetime(2026, 12, 3, 9, 30, 15, 123456, tzinfo=UTC),
    ),
    bm.TransferStarted(
        transaction_id="5a0f4c9e-8a43-4e0e-9b25-38f4a7f0e6d1",
        from_account_id="acct-0001",
        to_account_id="acct-0002",
        amount=10000,
        scheduled_time=datetime(2026, 12, 3, 9, 30, 15, tzinfo=UTC),
    ),
    bm.Deposit(
        transaction_id="d7b4ad43-5a4b-4fa7-a6a4-51f8a4a0c2f1", account_id="acct-0001", amount=1500
    ),
]


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Best of five repeats of a loop of about ``seconds / 5``, in µs per call."""
    number = max(1, int(seconds / 5 / max(timeit.timeit(fn, number=100) / 100, 1e-9)))
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def measure(seconds: float) -> list[tuple[str, str, float, float]]:
    """Rows of (message, operation, pure µs, msgspec µs)."""
    rows = []
    for message in MESSAGES:
        cls = type(message)
        _codec.use_pure_backend(True)
        data = message.marshal_binary()
        pure_enc = per_call_us(message.marshal_binary, seconds)
        pure_dec = per_call_us(lambda: cls.unmarshal_binary(data), seconds)  # noqa: B023
        _codec.use_pure_backend(False)
        if message.marshal_binary() != data or cls.unmarshal_binary(data) != message:
            raise SystemExit(f"the back-ends disagree on {cls.__name__}")
        if _codec._fast_codec(cls) is None:
            raise SystemExit(f"msgspec is not installed or cannot compile {cls.__name__}")
        fast_enc = per_call_us(message.marshal_binary, seconds)
        fast_dec = per_call_us(lambda: cls.unmarshal_binary(data), seconds)  # noqa: B023
        rows.append((cls.__name__, "encode", pure_enc, fast_enc))
        rows.append((cls.__name__, "decode", pure_dec, fast_dec))
    return rows


ID_MAKERS: dict[str, Callable[[], str]] = {
    "str(uuid.uuid4())": lambda: str(uuid.uuid4()),
    "str(UUID(bytes=os.urandom(16), version=4))": lambda: str(
        uuid.UUID(bytes=os.urandom(16), version=4)
    ),
    "ids.new_id()": new_id,
    "os.urandom(16).hex() (no formatting; a floor)": lambda: os.urandom(16).hex(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure (default 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = measure(args.seconds)
    print(f"{'message':<18} {'op':<7} {'pure µs':>9} {'msgspec µs':>11} {'speed-up':>9}")
    for name, op, pure, fast in rows:
        print(f"{name:<18} {op:<7} {pure:>9.2f} {fast:>11.2f} {pure / fast:>8.1f}x")
    print()
    baseline = per_call_us(ID_MAKERS["str(uuid.uuid4())"], args.seconds)
    print(f"{'new message ID':<46} {'µs':>6} {'speed-up':>9}")
    for label, make in ID_MAKERS.items():
        cost = per_call_us(make, args.seconds)
        print(f"{label:<46} {cost:>6.2f} {baseline / cost:>8.1f}x")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
