"""Rendezvous hashing: determinism, tie-breaks, self-affinity and minimal movement."""

from __future__ import annotations

import uuid

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from runkit import rendezvous

uuids = st.uuids()


def test_score_is_xxh3_of_workload_then_candidate_bytes() -> None:
    w, c = uuid.uuid4(), uuid.uuid4()
    assert rendezvous.score(w, c) == xxhash.xxh3_64_intdigest(w.bytes + c.bytes)
    assert rendezvous.score(str(w), str(c)) == rendezvous.score(w, c)


def test_known_vector_is_stable() -> None:
    # Pinned so that a change of hash, seed or byte order (which would move
    # every partition in a mixed-version cluster) fails loudly.
    w = uuid.UUID("00000000-0000-4000-8000-000000000001")
    cs = [uuid.UUID(f"00000000-0000-4000-8000-00000000000{i}") for i in range(2, 8)]
    assert rendezvous.score(w, cs[0]) == 261606974839219133
    assert [str(c)[-1] for c in rendezvous.rank(w, cs)] == ["5", "4", "7", "3", "6", "2"]


def test_no_candidates_has_no_winner() -> None:
    assert rendezvous.winner(uuid.uuid4(), []) is None
    assert rendezvous.rank(uuid.uuid4(), []) == []


def test_single_candidate_always_wins() -> None:
    c = uuid.uuid4()
    assert rendezvous.winner(uuid.uuid4(), [c]) == c
    assert rendezvous.wins(uuid.uuid4(), c, [c])


def test_candidate_equal_to_workload_wins_outright() -> None:
    w = uuid.uuid4()
    others = [uuid.uuid4() for _ in range(20)]
    assert rendezvous.winner(w, [*others, w]) == w
    assert rendezvous.rank(w, [*others, w])[0] == w
    assert rendezvous.rank_above(w, w, [*others, w]) == []


def test_ties_go_to_the_lower_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xxhash, "xxh3_64_intdigest", lambda _data: 7)
    a = uuid.UUID("10000000-0000-4000-8000-000000000000")
    b = uuid.UUID("20000000-0000-4000-8000-000000000000")
    w = uuid.uuid4()
    assert rendezvous.winner(w, [b, a]) == a
    assert rendezvous.rank(w, [b, a]) == [a, b]


def test_non_member_never_wins_and_rank_above_is_everything() -> None:
    w, outsider = uuid.uuid4(), uuid.uuid4()
    cs = [uuid.uuid4() for _ in range(5)]
    assert not rendezvous.wins(w, outsider, cs)
    assert rendezvous.rank_above(w, outsider, cs) == rendezvous.rank(w, cs)


def test_invalid_inputs_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"workload 'nope' is not a UUID"):
        rendezvous.winner("nope", [uuid.uuid4()])
    with pytest.raises(TypeError, match=r"candidate must be a UUID or str, not int"):
        rendezvous.rank(uuid.uuid4(), [42])  # type: ignore[type-var]


@given(uuids, st.lists(uuids, min_size=1, max_size=12, unique=True), st.randoms())
def test_result_does_not_depend_on_order(w: uuid.UUID, cs: list[uuid.UUID], rnd: object) -> None:
    shuffled = list(cs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert rendezvous.rank(w, cs) == rendezvous.rank(w, shuffled)
    assert rendezvous.winner(w, cs) == rendezvous.rank(w, cs)[0]


@given(uuids, st.lists(uuids, min_size=2, max_size=12, unique=True))
def test_rank_above_is_the_prefix_before_the_candidate(w: uuid.UUID, cs: list[uuid.UUID]) -> None:
    ranked = rendezvous.rank(w, cs)
    for i, c in enumerate(ranked):
        if c != w:
            assert rendezvous.rank_above(w, c, cs) == ranked[:i]
        assert rendezvous.wins(w, c, cs) == (i == 0)


@given(st.lists(uuids, min_size=2, max_size=8, unique=True))
def test_removing_a_node_moves_only_its_workloads(nodes: list[uuid.UUID]) -> None:
    workloads = [uuid.uuid5(uuid.NAMESPACE_OID, f"p/{i}") for i in range(64)]
    gone = nodes[0]
    for w in workloads:
        before = rendezvous.winner(w, nodes)
        after = rendezvous.winner(w, nodes[1:])
        if before != gone:
            assert after == before


def test_partitions_spread_over_nodes() -> None:
    nodes = [uuid.uuid5(uuid.NAMESPACE_OID, f"node/{i}") for i in range(4)]
    counts = dict.fromkeys(nodes, 0)
    for i in range(4096):
        w = uuid.uuid5(uuid.NAMESPACE_OID, f"partition/{i}")
        counts[rendezvous.winner(w, nodes)] += 1  # type: ignore[index]
    # Each of 4 nodes should get roughly a quarter; 20% either side is generous.
    assert all(800 < n < 1250 for n in counts.values()), counts


def test_results_are_the_callers_own_objects() -> None:
    # Strings stay strings and UUIDs stay UUIDs: the result is one of the inputs.
    w = "00000000-0000-4000-8000-000000000001"
    strs = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(2, 8)]
    uuids_ = [uuid.UUID(s) for s in strs]
    assert rendezvous.winner(w, strs) in strs
    assert isinstance(rendezvous.winner(w, strs), str)
    assert rendezvous.winner(w, uuids_) in uuids_
    assert isinstance(rendezvous.winner(w, uuids_), uuid.UUID)
    assert rendezvous.rank(w, strs) == [str(u) for u in rendezvous.rank(w, uuids_)]
    assert all(isinstance(c, str) for c in rendezvous.rank(w, strs))
    ranked = rendezvous.rank(w, strs)
    assert rendezvous.rank_above(w, ranked[2], strs) == ranked[:2]
    assert rendezvous.rank_above(w, uuid.UUID(ranked[2]), strs) == ranked[:2]
    assert rendezvous.wins(w, ranked[0], strs)
    assert rendezvous.wins(w, uuid.UUID(ranked[0]), strs)
    assert not rendezvous.wins(w, ranked[1], strs)
    # Self-affinity holds for a string candidate equal to a UUID workload.
    assert rendezvous.winner(uuid.UUID(w), [*strs, w]) == w


def test_mixed_and_uppercase_candidates_are_returned_as_given() -> None:
    w = uuid.uuid4()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    given_: list[uuid.UUID | str] = [str(a).upper(), b, str(c)]
    ranked = rendezvous.rank(w, given_)
    assert sorted(map(str, ranked)) == sorted(map(str, given_))
    assert [uuid.UUID(str(x)) for x in ranked] == rendezvous.rank(w, [a, b, c])
    assert rendezvous.winner(w, given_) in given_
    # Of duplicates (by UUID value), the first given is the one returned.
    duplicates: list[uuid.UUID | str] = [str(a), a]
    assert rendezvous.rank(w, duplicates) == [str(a)]


@given(uuids, st.lists(uuids, min_size=1, max_size=12, unique=True))
def test_string_inputs_rank_like_uuid_inputs(w: uuid.UUID, cs: list[uuid.UUID]) -> None:
    strs = [str(c) for c in cs]
    assert rendezvous.rank(str(w), strs) == [str(c) for c in rendezvous.rank(w, cs)]
    assert rendezvous.winner(str(w), strs) == str(rendezvous.winner(w, cs))
