"""``bank-demo``: run the bank's scenario through ``runkit.Engine`` and print the read models.

The scenario (:data:`SCENARIO`) is a list of :class:`Step` values: a command
and the events that conclude it. :func:`run_on_engine` starts an engine (on
the embedded memory driver unless told otherwise), executes each step with
event observers, checks that exactly the expected outcome happened, waits
for both projections to catch up, and stops the engine. :func:`run_scenario`
runs the same steps through :class:`bank.testing.Dispatcher` (breadth-first,
in-process, no engine), the reference the engine's results are compared with
(``bank-demo --dispatcher``).

The helpers :func:`execute_step` and :func:`wait_for_projections` are also
used by the bank's end-to-end tests and by ``benchmarks/engine.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO, cast

import anyio
import attrs

import dogma
import runkit
from runkit import ConfigurationError
from runkit.config import ApplicationConfig, HandlerKind, RouteKind
from runkit.persistence import (
    Provider,
    StoreUnavailable,
    provider_from_url,
    redact_url,
    url_problems,
)
from runkit_memory import MemoryProvider

from .app import App
from .messages import (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    AccountOpened,
    CustomerAcquired,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DebitFailureReason,
    Deposit,
    DepositApproved,
    DepositStarted,
    OpenAccount,
    OpenAccountForNewCustomer,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransactionType,
    Transfer,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    TransferStarted,
    Withdraw,
    WithdrawalApproved,
    WithdrawalDeclined,
    WithdrawalStarted,
    format_amount,
)
from .projections import ReadDB, queries
from .testing import Dispatcher

__all__ = [
    "DEMO_TIME",
    "EVENT_TYPES",
    "OUTCOME_TYPES",
    "SCENARIO",
    "Step",
    "StepFailed",
    "execute_step",
    "main",
    "print_read_models",
    "run_on_engine",
    "run_scenario",
    "wait_for_projections",
]

DEMO_TIME = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
"""When the scenario happens: every transaction is scheduled for this time."""

ANNA = "7c5f2f4e-3d0a-4c36-9d1e-0f6a2b8e4a11"
BOB = "a3b9d0c2-58e1-4f7b-8a64-2c1d9e7f5b22"
ANNA_EVERYDAY = "100000001"
ANNA_SAVINGS = "100000002"
BOB_EVERYDAY = "100000003"

EVENT_TYPES: tuple[type[dogma.Event], ...] = (
    AccountCredited,
    AccountDebitDeclined,
    AccountDebited,
    AccountOpened,
    CustomerAcquired,
    DailyDebitLimitConsumed,
    DailyDebitLimitExceeded,
    DepositApproved,
    DepositStarted,
    ThirdPartyAccountCredited,
    ThirdPartyAccountCreditFailed,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
    TransferStarted,
    WithdrawalApproved,
    WithdrawalDeclined,
    WithdrawalStarted,
)
"""Every event of the bank: a step observes all of them."""

OUTCOME_TYPES: tuple[type[dogma.Event], ...] = (
    CustomerAcquired,
    AccountOpened,
    DepositApproved,
    WithdrawalApproved,
    WithdrawalDeclined,
    TransferApproved,
    TransferDeclined,
    TransferFailed,
)
"""Events that conclude a step; one that a step does not expect fails it at once."""


@attrs.frozen
class Step:
    """One step of the scenario: a command and the events that conclude it.

    Attributes:
        title: What the step shows, for people.
        command: The command to execute.
        outcome: The events that conclude the step, in any order. The step
            is done once every one of them has been recorded.
    """

    title: str
    command: dogma.Command
    outcome: tuple[dogma.Event, ...] = ()


class StepFailed(Exception):
    """A step's expected outcome did not happen (another did, or none in time)."""


def _new_customer(customer_id: str, name: str, account_id: str) -> Step:
    return Step(
        f"{name} joins the bank",
        OpenAccountForNewCustomer(
            customer_id=customer_id,
            customer_name=name,
            account_id=account_id,
            account_name="Everyday",
        ),
        (
            CustomerAcquired(
                customer_id=customer_id,
                customer_name=name,
                account_id=account_id,
                account_name="Everyday",
            ),
            AccountOpened(customer_id=customer_id, account_id=account_id, account_name="Everyday"),
        ),
    )


