"""Log conventions: rate-limited repeats, salient fields in the text, reasons never empty."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest

from runkit.engine.envelope import new_envelope, register_types
from runkit.engine.logs import LogContext, RateLimitedLog, describe_error

sys.path.insert(0, str(Path(__file__).parent))
from engine_commands_harness import REGISTRY, Deposit, Deposited

LOGGER = "runkit.test.logs"
# Keys as tuples, as callers use them (and so linters do not take them for formats).
DB, A, B, K = ("db", 1), ("a", 1), ("b", 1), ("k", 1)


@attrs.define
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


class TestRateLimitedLog:
    def test_repeats_within_the_interval_are_held_back_and_counted(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """One line per key per interval; the next says how many were suppressed."""
        clock = Clock()
        log = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=clock)
        with caplog.at_level(logging.INFO, logger=LOGGER):
            assert log.warning(DB, "cannot connect to %r: %s", "db1", "refused")
            for _ in range(5):
                clock.now += 1
                assert not log.warning(DB, "cannot connect to %r: %s", "db1", "refused")
            clock.now += 10
            assert log.warning(DB, "cannot connect to %r: %s", "db1", "timed out")

        assert [r.getMessage() for r in caplog.records] == [
            "cannot connect to 'db1': refused",
            "cannot connect to 'db1': timed out (5 similar messages suppressed)",
        ]
        assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]

    def test_keys_are_limited_independently(self, caplog: pytest.LogCaptureFixture) -> None:
        log = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=Clock())
        with caplog.at_level(logging.INFO, logger=LOGGER):
            log.info(A, "a failed")
            log.info(B, "b failed")
            log.info(A, "a failed")
        assert [r.getMessage() for r in caplog.records] == ["a failed", "b failed"]

    def test_reset_lets_the_next_line_through_and_returns_the_count(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        log = RateLimitedLog(logging.getLogger(LOGGER), 10.0, clock=Clock())
        with caplog.at_level(logging.INFO, logger=LOGGER):
            log.error(K, "down")
            log.error(K, "down")
            log.error(K, "down")
            assert log.reset(K) == 2
            assert log.reset(K) == 0
            assert log.error(K, "down again")
        assert [r.getMessage() for r in caplog.records] == ["down", "down again"]

    def test_interval_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="interval must be positive, got 0"):
            RateLimitedLog(logging.getLogger(LOGGER), 0)


class TestLogContext:
    def test_renders_the_set_fields_in_a_fixed_order(self) -> None:
        class OpenAccount:
            pass

        ctx = LogContext(
            command_id="0b7d", message_type=OpenAccount, handler="accounts", partition=3
        )
        assert str(ctx) == "partition 3, handler accounts, command 0b7d, type OpenAccount"
        assert ctx.extra == {
            "partition": 3,
            "handler": "accounts",
            "command_id": "0b7d",
            "message_type": "OpenAccount",
        }

    def test_shows_instance_ids_quoted(self) -> None:
        assert str(LogContext(handler="p", instance_id="acct 1")) == "handler p, instance 'acct 1'"

    def test_of_message_names_a_commands_id_and_type(self) -> None:
        register_types(REGISTRY)
        env = new_envelope(
            Deposit(account="a", amount=5),
            app_key="app",
            site_key=None,
            created_at=datetime.now(UTC),
            message_id="0b7d",
        )
        ctx = LogContext.of_message(env, partition=2, instance_id="a")
        assert str(ctx) == "partition 2, command 0b7d, type Deposit, instance 'a'"

    def test_of_message_calls_other_ids_message(self) -> None:
        register_types(REGISTRY)
        env = new_envelope(
            Deposited(account="a", amount=5, balance=5),
            app_key="app",
            site_key=None,
            created_at=datetime.now(UTC),
            message_id="e1",
        )
        assert str(LogContext.of_message(env)) == "message e1, type Deposited"

    def test_is_empty_when_nothing_is_set(self) -> None:
        assert str(LogContext()) == ""
        assert LogContext().extra == {}


class TestDescribeError:
    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (TimeoutError(), "timed out"),
            (ConnectionResetError(), "ConnectionResetError"),
            (ValueError("bad\n  value\n"), "bad value"),
            (RuntimeError("boom"), "boom"),
        ],
    )
    def test_is_one_line_and_never_empty(self, exc: BaseException, expected: str) -> None:
        assert describe_error(exc) == expected
