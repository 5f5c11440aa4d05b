"""Fault injection for persistence providers: fail writes before or after they take effect.

Wrap any provider in a ``FaultyProvider`` and describe, in a ``FaultPlan``,
which write calls fail and how::

    plan = FaultPlan(seed=1)
    plan.fail(AFTER, ops={"append"}, nth=2)  # 2nd append lands, then its response is lost
    plan.fail(BEFORE, names=lambda n: n.startswith("queue"), probability=0.1)
    provider = FaultyProvider(inner, plan)

A fault **before** a write raises ``InjectedFault`` with ``retryable=True`` and
the store is unchanged: what a refused connection or throttling looks like. A
fault **after** a write lets the write take effect, then raises
``InjectedFault`` with ``ambiguous=True``: what a timeout after the backend
committed looks like, the case an engine must recover from by reading back.

Writes are ``append``, ``truncate``, ``set``, ``set_unconditional``, ``add``,
``try_add``, ``remove`` and ``try_remove``. Reads and opens are never failed,
but every call is counted in ``FaultPlan.calls``. A write's inputs are checked
against the wrapped provider's limits before any rule is consulted, so an
invalid input raises what it would unwrapped (``LimitExceeded``, ``ValueError``,
``TypeError``) and uses up no fault. A fault is counted only when it is raised:
an ``AFTER`` fault whose write fails on its own (a ``Conflict``, say) is not
injected, and its rule fails the next matching call instead.
"""

from __future__ import annotations

import contextvars
import enum
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import TypeVar

import attrs

from runkit.persistence import (
    Interval,
    Journal,
    JournalStore,
    Keyspace,
    KeyspaceStore,
    Limits,
    PersistenceError,
    Provider,
    Set,
    SetStore,
    check_position,
)

__all__ = [
    "AFTER",
    "BEFORE",
    "KINDS",
    "WRITE_OPS",
    "FaultPlan",
    "FaultRule",
    "FaultyProvider",
    "InjectedFault",
    "InjectedFaultRecord",
    "Timing",
]

T = TypeVar("T")

#: The operations a plan can fail.
WRITE_OPS = frozenset(
    {"append", "truncate", "set", "set_unconditional", "add", "try_add", "remove", "try_remove"}
)
#: The store kinds a rule can be limited to.
KINDS = frozenset({"journal", "keyspace", "set"})


class Timing(enum.Enum):
    """When an injected fault strikes, relative to the write."""

    BEFORE = "before"
    """The write is not attempted; the error is retryable and nothing changed."""
    AFTER = "after"
    """The write took effect; the error is ambiguous (the response was lost)."""


BEFORE = Timing.BEFORE
AFTER = Timing.AFTER


class InjectedFault(PersistenceError):
    """The error a ``FaultyProvider`` raises in place of a write's result.

    ``retryable`` is set for faults before the write, ``ambiguous`` for faults
    after it; ``op``, ``kind``, ``name`` and ``timing`` say what was failed.
    """

    def __init__(self, op: str, kind: str, name: str, timing: Timing) -> None:
        if timing is BEFORE:
            message = f"injected fault before {op} on {kind} {name!r} (nothing was written)"
        else:
            message = f"injected fault after {op} on {kind} {name!r}: the response was lost"
        super().__init__(message, retryable=timing is BEFORE, ambiguous=timing is AFTER)
        self.op = op
        self.kind = kind
        self.name = name
        self.timing = timing


@attrs.frozen
class InjectedFaultRecord:
    """One fault a plan injected."""

    op: str
    kind: str
    name: str
    timing: Timing


def _frozen_ops(ops: Iterable[str] | None) -> frozenset[str]:
    if ops is None:
        return WRITE_OPS
    chosen = frozenset(ops)
    if unknown := chosen - WRITE_OPS:
        raise ValueError(
            f"cannot inject faults into {', '.join(sorted(unknown))}; "
            f"writes are {', '.join(sorted(WRITE_OPS))}"
        )
    return chosen


