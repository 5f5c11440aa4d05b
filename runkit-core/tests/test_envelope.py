"""Envelopes: the routed messages a handler's handling takes over from its routing."""

from __future__ import annotations

from datetime import UTC, datetime

import attrs
import msgspec

import dogma
from runkit.engine.envelope import Envelope, RoutedMessages, new_envelope, register_types

REGISTRY = dogma.MessageTypeRegistry()


@dogma.register_command("c9000000-0000-4000-8000-000000000001", registry=REGISTRY)
@attrs.frozen
class Pay(dogma.Command):
    account: str
    amount: int

    def message_description(self) -> str:
        return f"pay {self.amount} into {self.account}"

    def validate(self, scope: dogma.ValidationScope) -> None:
        pass


register_types(REGISTRY)


def envelope(message: Pay) -> Envelope:
    return new_envelope(message, app_key="app", site_key=None, created_at=datetime.now(UTC))


def test_the_kept_message_is_handed_out_once_then_fresh_copies() -> None:
    routed = RoutedMessages()
    env = envelope(Pay("a", 1))
    kept = Pay("a", 1)
    routed.keep(env, kept)
    assert len(routed) == 1
    assert routed.take(env) is kept
    assert len(routed) == 0
    again = routed.take(env)
    assert again == kept
    assert again is not kept


def test_a_different_message_under_the_same_id_is_decoded() -> None:
    routed = RoutedMessages()
    env = envelope(Pay("a", 1))
    routed.keep(env, Pay("a", 1))
    other = msgspec.structs.replace(env, data=Pay("b", 2).marshal_binary())
    assert routed.take(other) == Pay("b", 2)
    assert len(routed) == 0  # the stale one is gone too


def test_discarded_and_the_oldest_beyond_the_limit_are_forgotten() -> None:
    routed = RoutedMessages(limit=2)
    first, second, third = (envelope(Pay("a", n)) for n in range(3))
    kept = [Pay("a", n) for n in range(3)]
    for env, message in zip((first, second, third), kept, strict=True):
        routed.keep(env, message)
    assert len(routed) == 2
    assert routed.take(first) is not kept[0]  # forgotten: decoded
    routed.discard(second)
    assert routed.take(second) is not kept[1]
    assert routed.take(third) is kept[2]
