"""A small application written against the protocols.

mypy checks that each handler, root, scope and configurer below satisfies
its protocol (the assignments to protocol-typed names fail type-checking
otherwise); the tests drive them through minimal fakes of an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

import dogma

REG = dogma.MessageTypeRegistry()
APP_KEY = "22028264-0bca-43e1-8d9d-cd094efb10b7"


@dogma.register_command("0cfac865-a1d9-4fd2-b085-f8fce0053795", registry=REG)
@attrs.frozen(kw_only=True)
class Deposit(dogma.Command):
    account_id: str
    amount: int

    def validate(self, scope: dogma.ValidationScope) -> None:
        if self.amount < 1:
            raise dogma.ValidationError("deposit: amount must be positive")


@dogma.register_event("f3091f46-7d36-4e5f-b0ab-fb96029e5d7a", registry=REG)
@attrs.frozen(kw_only=True)
class AccountCredited(dogma.Event):
    account_id: str
    amount: int


@dogma.register_deadline("b5474f89-e985-4661-b85b-645347a4a645", registry=REG)
@attrs.frozen(kw_only=True)
class Remind(dogma.Deadline):
    account_id: str


@attrs.define
class Account(dogma.NoSnapshotBehavior):
    balance: int = 0

    def apply_event(self, event: dogma.Event) -> None:
        match event:
            case AccountCredited(amount=amount):
                self.balance += amount
            case _:
                pass


class AccountHandler:
    def configure(self, c: dogma.AggregateConfigurer) -> None:
        c.identity("account", "fcce9a78-23a3-4211-b608-ecbe21ea446f")
        c.routes(
            dogma.handles_command(Deposit, registry=REG),
            dogma.records_event(AccountCredited, registry=REG),
        )

    def new(self) -> Account:
        return Account()

    def route_command_to_instance(self, command: dogma.Command) -> str:
        match command:
            case Deposit(account_id=account_id):
                return account_id
            case _:
                raise dogma.UnexpectedMessage(command)

    def handle_command(
        self, root: Account, scope: dogma.AggregateCommandScope[Account], command: dogma.Command
    ) -> None:
        match command:
            case Deposit(account_id=account_id, amount=amount):
                scope.record_event(AccountCredited(account_id=account_id, amount=amount))
                scope.log("credited %d, balance now %d", amount, root.balance)
            case _:
                raise dogma.UnexpectedMessage(command)


@attrs.define
class ReminderRoot:
    reminders: int = 0

    def process_instance_description(self, ended: bool) -> str:
        return f"{self.reminders} reminders" + (" (ended)" if ended else "")

    def marshal_binary(self) -> bytes:
        return str(self.reminders).encode()

    def unmarshal_binary(self, data: bytes) -> None:
        self.reminders = int(data)


class ReminderProcess:
    def configure(self, c: dogma.ProcessConfigurer) -> None:
        c.identity("reminder", "35afbe82-24c1-4868-a689-c2ec96c2e953")
        c.routes(
            dogma.handles_event(AccountCredited, registry=REG),
            dogma.executes_command(Deposit, registry=REG),
            dogma.schedules_deadline(Remind, registry=REG),
        )

    def new(self) -> ReminderRoot:
        return ReminderRoot()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        if isinstance(event, AccountCredited):
            return event.account_id
        raise dogma.UnexpectedMessage(event)

    async def handle_event(
        self,
        root: ReminderRoot,
        scope: dogma.ProcessEventScope[ReminderRoot],
        event: dogma.Event,
    ) -> None:
        def count(r: ReminderRoot) -> None:
            r.reminders += 1

        scope.mutate(count)
        scope.schedule_deadline(Remind(account_id=scope.instance_id), scope.recorded_at)

    async def handle_deadline(
        self,
        root: ReminderRoot,
        scope: dogma.ProcessDeadlineScope[ReminderRoot],
        deadline: dogma.Deadline,
    ) -> None:
        scope.execute_command(Deposit(account_id=scope.instance_id, amount=1))
        scope.end()


class Notifier(dogma.NoDeadlineMessagesBehavior, dogma.StatelessProcessBehavior):
    def configure(self, c: dogma.ProcessConfigurer) -> None:
        c.identity("notifier", "23f70d2b-a289-4e0f-8a83-c0c6a69d11d9")
        c.routes(dogma.handles_event(AccountCredited, registry=REG))
        c.disable()

    async def route_event_to_instance(self, event: dogma.Event) -> str | None:
        return None

    async def handle_event(
        self,
        root: dogma.StatelessProcessRoot,
        scope: dogma.ProcessEventScope[dogma.StatelessProcessRoot],
        event: dogma.Event,
    ) -> None:
        pass


class Bank:
    async def handle_command(
        self, scope: dogma.IntegrationCommandScope, command: dogma.Command
    ) -> None:
        if isinstance(command, Deposit):
            scope.record_event(
                AccountCredited(account_id=command.account_id, amount=command.amount)
            )

    def configure(self, c: dogma.IntegrationConfigurer) -> None:
        c.identity("bank", "f2a7e4b1-9c3d-4f8a-b6e5-1d0c2a9f7e3b")
        c.routes(dogma.handles_command(Deposit, registry=REG))
        c.concurrency_preference(dogma.ConcurrencyPreference.MINIMIZE)


class Ledger(dogma.NoCompactBehavior, dogma.NoResetBehavior):
    def __init__(self) -> None:
        self.checkpoints: dict[str, int] = {}
        self.total = 0

    def configure(self, c: dogma.ProjectionConfigurer) -> None:
        c.identity("ledger", "a1b2c3d4-e5f6-7890-abcd-ef1234567890")
        c.routes(dogma.handles_event(AccountCredited, registry=REG))

    async def handle_event(self, scope: dogma.ProjectionEventScope, event: dogma.Event) -> int:
        stored = self.checkpoints.get(scope.stream_id, 0)
        if stored != scope.checkpoint_offset:
            return stored
        if isinstance(event, AccountCredited):
            self.total += event.amount
        self.checkpoints[scope.stream_id] = scope.offset + 1
        return scope.offset + 1

    async def checkpoint_offset(self, stream_id: str) -> int:
        return self.checkpoints.get(stream_id, 0)


class App:
    def __init__(self) -> None:
        self.ledger = Ledger()

    def configure(self, c: dogma.ApplicationConfigurer) -> None:
        c.identity("app", APP_KEY)
        c.routes(
            dogma.via_aggregate(AccountHandler()),
            dogma.via_process(ReminderProcess()),
            dogma.via_process(Notifier()),
            dogma.via_integration(Bank()),
            dogma.via_projection(self.ledger),
        )


# Static conformance: mypy rejects these assignments if a protocol is not met.
_app: dogma.Application = App()
_aggregate: dogma.AggregateMessageHandler[Account] = AccountHandler()
_root: dogma.AggregateRoot = Account()
_process: dogma.ProcessMessageHandler[ReminderRoot] = ReminderProcess()
_stateless: dogma.ProcessMessageHandler[dogma.StatelessProcessRoot] = Notifier()
_process_root: dogma.ProcessRoot = ReminderRoot()
_stateless_root: dogma.ProcessRoot = dogma.StatelessProcessRoot()
_integration: dogma.IntegrationMessageHandler = Bank()
_projection: dogma.ProjectionMessageHandler = Ledger()


# --------------------------------------------------------------------------- fakes


NOW = datetime(2024, 1, 1, tzinfo=UTC)


@attrs.define
class Recorder:
    """Implements every configurer protocol by recording calls."""

    identities: list[tuple[str, str]] = attrs.Factory(list)
    routes_: list[object] = attrs.Factory(list)
    disabled: bool = False
    preference: dogma.ConcurrencyPreference | None = None

    def identity(self, name: str, key: str) -> None:
        self.identities.append(
            (dogma.validate_identity_name(name), dogma.validate_identity_key(key))
        )

    def routes(self, *routes: Any) -> None:
        self.routes_.extend(routes)

    def disable(self) -> None:
        self.disabled = True

    def concurrency_preference(self, preference: dogma.ConcurrencyPreference) -> None:
        self.preference = preference


_configurers: tuple[
    dogma.ApplicationConfigurer,
    dogma.AggregateConfigurer,
    dogma.ProcessConfigurer,
    dogma.IntegrationConfigurer,
    dogma.ProjectionConfigurer,
] = (Recorder(), Recorder(), Recorder(), Recorder(), Recorder())


@attrs.define
class Scope:
    """Implements every scope protocol, buffering what the handler does."""

    root: Any = None
    instance_id: str = "a1"
    recorded_at: datetime = NOW
    scheduled_for: datetime = NOW
    stream_id: str = "5195fe85-eb3f-4121-84b0-be72cbc5722f"
    offset: int = 0
    checkpoint_offset: int = 0
    events: list[dogma.Event] = attrs.Factory(list)
    commands: list[dogma.Command] = attrs.Factory(list)
    deadlines: list[tuple[dogma.Deadline, datetime]] = attrs.Factory(list)
    logs: list[str] = attrs.Factory(list)
    ended: bool = False

    def now(self) -> datetime:
        return NOW

    def log(self, fmt: str, *args: object) -> None:
        self.logs.append(fmt % args)

    def record_event(self, event: dogma.Event) -> None:
        event.validate(dogma.EventValidationScope(is_new=True))
        self.events.append(event)
        if self.root is not None:
            self.root.apply_event(event)

    def mutate(self, fn: Callable[[Any], object]) -> None:
        if self.ended:
            raise RuntimeError("process instance has ended")
        fn(self.root)

    def end(self) -> None:
        self.ended = True

    def execute_command(self, command: dogma.Command) -> None:
        if self.ended:
            raise RuntimeError("process instance has ended")
        command.validate(dogma.CommandValidationScope(is_new=True))
        self.commands.append(command)

    def schedule_deadline(self, deadline: dogma.Deadline, at: datetime) -> None:
        if self.ended:
            raise RuntimeError("process instance has ended")
        self.deadlines.append((deadline, at))


_scopes: tuple[
    dogma.AggregateCommandScope[Account],
    dogma.ProcessEventScope[ReminderRoot],
    dogma.ProcessDeadlineScope[ReminderRoot],
    dogma.IntegrationCommandScope,
    dogma.ProjectionEventScope,
    dogma.ProjectionCompactScope,
    dogma.ProjectionResetScope,
] = (Scope(), Scope(), Scope(), Scope(), Scope(), Scope(), Scope())


class Executor:
    def __init__(self) -> None:
        self.calls: list[tuple[dogma.Command, str | None, Sequence[dogma.EventObserver[Any]]]] = []

    async def execute_command(
        self,
        command: dogma.Command,
        *,
        idempotency_key: str | None = None,
        observers: Sequence[dogma.EventObserver[Any]] = (),
    ) -> None:
        command.validate(dogma.CommandValidationScope(is_new=True))
        self.calls.append((command, idempotency_key, observers))


_executor: dogma.CommandExecutor = Executor()


# --------------------------------------------------------------------------- tests


def test_application_declares_identity_and_handler_routes() -> None:
    c = Recorder()
    App().configure(c)
    assert c.identities == [("app", APP_KEY)]
    assert [type(r) for r in c.routes_] == [
        dogma.AggregateHandlerRoute,
        dogma.ProcessHandlerRoute,
        dogma.ProcessHandlerRoute,
        dogma.IntegrationHandlerRoute,
        dogma.ProjectionHandlerRoute,
    ]


def test_handlers_declare_routes_disable_and_concurrency() -> None:
    c = Recorder()
    App().configure(c)
    recorded = []
    for route in c.routes_:
        hc = Recorder()
        route.handler.configure(hc)  # type: ignore[attr-defined]
        recorded.append(hc)
    assert [type(r) for r in recorded[0].routes_] == [
        dogma.HandlesCommandRoute,
        dogma.RecordsEventRoute,
    ]
    assert [r.type.cls for r in recorded[1].routes_] == [AccountCredited, Deposit, Remind]  # type: ignore[attr-defined]
    assert recorded[2].disabled is True
    assert recorded[3].preference is dogma.ConcurrencyPreference.MINIMIZE
    assert recorded[4].preference is None


def test_aggregate_records_and_applies_events() -> None:
    handler = AccountHandler()
    root = handler.new()
    scope = Scope(root=root)
    command = Deposit(account_id="a1", amount=5)
    assert handler.route_command_to_instance(command) == "a1"
    handler.handle_command(root, scope, command)
    assert scope.events == [AccountCredited(account_id="a1", amount=5)]
    assert root.balance == 5
    assert scope.logs == ["credited 5, balance now 5"]


def test_aggregate_refuses_unexpected_command() -> None:
    class Other(dogma.Command):
        pass

    with pytest.raises(dogma.UnexpectedMessage, match="unexpected message: "):
        AccountHandler().route_command_to_instance(Other())


async def test_process_mutates_schedules_executes_and_ends() -> None:
    handler = ReminderProcess()
    root = handler.new()
    event = AccountCredited(account_id="a1", amount=5)
    assert await handler.route_event_to_instance(event) == "a1"
    scope = Scope(root=root)
    await handler.handle_event(root, scope, event)
    assert root.reminders == 1
    assert scope.deadlines == [(Remind(account_id="a1"), NOW)]
    copy = ReminderRoot()
    copy.unmarshal_binary(root.marshal_binary())
    assert copy == root
    await handler.handle_deadline(root, scope, Remind(account_id="a1"))
    assert scope.commands == [Deposit(account_id="a1", amount=1)]
    assert scope.ended
    assert root.process_instance_description(ended=True) == "1 reminders (ended)"


async def test_integration_records_events() -> None:
    scope = Scope()
    await Bank().handle_command(scope, Deposit(account_id="a1", amount=2))
    assert scope.events == [AccountCredited(account_id="a1", amount=2)]


async def test_projection_applies_each_offset_once() -> None:
    ledger = Ledger()
    event = AccountCredited(account_id="a1", amount=3)
    assert await ledger.handle_event(Scope(offset=0, checkpoint_offset=0), event) == 1
    # A redelivery with a stale checkpoint changes nothing and reports the stored one.
    assert await ledger.handle_event(Scope(offset=0, checkpoint_offset=0), event) == 1
    assert ledger.total == 3
    assert await ledger.checkpoint_offset(Scope().stream_id) == 1
    with pytest.raises(dogma.NotSupported):
        await ledger.reset(Scope())


async def test_executor_receives_keyword_options() -> None:
    executor = Executor()

    async def done(event: AccountCredited) -> bool:
        return True

    observer = dogma.observe(AccountCredited, done, registry=REG)
    await executor.execute_command(
        Deposit(account_id="a1", amount=1), idempotency_key="k1", observers=[observer]
    )
    assert executor.calls == [(Deposit(account_id="a1", amount=1), "k1", [observer])]
    with pytest.raises(dogma.ValidationError, match="amount must be positive"):
        await executor.execute_command(Deposit(account_id="a1", amount=0))


def test_handler_root_and_application_protocols_are_runtime_checkable() -> None:
    assert isinstance(App(), dogma.Application)
    assert isinstance(AccountHandler(), dogma.AggregateMessageHandler)
    assert isinstance(Account(), dogma.AggregateRoot)
    assert isinstance(ReminderProcess(), dogma.ProcessMessageHandler)
    assert isinstance(Notifier(), dogma.ProcessMessageHandler)
    assert isinstance(ReminderRoot(), dogma.ProcessRoot)
    assert isinstance(dogma.StatelessProcessRoot(), dogma.ProcessRoot)
    assert isinstance(Bank(), dogma.IntegrationMessageHandler)
    assert isinstance(Ledger(), dogma.ProjectionMessageHandler)
    assert isinstance(Executor(), dogma.CommandExecutor)
    assert not isinstance(Bank(), dogma.ProjectionMessageHandler)
    assert not isinstance(Ledger(), dogma.AggregateRoot)
