"""Fixtures and helpers shared by the conformance suites."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, TypeVar

import anyio
import anyio.lowlevel
import hypothesis
import pytest

from runkit.persistence import Provider

__all__ = ["SuiteBase", "cancel_call", "gather", "landed_after_cancel", "unique_name"]

T = TypeVar("T")

#: How many tasks race in the concurrency tests, and how many rounds they run.
RACERS = 16
ROUNDS = 5


def unique_name(kind: str) -> str:
    """Return a store name no other test uses: the suites can share a backend under xdist."""
    return f"{kind}-{uuid.uuid4().hex}"


async def gather(*calls: Callable[[], Awaitable[T]]) -> list[T | BaseException]:
    """Run *calls* concurrently; return each result or the ``Exception`` it raised, in order.

    Every call first waits at a common barrier, so they really race at the backend.
    """
    results: list[T | BaseException] = [RuntimeError("did not run")] * len(calls)
    start = anyio.Event()

    async def run(index: int, call: Callable[[], Awaitable[T]]) -> None:
        await start.wait()
        try:
            results[index] = await call()
        except Exception as exc:
            results[index] = exc

    async with anyio.create_task_group() as tg:
        for index, call in enumerate(calls):
            tg.start_soon(run, index, call)
        await anyio.lowlevel.checkpoint()
        start.set()
    return results


async def cancel_call(when: str, call: Callable[[], Awaitable[object]]) -> bool:
    """Run *call* and cancel it, ``"before"`` it starts or once it is ``"in-flight"``.

    In flight means every task is blocked, so the call is waiting on its
    backend (a socket, a thread): exactly so on trio, while anyio's asyncio
    backend checks only every 0.1 s, so there a quick call may finish first.
    Returns whether the cancellation took effect.
    """
    if when == "before":
        with anyio.CancelScope() as scope:
            scope.cancel()
            await call()
        return scope.cancelled_caught
    finished = False
    error: Exception | None = None

    async def run() -> None:
        nonlocal finished, error
        try:
            await call()
        except Exception as exc:  # re-raised below, outside the task group's wrapping
            error = exc
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return not finished


def landed_after_cancel(write: str) -> str:
    """The failure message for a cancelled *write* that took effect after the call returned."""
    return (
        f"a cancelled {write} had not taken effect when the call returned, but did "
        "afterwards: the write went on in the background (a worker thread started with "
        "abandon_on_cancel=True, or a request left running). A cancelled call must "
        "return only once its write is wholly done or not done at all"
    )


#: Why a test that needs a second provider skips when the driver gave no factory.
_NO_MAKE_PROVIDER = (
    "needs a second provider on the same backend and namespace as 'provider': "
    "override the 'make_provider' fixture (a factory of further providers) to run it"
)


class SuiteBase:
    """Fixtures every suite needs; drivers override ``provider`` (required) and
    ``make_provider`` (optional: without it the cross-provider tests skip, and
    the atomicity races run between handles of ``provider`` alone).

    ``hypothesis_settings`` is the budget of the state-machine tests; drivers
    on slow backends lower ``max_examples``.

    Every test is marked ``anyio``, so the suites run under anyio's pytest
    plugin whatever the project's ``anyio_mode``, on the backends its
    ``anyio_backend`` fixture names.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=40,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )

    #: Tests skip writing inputs larger than this (limits above it are not exercised
    #: at the edge, to keep memory use sane for drivers with very large limits).
    max_tested_bytes: ClassVar[int] = 16 << 20

    #: How many keys and members the keyspace and set paging tests write: more
    #: than one page of the driver's ``range`` (S3 lists 1,000 keys a page), so
    #: that the iterator must fetch further pages.
    range_paging_items: ClassVar[int] = 1100

    @pytest.fixture
    def provider(self) -> Provider:
        """A provider on a fresh namespace; override in the driver's test class."""
        raise NotImplementedError("override the 'provider' fixture in your conformance test class")

    @pytest.fixture
    def make_provider(self) -> Callable[[], Provider] | None:
        """A factory of further providers on ``provider``'s backend and namespace.

        Optional. The suite closes every provider it makes. By default there is
        none (``None``), and the tests that need a second provider (visibility
        across providers, concurrent provisioning and opening, closing one
        provider of several) skip, naming this fixture; override it to run them.
        """
        return None

    @pytest.fixture
    async def other_provider(
        self, provider: Provider, make_provider: Callable[[], Provider] | None
    ) -> AsyncIterator[Provider]:
        """A second provider on the same backend and namespace as ``provider``."""
        if make_provider is None:
            pytest.skip(_NO_MAKE_PROVIDER)
        other = make_provider()
        try:
            yield other
        finally:
            await other.close()

    @pytest.fixture
    async def racing_providers(
        self, provider: Provider, make_provider: Callable[[], Provider] | None
    ) -> AsyncIterator[list[Provider]]:
        """The providers whose handles race in the atomicity tests.

        ``provider`` and a second one from ``make_provider``, so that a race
        between providers (nodes) also catches state a provider keeps to
        itself; without the factory, ``provider`` alone: its handles still
        race, and catch a write that checks, awaits, then writes.
        """
        if make_provider is None:
            yield [provider]
            return
        other = make_provider()
        try:
            yield [provider, other]
        finally:
            with anyio.CancelScope(shield=True):
                await other.close()

    @pytest.fixture
    async def made_providers(
        self, provider: Provider, make_provider: Callable[[], Provider] | None
    ) -> AsyncIterator[Callable[[], Provider]]:
        """Like ``make_provider``, but closes every provider it made when the test ends."""
        if make_provider is None:
            pytest.skip(_NO_MAKE_PROVIDER)
        factory = make_provider
        made: list[Provider] = []

        def make() -> Provider:
            p = factory()
            made.append(p)
            return p

        try:
            yield make
        finally:
            with anyio.CancelScope(shield=True):
                for p in made:
                    await p.close()