def _transfer(
    title: str, tx: str, source: str, target: str, amount: int, *outcome: dogma.Event
) -> Step:
    third_party = not target.startswith("1000")
    return Step(
        title,
        Transfer(
            transaction_id=tx,
            from_account_id=source,
            to_account_id=target,
            to_third_party_bank=third_party,
            amount=amount,
            scheduled_time=DEMO_TIME,
        ),
        outcome
        or (
            TransferApproved(
                transaction_id=tx, from_account_id=source, to_account_id=target, amount=amount
            ),
        ),
    )


SCENARIO: tuple[Step, ...] = (
    _new_customer(ANNA, "Anna Smith", ANNA_EVERYDAY),
    Step(
        "Anna opens a savings account",
        OpenAccount(customer_id=ANNA, account_id=ANNA_SAVINGS, account_name="Savings"),
        (AccountOpened(customer_id=ANNA, account_id=ANNA_SAVINGS, account_name="Savings"),),
    ),
    _new_customer(BOB, "Bob Jones", BOB_EVERYDAY),
    Step(
        "Anna deposits $10000.00",
        Deposit(transaction_id="D-0001", account_id=ANNA_EVERYDAY, amount=1_000_000),
        (DepositApproved(transaction_id="D-0001", account_id=ANNA_EVERYDAY, amount=1_000_000),),
    ),
    Step(
        "Bob deposits $250.00",
        Deposit(transaction_id="D-0002", account_id=BOB_EVERYDAY, amount=25_000),
        (DepositApproved(transaction_id="D-0002", account_id=BOB_EVERYDAY, amount=25_000),),
    ),
    Step(
        "Anna withdraws $200.00",
        Withdraw(
            transaction_id="W-0001",
            account_id=ANNA_EVERYDAY,
            amount=20_000,
            scheduled_time=DEMO_TIME,
        ),
        (WithdrawalApproved(transaction_id="W-0001", account_id=ANNA_EVERYDAY, amount=20_000),),
    ),
    _transfer("Anna transfers $500.00 to Bob", "T-0001", ANNA_EVERYDAY, BOB_EVERYDAY, 50_000),
    _transfer(
        "Anna tries to move $8500.00 to savings: over her $9000.00 daily limit",
        "T-0002",
        ANNA_EVERYDAY,
        ANNA_SAVINGS,
        850_000,
        TransferDeclined(
            transaction_id="T-0002",
            from_account_id=ANNA_EVERYDAY,
            to_account_id=ANNA_SAVINGS,
            amount=850_000,
            reason=DebitFailureReason.DAILY_DEBIT_LIMIT_EXCEEDED,
        ),
    ),
    Step(
        "Bob tries to withdraw $1000.00: more than he has",
        Withdraw(
            transaction_id="W-0002",
            account_id=BOB_EVERYDAY,
            amount=100_000,
            scheduled_time=DEMO_TIME,
        ),
        (
            WithdrawalDeclined(
                transaction_id="W-0002",
                account_id=BOB_EVERYDAY,
                amount=100_000,
                reason=DebitFailureReason.INSUFFICIENT_FUNDS,
            ),
        ),
    ),
    _transfer(
        "Anna sends $50.00 to another bank's account 987654321",
        "T-0003",
        ANNA_EVERYDAY,
        "987654321",
        5_000,
    ),
    _transfer(
        "Anna sends $75.00 to ACME-42, which the other bank does not know: refunded",
        "T-0004",
        ANNA_EVERYDAY,
        "ACME-42",
        7_500,
        TransferFailed(
            transaction_id="T-0004",
            from_account_id=ANNA_EVERYDAY,
            to_account_id="ACME-42",
            amount=7_500,
        ),
        AccountCredited(
            transaction_id="T-0004",
            account_id=ANNA_EVERYDAY,
            transaction_type=TransactionType.TRANSFER,
            amount=7_500,
        ),
    ),
)
"""The demo's steps, in order."""