def _frozen_kinds(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return KINDS
    chosen = frozenset(kinds)
    if unknown := chosen - KINDS:
        raise ValueError(f"unknown store kinds {sorted(unknown)}; expected some of {sorted(KINDS)}")
    return chosen


@attrs.define(eq=False)
class FaultRule:
    """Which write calls a plan fails, and when. Build with ``FaultPlan.fail``.

    A call *matches* when its operation, store kind and store name pass the
    filters. Of the matching calls, the rule fails: the ``nth`` one (1-based),
    or every ``every``-th one, or each with ``probability`` (drawn from the
    plan's seeded generator), or, with none of those, every one; at most
    ``times`` in all. ``matched`` and ``injected`` count as the plan runs;
    ``injected`` counts only the faults raised. A fault chosen for a write that
    then failed on its own (an ``AFTER`` fault for an append that conflicted)
    was not injected: the rule fails its next matching call instead.
    """

    timing: Timing
    ops: frozenset[str] = WRITE_OPS
    kinds: frozenset[str] = KINDS
    names: Callable[[str], bool] | None = None
    nth: int | None = None
    every: int | None = None
    probability: float | None = None
    times: int | None = None
    matched: int = 0
    injected: int = 0
    #: Faults chosen for calls still under way (not yet raised nor given back).
    _pending: int = attrs.field(default=0, init=False, repr=False)
    #: Faults given back by calls that failed on their own: the next matches fire.
    _owed: int = attrs.field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        schedules = [s for s in (self.nth, self.every, self.probability) if s is not None]
        if len(schedules) > 1:
            raise ValueError("give at most one of nth, every and probability")
        for label, count in (("nth", self.nth), ("every", self.every), ("times", self.times)):
            if count is not None and count < 1:
                raise ValueError(f"{label} must be at least 1, not {count}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], not {self.probability}")

    def _matches(self, op: str, kind: str, name: str) -> bool:
        return (
            op in self.ops and kind in self.kinds and (self.names is None or bool(self.names(name)))
        )

    def _fires(self, rng: random.Random) -> bool:
        # Called once per matching call, with ``matched`` already incremented.
        if self.times is not None and self.injected + self._pending >= self.times:
            return False
        if self._owed:
            return True
        if self.nth is not None:
            return self.matched == self.nth
        if self.every is not None:
            return self.matched % self.every == 0
        if self.probability is not None:
            return rng.random() < self.probability
        return True


class FaultPlan:
    """A list of ``FaultRule`` consulted, in order, on every write through a ``FaultyProvider``.

    The first rule that matches a call *and* fires decides its fault; every
    rule that matches counts the call. ``seed`` makes probabilistic rules
    reproducible. Safe to share between tasks and providers.

    Counters: ``calls`` counts every operation (reads included) reaching the
    wrapper, keyed by operation name (``"open"``, ``"get"``, ``"append"``...);
    ``injected`` lists the faults raised, in order.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        self.rules: list[FaultRule] = []
        self.calls: Counter[str] = Counter()
        self.injected: list[InjectedFaultRecord] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        # Faults chosen by ``decide`` and not yet raised (``record``) nor given
        # back (``release``), oldest first; the calling task's latest too, so
        # that the right rule is credited when two rules chose the same call.
        self._pending: list[_Pending] = []
        self._latest: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
            "fault_plan_pending", default=None
        )

    def fail(
        self,
        timing: Timing,
        *,
        ops: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        names: Callable[[str], bool] | None = None,
        nth: int | None = None,
        every: int | None = None,
        probability: float | None = None,
        times: int | None = None,
    ) -> FaultRule:
        """Add a rule failing matching writes ``BEFORE`` or ``AFTER`` they take effect.

        Args:
            timing: ``BEFORE`` (retryable, nothing written) or ``AFTER``
                (ambiguous, the write took effect).
            ops: Write operations to fail (default: all of ``WRITE_OPS``).
            kinds: Store kinds to fail (default: ``journal``, ``keyspace``, ``set``).
            names: Predicate on the store name (default: every name).
            nth: Fail only the nth matching call (1-based).
            every: Fail every nth matching call.
            probability: Fail each matching call with this probability.
            times: Inject at most this many faults.

        Returns the rule, whose ``matched`` and ``injected`` counters can be read.
        """
        rule = FaultRule(
            timing,
            _frozen_ops(ops),
            _frozen_kinds(kinds),
            names,
            nth,
            every,
            probability,
            times,
        )
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (counters are kept), so later writes go through."""
        with self._lock:
            self.rules.clear()

    @property
    def injected_before(self) -> int:
        """How many faults were injected before a write."""
        return sum(1 for f in self.injected if f.timing is BEFORE)

    @property
    def injected_after(self) -> int:
        """How many faults were injected after a write."""
        return sum(1 for f in self.injected if f.timing is AFTER)

    def decide(self, op: str, kind: str, name: str) -> Timing | None:
        """Count a call and return the fault to inject into it, if any.

        ``FaultyProvider`` calls this; custom wrappers (of a driver's internals,
        say) may call it too, then ``record`` when they raise the fault, or
        ``release`` when they do not (the write failed on its own). A chosen
        fault counts in its rule's ``injected`` only once recorded.
        """
        with self._lock:
            self.calls[op] += 1
            if op not in WRITE_OPS:
                return None
            chosen: FaultRule | None = None
            for rule in self.rules:
                if not rule._matches(op, kind, name):
                    continue
                rule.matched += 1
                if chosen is None and rule._fires(self._random):
                    chosen = rule
            if chosen is None:
                return None
            if chosen._owed:
                chosen._owed -= 1
            chosen._pending += 1
            pending = _Pending(chosen, op, kind, name, chosen.timing)
            self._pending.append(pending)
            self._latest.set(pending)
            return chosen.timing

    def _settle(self, op: str, kind: str, name: str, timing: Timing) -> FaultRule | None:
        """Remove and return the rule of the fault ``decide`` chose for this call."""
        latest = self._latest.get()
        if latest is not None and latest.call == (op, kind, name, timing):
            self._latest.set(None)
            if latest in self._pending:
                self._pending.remove(latest)
                latest.rule._pending -= 1
                return latest.rule
        for index, pending in enumerate(self._pending):
            if pending.call == (op, kind, name, timing):
                del self._pending[index]
                pending.rule._pending -= 1
                return pending.rule
        return None

    def record(self, op: str, kind: str, name: str, timing: Timing) -> InjectedFault:
        """Log an injected fault, count it in its rule, and return the error to raise."""
        with self._lock:
            rule = self._settle(op, kind, name, timing)
            if rule is not None:
                rule.injected += 1
            self.injected.append(InjectedFaultRecord(op, kind, name, timing))
        return InjectedFault(op, kind, name, timing)

    def release(self, op: str, kind: str, name: str, timing: Timing) -> None:
        """Give back a fault ``decide`` chose but that was not raised.

        For a write that failed on its own before its ``AFTER`` fault could be
        raised: nothing is counted as injected, and the fault's rule fails its
        next matching call instead.
        """
        with self._lock:
            rule = self._settle(op, kind, name, timing)
            if rule is not None:
                rule._owed += 1


@attrs.frozen(eq=False)
class _Pending:
    """A fault ``decide`` chose for a call, until it is raised or given back."""

    rule: FaultRule
    op: str
    kind: str
    name: str
    timing: Timing

    @property
    def call(self) -> tuple[str, str, str, Timing]:
        return (self.op, self.kind, self.name, self.timing)


class _Wrapper:
    """Shared plumbing for wrapped handles."""

    _kind: str

    def __init__(
        self, inner: Journal | Keyspace | Set, plan: FaultPlan, limits: Limits | None = None
    ) -> None:
        self._inner_handle = inner
        self._plan = plan
        # The wrapped provider's limits, to check inputs before a fault is
        # decided; without them (a wrapper built by hand) the wrapped handle checks.
        self._limits = limits

    @property
    def name(self) -> str:
        return self._inner_handle.name

    async def close(self) -> None:
        self._plan.calls["close"] += 1
        await self._inner_handle.close()

    def _count(self, op: str) -> None:
        self._plan.decide(op, self._kind, self._inner_handle.name)

    async def _faulty(self, op: str, write: Callable[[], Awaitable[T]]) -> T:
        """Run *write* (whose inputs are already checked), failing it as the plan says."""
        plan, kind, name = self._plan, self._kind, self.name
        timing = plan.decide(op, kind, name)
        if timing is BEFORE:
            raise plan.record(op, kind, name, BEFORE)
        try:
            result = await write()
        except BaseException:
            if timing is AFTER:
                plan.release(op, kind, name, AFTER)  # nothing to inject: it failed anyway
            raise
        if timing is AFTER:
            raise plan.record(op, kind, name, AFTER)
        return result

    def __repr__(self) -> str:
        return f"<faulty {self._inner_handle!r}>"


class _FaultyJournal(_Wrapper, Journal):
    _kind = "journal"

    def __init__(self, inner: Journal, plan: FaultPlan, limits: Limits | None = None) -> None:
        super().__init__(inner, plan, limits)
        self._inner = inner

    async def bounds(self) -> Interval:
        self._count("bounds")
        return await self._inner.bounds()

    async def get(self, pos: int) -> bytes:
        self._count("get")
        return await self._inner.get(pos)

    async def range(self, pos: int) -> AsyncIterator[tuple[int, bytes]]:
        self._count("range")
        async with aclosing(self._inner.range(pos)) as items:  # type: ignore[type-var]
            async for item in items:
                yield item

    async def append(self, pos: int, record: bytes) -> None:
        if self._limits is not None:
            pos = check_position(pos)
            record = self._limits.check_record(record)
        await self._faulty("append", lambda: self._inner.append(pos, record))

    async def truncate(self, pos: int) -> None:
        if self._limits is not None:
            pos = check_position(pos)
        await self._faulty("truncate", lambda: self._inner.truncate(pos))


class _FaultyKeyspace(_Wrapper, Keyspace):
    _kind = "keyspace"

    def __init__(self, inner: Keyspace, plan: FaultPlan, limits: Limits | None = None) -> None:
        super().__init__(inner, plan, limits)
        self._inner = inner

    async def get(self, key: bytes) -> tuple[bytes, str]:
        self._count("get")
        return await self._inner.get(key)

    async def has(self, key: bytes) -> bool:
        self._count("has")
        return await self._inner.has(key)

    async def set(self, key: bytes, value: bytes, revision: str) -> str:
        if self._limits is not None:
            key = self._limits.check_key(key)
            value = self._limits.check_value(value)
            if not isinstance(revision, str):
                raise TypeError(f"revision must be str, not {type(revision).__name__}")
        return await self._faulty("set", lambda: self._inner.set(key, value, revision))

    async def set_unconditional(self, key: bytes, value: bytes) -> str:
        if self._limits is not None:
            key = self._limits.check_key(key)
            value = self._limits.check_value(value)
        return await self._faulty(
            "set_unconditional", lambda: self._inner.set_unconditional(key, value)
        )

    async def range(self) -> AsyncIterator[tuple[bytes, bytes, str]]:
        self._count("range")
        async with aclosing(self._inner.range()) as items:  # type: ignore[type-var]
            async for item in items:
                yield item


class _FaultySet(_Wrapper, Set):
    _kind = "set"

    def __init__(self, inner: Set, plan: FaultPlan, limits: Limits | None = None) -> None:
        super().__init__(inner, plan, limits)
        self._inner = inner

    async def has(self, member: bytes) -> bool:
        self._count("has")
        return await self._inner.has(member)

    def _checked(self, member: bytes) -> bytes:
        return member if self._limits is None else self._limits.check_member(member)

    async def add(self, member: bytes) -> None:
        member = self._checked(member)
        await self._faulty("add", lambda: self._inner.add(member))

    async def try_add(self, member: bytes) -> bool:
        member = self._checked(member)
        return await self._faulty("try_add", lambda: self._inner.try_add(member))

    async def remove(self, member: bytes) -> None:
        member = self._checked(member)
        await self._faulty("remove", lambda: self._inner.remove(member))

    async def try_remove(self, member: bytes) -> bool:
        member = self._checked(member)
        return await self._faulty("try_remove", lambda: self._inner.try_remove(member))

    async def range(self) -> AsyncIterator[bytes]:
        self._count("range")
        async with aclosing(self._inner.range()) as members:  # type: ignore[type-var]
            async for member in members:
                yield member


class _FaultyJournalStore(JournalStore):
    def __init__(self, inner: JournalStore, plan: FaultPlan, limits: Limits | None = None) -> None:
        self._inner = inner
        self._plan = plan
        self._limits = limits

    async def open(self, name: str) -> Journal:
        self._plan.calls["open"] += 1
        return _FaultyJournal(await self._inner.open(name), self._plan, self._limits)


class _FaultyKeyspaceStore(KeyspaceStore):
    def __init__(self, inner: KeyspaceStore, plan: FaultPlan, limits: Limits | None = None) -> None:
        self._inner = inner
        self._plan = plan
        self._limits = limits

    async def open(self, name: str) -> Keyspace:
        self._plan.calls["open"] += 1
        return _FaultyKeyspace(await self._inner.open(name), self._plan, self._limits)


class _FaultySetStore(SetStore):
    def __init__(self, inner: SetStore, plan: FaultPlan, limits: Limits | None = None) -> None:
        self._inner = inner
        self._plan = plan
        self._limits = limits

    async def open(self, name: str) -> Set:
        self._plan.calls["open"] += 1
        return _FaultySet(await self._inner.open(name), self._plan, self._limits)


class FaultyProvider(Provider):
    """A provider that forwards to *inner*, failing writes as *plan* says.

    Every store and handle it opens is wrapped. ``close()`` closes *inner* too;
    to keep *inner* open, simply stop using the wrapper. With an empty plan it
    behaves exactly like *inner* (it passes the conformance suites).

    Args:
        inner: The provider to forward to.
        plan: The faults to inject; a new, empty plan if omitted (add rules to
            ``provider.plan`` later).
    """

    def __init__(self, inner: Provider, plan: FaultPlan | None = None) -> None:
        self.inner = inner
        self.plan = plan if plan is not None else FaultPlan()
        limits = inner.limits
        self._journals = _FaultyJournalStore(inner.journals, self.plan, limits)
        self._keyspaces = _FaultyKeyspaceStore(inner.keyspaces, self.plan, limits)
        self._sets = _FaultySetStore(inner.sets, self.plan, limits)

    @property
    def journals(self) -> JournalStore:
        return self._journals

    @property
    def keyspaces(self) -> KeyspaceStore:
        return self._keyspaces

    @property
    def sets(self) -> SetStore:
        return self._sets

    @property
    def limits(self) -> Limits:
        return self.inner.limits

    def set_read_only(self) -> None:
        # The wrapped provider is what reads and writes: it must know.
        super().set_read_only()
        self.inner.set_read_only()

    async def provision(self) -> None:
        self.plan.calls["provision"] += 1
        await self.inner.provision()

    async def close(self) -> None:
        self.plan.calls["close"] += 1
        await self.inner.close()

    def __repr__(self) -> str:
        return f"<FaultyProvider {self.inner!r}>"
