"""Identifiers made by runkit.engine.ids: random ones and derived ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections import Counter

from runkit.engine.ids import derived_id, new_id

CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_are_canonical_version_4_uuids() -> None:
    for _ in range(2000):
        text = new_id()
        assert CANONICAL.fullmatch(text), text
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_ids_are_unique() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_random_bits_are_all_used() -> None:
    # Every one of the 122 random bits takes both values, and about as often:
    # a formatting slip (a fixed or repeated digit) would show here.
    counts: Counter[int] = Counter()
    n = 4000
    for _ in range(n):
        value = uuid.UUID(new_id()).int
        counts.update(bit for bit in range(128) if value >> bit & 1)
    fixed = {bit for bit in range(128) if counts[bit] in (0, n)}
    # The version (bits 76-79: 0100) and the variant (bits 62-63: 10).
    assert fixed == {76, 77, 78, 79, 62, 63}
    assert all(0.4 * n < counts[bit] < 0.6 * n for bit in set(range(128)) - fixed)


def test_processes_make_different_ids() -> None:
    code = "from runkit.engine.ids import derived_id, new_id; print(new_id())"
    made = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        for _ in range(3)
    }
    assert len(made) == 3


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_id()  # the parent has unused IDs ready
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ID and leave at once
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = [new_id() for _ in range(200)]  # more than one batch of ready IDs
    assert CANONICAL.fullmatch(child), child
    assert child not in parent


def test_threads_never_share_an_id() -> None:
    made: list[list[str]] = [[] for _ in range(8)]

    def make(out: list[str]) -> None:
        out.extend(new_id() for _ in range(20_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for out in made for i in out]
    assert len(set(ids)) == len(ids) == 160_000


def test_derived_ids_equal_uuid5() -> None:
    names = ["", "deposit/command/0", "a/b/c/" * 40, "non-ascii: \u00e9\u4e2d"]
    for i in range(500):
        namespace = str(uuid.uuid4())
        name = names[i % len(names)] + str(i)
        assert derived_id(namespace, name) == str(uuid.uuid5(uuid.UUID(namespace), name))
        assert derived_id(namespace.upper(), name) == derived_id(namespace, name)


def test_derived_ids_accept_every_form_uuid_accepts() -> None:
    namespace = uuid.uuid4()
    expected = str(uuid.uuid5(namespace, "x"))
    for form in (namespace.hex, f"{{{namespace}}}", namespace.urn):
        assert derived_id(form, "x") == expected
