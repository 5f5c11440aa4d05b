"""The engine's one retry delay (capped exponential backoff) and its jitter."""

from __future__ import annotations

import random

__all__ = ["backoff", "jitter"]


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the *failures*-th consecutive failure (>= 1).

    The ceiling doubles from *base* per failure up to *cap*; the delay is drawn
    from its upper half ("equal jitter"), so retries spread out but never
    collapse to zero.
    """
    ceiling: float = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 62))
    return jitter(ceiling)


def jitter(ceiling: float) -> float:
    """A delay drawn from the upper half of *ceiling* ("equal jitter").

    Spreads out what many tasks or nodes would otherwise do at the same moment,
    without ever collapsing to zero.
    """
    return ceiling / 2 + random.uniform(0, ceiling / 2)
