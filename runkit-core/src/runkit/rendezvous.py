"""Rendezvous (highest-random-weight) hashing over UUIDs.

Every node computes the same owner for a workload from the same candidate set,
with no coordination: ``score(w, c) = XXH3-64(w.bytes + c.bytes)`` (seed 0); the
highest score wins; ties go to the lower UUID so the result never depends on
input order; a candidate equal to the workload wins outright (self-affinity).
When a candidate joins or leaves, only the workloads it wins or won move.

Inputs are ``uuid.UUID`` values or canonical UUID strings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import xxhash

__all__ = ["rank", "rank_above", "score", "winner", "wins"]

UUIDLike = uuid.UUID | str


def _as_uuid(value: UUIDLike, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not a UUID") from None
    raise TypeError(f"{what} must be a UUID or str, not {type(value).__name__}")


def _candidates(candidates: Iterable[UUIDLike]) -> list[uuid.UUID]:
    # Duplicates would not change the winner; drop them so rank() lists each once.
    return list(dict.fromkeys(_as_uuid(c, "candidate") for c in candidates))


def score(workload: UUIDLike, candidate: UUIDLike) -> int:
    """Return the 64-bit score of *candidate* for *workload*."""
    w = _as_uuid(workload, "workload")
    c = _as_uuid(candidate, "candidate")
    return int(xxhash.xxh3_64_intdigest(w.bytes + c.bytes))


def _key(workload: uuid.UUID, candidate: uuid.UUID) -> tuple[int, int, int]:
    # Sort key for "best first": self-affinity, then highest score, then lowest UUID.
    return (
        0 if candidate == workload else 1,
        -xxhash.xxh3_64_intdigest(workload.bytes + candidate.bytes),
        candidate.int,
    )


def rank(workload: UUIDLike, candidates: Iterable[UUIDLike]) -> list[uuid.UUID]:
    """Return the candidates ordered from most to least preferred for *workload*."""
    w = _as_uuid(workload, "workload")
    return sorted(_candidates(candidates), key=lambda c: _key(w, c))


def winner(workload: UUIDLike, candidates: Iterable[UUIDLike]) -> uuid.UUID | None:
    """Return the candidate that owns *workload*, or ``None`` if there are none."""
    w = _as_uuid(workload, "workload")
    best: tuple[int, int, int] | None = None
    chosen: uuid.UUID | None = None
    for c in _candidates(candidates):
        k = _key(w, c)
        if best is None or k < best:
            best, chosen = k, c
    return chosen


def wins(workload: UUIDLike, candidate: UUIDLike, candidates: Iterable[UUIDLike]) -> bool:
    """Return whether *candidate* owns *workload*; ``False`` if it is not a candidate."""
    c = _as_uuid(candidate, "candidate")
    return winner(workload, candidates) == c


def rank_above(
    workload: UUIDLike, candidate: UUIDLike, candidates: Iterable[UUIDLike]
) -> list[uuid.UUID]:
    """Return the candidates ranked above *candidate* for *workload*.

    All of ``rank()`` if *candidate* is not among the candidates; empty when
    *candidate* is the workload itself (it wins outright).
    """
    w = _as_uuid(workload, "workload")
    c = _as_uuid(candidate, "candidate")
    if w == c:
        return []
    ranked = rank(w, candidates)
    if c not in ranked:
        return ranked
    return ranked[: ranked.index(c)]
