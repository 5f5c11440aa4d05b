"""Rendezvous (highest-random-weight) hashing over UUIDs.

Every node computes the same owner for a workload from the same candidate set,
with no coordination: ``score(w, c) = XXH3-64(w.bytes + c.bytes)`` (seed 0); the
highest score wins; ties go to the lower UUID so the result never depends on
input order; a candidate equal to the workload wins outright (self-affinity).
When a candidate joins or leaves, only the workloads it wins or won move.

Inputs are ``uuid.UUID`` values or canonical UUID strings, in any mix. Results
are the caller's own candidate objects: strings stay strings and UUIDs stay
UUIDs, so ``winner(w, ids) in ids`` holds. Candidates are compared by the UUID
they denote; of duplicates, the first given is the one returned.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TypeVar

import xxhash

__all__ = ["rank", "rank_above", "score", "winner", "wins"]

UUIDLike = uuid.UUID | str
C = TypeVar("C", bound=UUIDLike)


def _as_uuid(value: UUIDLike, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not a UUID") from None
    raise TypeError(f"{what} must be a UUID or str, not {type(value).__name__}")


def _candidates(candidates: Iterable[C]) -> dict[uuid.UUID, C]:
    # Each candidate by the UUID it denotes. Duplicates would not change the
    # winner; keep the first so rank() lists each once.
    parsed: dict[uuid.UUID, C] = {}
    for c in candidates:
        parsed.setdefault(_as_uuid(c, "candidate"), c)
    return parsed


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


def _ranked(workload: uuid.UUID, candidates: Iterable[C]) -> list[tuple[uuid.UUID, C]]:
    parsed = _candidates(candidates)
    return sorted(parsed.items(), key=lambda item: _key(workload, item[0]))


def rank(workload: UUIDLike, candidates: Iterable[C]) -> list[C]:
    """Return the candidates ordered from most to least preferred for *workload*."""
    w = _as_uuid(workload, "workload")
    return [c for _, c in _ranked(w, candidates)]


def _winner(workload: uuid.UUID, candidates: Iterable[C]) -> tuple[uuid.UUID, C] | None:
    best: tuple[int, int, int] | None = None
    chosen: tuple[uuid.UUID, C] | None = None
    for u, c in _candidates(candidates).items():
        k = _key(workload, u)
        if best is None or k < best:
            best, chosen = k, (u, c)
    return chosen


def winner(workload: UUIDLike, candidates: Iterable[C]) -> C | None:
    """Return the candidate that owns *workload*, or ``None`` if there are none."""
    chosen = _winner(_as_uuid(workload, "workload"), candidates)
    return None if chosen is None else chosen[1]


def wins(workload: UUIDLike, candidate: UUIDLike, candidates: Iterable[UUIDLike]) -> bool:
    """Return whether *candidate* owns *workload*; ``False`` if it is not a candidate.

    *candidate* is compared by the UUID it denotes, whatever its type.
    """
    c = _as_uuid(candidate, "candidate")
    chosen = _winner(_as_uuid(workload, "workload"), candidates)
    return chosen is not None and chosen[0] == c


def rank_above(workload: UUIDLike, candidate: UUIDLike, candidates: Iterable[C]) -> list[C]:
    """Return the candidates ranked above *candidate* for *workload*.

    All of ``rank()`` if *candidate* is not among the candidates; empty when
    *candidate* is the workload itself (it wins outright). *candidate* is
    compared by the UUID it denotes, whatever its type.
    """
    w = _as_uuid(workload, "workload")
    c = _as_uuid(candidate, "candidate")
    if w == c:
        return []
    above: list[C] = []
    for u, item in _ranked(w, candidates):
        if u == c:
            return above
        above.append(item)
    return above
