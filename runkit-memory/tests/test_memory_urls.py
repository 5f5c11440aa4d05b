"""``memory://`` URL checking: every problem at once, through parse_url and the hook."""

from __future__ import annotations

import pytest

from runkit.persistence import InvalidURL
from runkit_memory import _plugin as plugin


def test_every_problem_is_reported_at_once() -> None:
    url = "memory://bob:hunter2@host/silo?a=1&b=2#frag"
    with pytest.raises(InvalidURL) as info:
        plugin.parse_url(url)
    assert info.value.problems == (
        "memory URL 'memory://bob:***@host/silo?a=1&b=2#frag' has a host ('host'); memory "
        "URLs have none: use three slashes, e.g. 'memory:///host/silo'",
        "memory:// URL has unknown parameter 'a' (allowed: none)",
        "memory:// URL has unknown parameter 'b' (allowed: none)",
        "memory URL 'memory://bob:***@host/silo?a=1&b=2#frag' has a fragment; "
        "expected 'memory:///<silo>'",
    )
    assert "hunter2" not in str(info.value)
    assert str(info.value).startswith(
        "persistence URL 'memory://bob:***@host/silo?a=1&b=2#frag' has 4 problems\n  - "
    )


def test_a_single_problem_is_the_whole_message() -> None:
    with pytest.raises(ValueError) as info:
        plugin.parse_url("memory:///")
    assert str(info.value) == "memory URL 'memory:///' names no silo; expected 'memory:///<silo>'"


def test_hook() -> None:
    assert plugin.runkit_persistence_url_problems("s3:///bucket") is None
    assert plugin.runkit_persistence_url_problems("memory:///silo") == []
    assert plugin.runkit_persistence_url_problems("MEMORY:///?x=1") == [
        "memory:// URL has unknown parameter 'x' (allowed: none)",
        "memory URL 'MEMORY:///?x=1' names no silo; expected 'memory:///<silo>'",
    ]
