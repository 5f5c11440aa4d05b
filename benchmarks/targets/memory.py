"""Benchmark target: the in-memory reference driver (no baseline)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runkit_memory import MemoryProvider

from . import Target

NAME = "memory"


@asynccontextmanager
async def open_target() -> AsyncIterator[Target]:
    """A memory provider on a silo of its own."""
    async with MemoryProvider(f"bench-{uuid.uuid4().hex}") as provider:
        yield Target(provider=provider, notes="in-process memory driver")
