"""The examples in docs/user-guide/writing-an-application.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide" / "writing-an-application.md"

CHECK = textwrap.dedent(
    """

    import asyncio

    class _Recorder:
        def __init__(self) -> None:
            self.routes_ = []

        def identity(self, name, key):
            dogma.validate_identity_name(name)
            dogma.validate_identity_key(key)

        def routes(self, *routes):
            self.routes_.extend(routes)

        def disable(self):
            pass

    app = _Recorder()
    BankApp().configure(app)
    for route in app.routes_:
        route.handler.configure(_Recorder())

    class _Scope:
        def now(self):
            from datetime import UTC, datetime
            return datetime(2024, 1, 1, tzinfo=UTC)

        def record_event(self, event):
            event.validate(dogma.ValidationScope(is_new=True))
            root.apply_event(event)

    root = AccountHandler().new()
    AccountHandler().handle_command(root, _Scope(), Deposit(account_id="a1", amount=5))
    assert root.balance == 5
    event = AccountCredited.unmarshal_binary(
        AccountCredited(account_id="a1", amount=5, credited_at=_Scope().now()).marshal_binary()
    )
    assert asyncio.run(WelcomeProcess().route_event_to_instance(event)) == "a1"
    print("ok")
    """
)


@pytest.mark.skipif(not GUIDE.exists(), reason="the user guide is not in this checkout")
def test_user_guide_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.DOTALL)
    assert blocks, "no python examples found"
    # A subprocess keeps the examples' registrations out of this session's registry.
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks) + CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
