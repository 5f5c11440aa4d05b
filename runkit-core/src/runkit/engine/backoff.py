"""The engine's one retry delay: capped exponential backoff with equal jitter."""

from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the *failures*-th consecutive failure (>= 1).

    The ceiling doubles from *base* per failure up to *cap*; the delay is drawn
    from its upper half ("equal jitter"), so retries spread out but never
    collapse to zero.
    """
    ceiling: float = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 62))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