async def run_scenario(
    app: App, steps: Sequence[Step] = SCENARIO, *, out: TextIO | None = None, verbose: bool = False
) -> None:
    """Run ``steps`` through the in-process dispatcher (no engine), printing outcomes to ``out``."""
    out = sys.stdout if out is None else out
    dispatcher = Dispatcher(app, now=DEMO_TIME, enable_all=True)
    for number, step in enumerate(steps, 1):
        print(f"{number:>2}. {step.title}", file=out)
        for event in await dispatcher.execute_command(step.command):
            if verbose or type(event) in OUTCOME_TYPES or event in step.outcome:
                print(f"      {event.message_description()}", file=out)


async def execute_step(
    executor: dogma.CommandExecutor,
    step: Step,
    *,
    timeout: float = 10.0,
    idempotency_key: str | None = None,
) -> list[dogma.Event]:
    """Execute ``step.command`` and wait until every event of ``step.outcome`` is recorded.

    Returns every event of the command's causal chain observed meanwhile, in
    the order observed (events of different partitions arrive in any order).

    Raises:
        StepFailed: an event of :data:`OUTCOME_TYPES` that the step does not
            expect was recorded, the engine reported that the outcome can no
            longer complete, or it was not complete within ``timeout`` seconds.
    """
    missing = list(step.outcome)
    seen: list[dogma.Event] = []

    async def observe(event: dogma.Event) -> bool:
        seen.append(event)
        if event in missing:
            missing.remove(event)
        elif type(event) in OUTCOME_TYPES and event not in step.outcome:
            raise StepFailed(
                f"{step.title}: expected {_describe(step.outcome)}, "
                f"but the engine recorded: {event.message_description()}"
            )
        return not missing

    observers = [dogma.observe(t, observe) for t in EVENT_TYPES]
    with anyio.move_on_after(timeout) as scope:
        try:
            await executor.execute_command(
                step.command,
                idempotency_key=idempotency_key,
                observers=observers if step.outcome else (),
            )
        except dogma.EventObserverNotSatisfied as exc:
            # The engine knows the rest of the outcome can no longer happen.
            raise StepFailed(
                f"{step.title}: cannot complete; still waiting for {_describe(missing)} "
                f"(recorded: {_describe(seen) or 'nothing'}): {exc}"
            ) from exc
    if scope.cancelled_caught:
        raise StepFailed(
            f"{step.title}: not done within {timeout:g} s; still waiting for "
            f"{_describe(missing)} (recorded so far: {_describe(seen) or 'nothing'})"
        )
    return seen


def _describe(events: Iterable[dogma.Event]) -> str:
    return "; ".join(e.message_description() for e in events)


class _Projection(Protocol):
    async def checkpoint_offset(self, stream_id: str) -> int: ...


async def wait_for_projections(
    engine: runkit.Engine,
    app: object,
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
) -> None:
    """Wait until every enabled projection of ``app`` has applied every event routed to it.

    For each partition it finds the offset of the last event each projection
    handles in the partition's stream, then waits for the projection's
    checkpoint (ADR-26: the next offset it expects) to pass it; it repeats
    until no new event arrived meanwhile. Call it once the commands of
    interest are done (e.g. after :func:`execute_step`).

    Raises:
        TimeoutError: the projections did not catch up within ``timeout`` seconds.
    """
    config = next(c for c in engine.applications if c.app is app or c.identity.key == app)
    runtime = await engine.runtime(config.identity.key)
    lag = _ProjectionLag(config, runtime.provider, runtime.partition_count)
    with anyio.fail_after(timeout):
        # Polled: the checkpoints live in the projections' own stores.
        while True:
            if await lag.caught_up():
                return
            await anyio.sleep(interval)


class _ProjectionLag:
    """Reads the partition streams incrementally and compares projections' checkpoints."""

    def __init__(self, config: ApplicationConfig, provider: Provider, partitions: int) -> None:
        from runkit.engine.partitions import partition_id

        self._key = config.identity.key
        self._provider = provider
        self._streams = [partition_id(self._key, i) for i in range(partitions)]
        self._projections = [
            (
                cast(_Projection, h.handler),
                frozenset(t.id for t in h.types_of(RouteKind.HANDLES_EVENT)),
            )
            for h in config.enabled_handlers(HandlerKind.PROJECTION)
        ]
        # Per partition: next journal position to read, and per projection the
        # checkpoint it must reach (last routed offset + 1).
        self._position = [0] * partitions
        self._targets = [[0] * len(self._projections) for _ in range(partitions)]

    async def caught_up(self) -> bool:
        done = True
        for index, stream_id in enumerate(self._streams):
            await self._scan(index)
            for (handler, _), target in zip(self._projections, self._targets[index], strict=True):
                if target and await handler.checkpoint_offset(stream_id) < target:
                    done = False
        # A last scan: events appended while we compared keep us waiting.
        for index in range(len(self._streams)):
            if await self._scan(index):
                done = False
        return done

    async def _scan(self, index: int) -> bool:
        from runkit.engine.streams import decode_stream_record

        grew = False
        async with await self._provider.journals.open(f"{self._key}/stream/{index}") as journal:
            bounds = await journal.bounds()
            start = max(self._position[index], bounds.begin)
            if start >= bounds.end:
                return False
            async for position, data in journal.range(start):
                record = decode_stream_record(data)
                for i, envelope in enumerate(record.events):
                    for p, (_, routed) in enumerate(self._projections):
                        if envelope.type_id in routed:
                            self._targets[index][p] = record.first_offset + i + 1
                            grew = True
                self._position[index] = position + 1
        return grew


async def run_on_engine(
    app: App,
    steps: Sequence[Step] = SCENARIO,
    *,
    persistence: str | Provider | None = None,
    out: TextIO | None = None,
    verbose: bool = False,
    timeout: float = 10.0,
) -> None:
    """Run ``steps`` through a ``runkit.Engine``, printing what each does to ``out``.

    Args:
        app: The bank (its read models go to ``app.read_db``).
        steps: The steps to run, in order.
        persistence: A persistence URL or provider; by default a new silo of
            the embedded memory driver. Its namespace must not already hold
            this scenario (transaction IDs are unique for ever).
        out: Where to print (default: standard output).
        verbose: Print every event of each step, not just its outcome.
        timeout: Seconds each step, and the projections' catch-up, may take.

    Raises:
        StepFailed: a step's expected outcome did not happen (see
            :func:`execute_step`), or the projections did not catch up.
    """
    out = sys.stdout if out is None else out
    owned = not isinstance(persistence, Provider)  # a provider we made, we close
    if persistence is None:
        # Not through the URL: resolving one loads every installed driver plugin,
        # and some import their client libraries (boto3) eagerly, which takes seconds.
        provider: Provider = MemoryProvider(f"bank-demo-{uuid.uuid4()}")
    elif isinstance(persistence, str):
        provider = provider_from_url(persistence)
    else:
        provider = persistence
    try:
        engine = runkit.Engine(
            runkit.with_application(app), runkit.with_persistence_provider(provider)
        )
        executor = engine.executor_for(app)
        failure: StepFailed | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            try:
                for number, step in enumerate(steps, 1):
                    print(f"{number:>2}. {step.title}", file=out)
                    seen = await execute_step(executor, step, timeout=timeout)
                    for event in seen if verbose else step.outcome:
                        print(f"      {event.message_description()}", file=out)
                try:
                    await wait_for_projections(engine, app, timeout=timeout)
                except TimeoutError:
                    raise StepFailed(
                        f"the projections did not catch up within {timeout:g} s"
                    ) from None
            except StepFailed as exc:
                failure = exc  # raised below, not wrapped in the task group's ExceptionGroup
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
    finally:
        if owned:
            with anyio.CancelScope(shield=True):
                await provider.close()


def print_read_models(db: ReadDB | str | os.PathLike[str], *, out: TextIO | None = None) -> None:
    """Print the customers, accounts and ledger read models as plain-text tables (blocking)."""
    out = sys.stdout if out is None else out
    read_db = db if isinstance(db, ReadDB) else ReadDB(db)
    conn = read_db.connect()
    try:
        _print_tables(conn, out)
    finally:
        conn.close()


def _print_tables(conn: sqlite3.Connection, out: TextIO) -> None:
    customers = queries.customers(conn)
    names = {c.id: c.name for c in customers}
    accounts = queries.accounts(conn)
    account_names = {
        a.id: f"{names.get(a.customer_id, a.customer_id)} / {a.name}" for a in accounts
    }

    _table(out, "Customers", ("ID", "Name"), [(c.id, c.name) for c in customers])
    _table(
        out,
        "Accounts",
        ("Account", "Customer", "Name", "Balance"),
        [
            (a.id, names.get(a.customer_id, a.customer_id), a.name, format_amount(a.balance))
            for a in accounts
        ],
        right=(3,),
    )
    _table(
        out,
        "Ledger",
        ("Account", "Transaction", "Description", "Debit", "Credit", "Balance"),
        [
            (
                account_names.get(e.account_id, e.account_id),
                e.transaction_id,
                e.description,
                format_amount(e.debit) if e.debit else "",
                format_amount(e.credit) if e.credit else "",
                format_amount(e.balance),
            )
            for e in queries.ledger(conn)
        ],
        right=(3, 4, 5),
    )


def _table(
    out: TextIO,
    title: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[int] = (),
) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    print(f"\n{title}", file=out)
    print(line(header), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for row in rows:
        print(line(row), file=out)
    if not rows:
        print("(none)", file=out)


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _setup_problem(exc: BaseException) -> BaseException | None:
    """The one configuration, store or read-model error *exc* stands for, if that is what it is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ConfigurationError | StoreUnavailable | sqlite3.Error):
        return exc
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status (1 if a step's outcome did not happen)."""
    parser = argparse.ArgumentParser(
        prog="bank-demo",
        description="Run the bank's scenario through runkit.Engine and print its read models.",
    )
    parser.add_argument(
        "--db",
        type=Path,
        help="SQLite file for the read models (default: a new temporary file)",
    )
    parser.add_argument("--verbose", action="store_true", help="print every event recorded")
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library to run on (default: asyncio)",
    )
    parser.add_argument(
        "--persistence",
        metavar="URL",
        help="persistence URL with an empty namespace (default: a new memory:/// silo)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="longest a step (or the projections' catch-up) may take (default: 10)",
    )
    parser.add_argument(
        "--dispatcher",
        action="store_true",
        help="run the steps through bank.testing.Dispatcher instead of the engine",
    )
    args = parser.parse_args(argv)
    if args.dispatcher and args.persistence:
        parser.error("--persistence does not apply to --dispatcher")
    if args.persistence:
        problems = url_problems(args.persistence)
        if problems:
            parser.error(f"--persistence: {'; '.join(problems)}")

    with tempfile.TemporaryDirectory(prefix="bank-demo-") as tmp:
        path = args.db if args.db is not None else Path(tmp) / "read-models.sqlite3"
        app = App(path)
        if args.dispatcher:
            where = "the in-process dispatcher"
        else:
            url = redact_url(args.persistence) if args.persistence else "the memory driver"
            where = f"runkit.Engine on {url}"

        async def run() -> None:
            if args.dispatcher:
                await run_scenario(app, verbose=args.verbose)
            else:
                await run_on_engine(
                    app, persistence=args.persistence, verbose=args.verbose, timeout=args.timeout
                )

        print(f"Running the bank scenario through {where} ({args.backend})")
        print(f"Read models: {path}\n")
        started = time.perf_counter()
        try:
            anyio.run(run, backend=args.backend)
        except StepFailed as exc:
            print(f"bank-demo: {exc}", file=sys.stderr)
            return 1
        except BaseException as exc:
            # A store or read-model file the demo cannot use: say which, in one line.
            problem = _setup_problem(exc)
            if problem is None:
                raise
            print(f"bank-demo: {problem}", file=sys.stderr)
            return 2
        elapsed = time.perf_counter() - started
        print(f"\n{len(SCENARIO)} steps done and the read models caught up in {elapsed:.2f} s")
        print_read_models(app.read_db)
    return 0


if __name__ == "__main__":
    sys.exit(main())
