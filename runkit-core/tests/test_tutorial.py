"""The tutorial (docs/tutorial/index.md) works as written.

The page shows the code of ``docs/tutorial/library`` through snippet markers;
these tests check that every snippet it shows exists, then run that code the
way the page tells a reader to: the one-program demo on the memory driver, and
``runkit run`` on PostgreSQL with commands sent from other programs.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tutorial"
PAGE = TUTORIAL / "index.md"
RUNKIT = Path(sys.executable).with_name("runkit")
LOAN_SECONDS = "3"

# The block form of pymdownx.snippets: not valid Python, so formatters leave it alone.
SNIPPET = re.compile(r"^--8<--\n([^:\n]+)(?::([\w-]+))?\n--8<--$", re.MULTILINE)


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOGMA_", "LIBRARY_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TUTORIAL), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_every_snippet_the_page_shows_exists() -> None:
    text = PAGE.read_text(encoding="utf-8")
    shown = SNIPPET.findall(text)
    mangled = [line for line in text.splitlines() if "8<" in line or "8 <" in line]
    assert len(mangled) == 2 * len(shown), f"snippet markers not in block form: {mangled}"
    assert len(shown) >= 10, "the tutorial should show the library's code"
    for path, section in shown:
        source = (ROOT / path).read_text(encoding="utf-8")
        if section:
            assert f"# --8<-- [start:{section}]" in source, f"{path} has no section {section!r}"
            assert f"# --8<-- [end:{section}]" in source, f"{path} has no end of {section!r}"
    # Every section of the library is shown somewhere: the page tells the whole story.
    for source in (TUTORIAL / "library").glob("*.py"):
        relative = source.relative_to(ROOT).as_posix()
        for section in re.findall(r"# --8<-- \[start:([\w-]+)\]", source.read_text()):
            assert (relative, section) in shown, f"{relative}:{section} is not on the page"


def test_the_page_shows_all_of_every_file() -> None:
    # A reader builds each file from the page's blocks: code outside the shown
    # sections (say an `if __name__ == "__main__":` block) would be missing.
    section = re.compile(
        r"^# --8<-- \[start:([\w-]+)\]\n.*?^# --8<-- \[end:\1\]\n?", re.MULTILINE | re.DOTALL
    )
    for source in sorted((TUTORIAL / "library").glob("*.py")):
        text = section.sub("", source.read_text(encoding="utf-8"))
        tree = ast.parse(text)
        rest = [
            node
            for node in tree.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
            and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
        ]
        shown = [ast.unparse(node).splitlines()[0] for node in rest]
        assert not shown, f"{source.name}: code the page does not show: {shown}"


@pytest.fixture
def store(postgres_dsn: str, postgres_schema: str) -> str:
    from runkit_postgres.testing import url_for

    return url_for(postgres_dsn, schema=postgres_schema)


@pytest.fixture
def read_model(postgres_dsn: str) -> Iterator[str]:
    """A ``postgresql://`` URL for the library's read model: a fresh schema of its own."""
    import psycopg
    from psycopg import sql

    from runkit_postgres.testing import drop_schema, unique_schema, url_for

    schema = unique_schema("library")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield url_for(postgres_dsn, options=f"-csearch_path={schema}")
    drop_schema(postgres_dsn, schema)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_one_program_demo_runs(backend: str, read_model: str, tmp_path: Path) -> None:
    code = f"import anyio, library.demo as d; print(anyio.run(d.main, backend={backend!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_environment(LIBRARY_DB=read_model),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "observed: loan 1 of book emma to grace became overdue" in result.stdout
    assert "LoanRow(book_id='dune', loan=1, member='ada'" in result.stdout
    assert "status='returned'" in result.stdout
    assert "LoanRow(book_id='emma', loan=1, member='grace'" in result.stdout
    assert "status='overdue'" in result.stdout
    # Run again on the same read model: the demo starts it afresh.
    again = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_environment(LIBRARY_DB=read_model),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    rows = again.stdout.splitlines()[-1]
    assert rows.count("LoanRow(") == 2, rows  # not four: the first run's rows are gone
    assert re.findall(r"status='(\w+)'", rows) == ["returned", "overdue"], rows


@pytest.fixture(params=["asyncio", "trio"])
def node(
    request: pytest.FixtureRequest, store: str, read_model: str, tmp_path: Path
) -> Iterator[subprocess.Popen[str]]:
    """``runkit run library.app:app`` on PostgreSQL, as the tutorial starts it."""
    log = (tmp_path / "node.log").open("w")
    process = subprocess.Popen(
        [str(RUNKIT), "run", "--backend", request.param, "library.app:app"],
        cwd=tmp_path,
        env=_environment(
            DOGMA_PERSISTENCE_URL=store, LIBRARY_DB=read_model, LIBRARY_LOAN_SECONDS=LOAN_SECONDS
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Like the reader, wait for the node to say it runs before sending commands.
        deadline = time.monotonic() + 60
        while "running library on" not in (tmp_path / "node.log").read_text():
            assert process.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _library(tmp_path: Path, store: str, read_model: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "library", *args],
        cwd=tmp_path,
        # A client runs no handlers; `loans` reads the read model.
        env=_environment(DOGMA_PERSISTENCE_URL=store, LIBRARY_DB=read_model),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _loans(read_model: str) -> list[tuple[str, int, str, str]]:
    import psycopg

    with psycopg.connect(read_model) as conn:
        try:
            rows = conn.execute(
                "SELECT book_id, loan, member, status FROM loans ORDER BY book_id, loan"
            ).fetchall()
        except psycopg.errors.UndefinedTable:  # the schema is not there yet
            return []
    return [(str(a), int(b), str(c), str(d)) for a, b, c, d in rows]


@pytest.mark.timeout(120)
def test_runkit_run_on_postgres_with_commands_from_another_program(
    node: subprocess.Popen[str], store: str, read_model: str, tmp_path: Path
) -> None:
    _library(tmp_path, store, read_model, "borrow", "dune", "ada")
    _library(tmp_path, store, read_model, "borrow", "emma", "grace")
    _library(tmp_path, store, read_model, "borrow", "dune", "linus")  # refused: dune is out
    _library(tmp_path, store, read_model, "return", "dune", "ada")
    expected = [("dune", 1, "ada", "returned"), ("emma", 1, "grace", "overdue")]
    log = tmp_path / "node.log"
    deadline = time.monotonic() + 60
    while _loans(read_model) != expected:
        assert node.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{_loans(read_model)}\n{log.read_text()}"
        time.sleep(0.2)
    listing = _library(tmp_path, store, read_model, "loans")
    assert re.search(r"emma\s+loan 1\s+grace\s+overdue", listing), listing
    # Each of the engine's event streams (one per partition) has its own checkpoint.
    import psycopg

    with psycopg.connect(read_model) as conn:
        streams = [row[0] for row in conn.execute("SELECT stream_id FROM checkpoints")]
    assert streams
    assert all(re.fullmatch(r"[0-9a-f-]{36}", s) for s in streams), streams
    node.send_signal(signal.SIGINT)
    assert node.wait(timeout=30) == 0, log.read_text()


APPLY_ONCE = """
import sys
from datetime import UTC, datetime

import anyio

from library.catalogue import Database, LoansProjection, loans
from library.messages import BookBorrowed, BookReturned


class Scope:
    def __init__(self, offset, checkpoint):
        self.stream_id, self.offset, self.checkpoint_offset = "s-1", offset, checkpoint


db = Database(sys.argv[1])
projection = LoansProjection(db)
event = BookBorrowed(book_id="dune", member="ada", loan=1, due_at=datetime(2026, 1, 1, tzinfo=UTC))


async def scenario():
    assert await projection.checkpoint_offset("s-1") == 0
    assert await projection.handle_event(Scope(0, 0), event) == 1
    # Delivered again (a retry, a new owner): not applied twice.
    assert await projection.handle_event(Scope(0, 0), event) == 1
    # The engine thinks the read model is elsewhere: nothing changes, and the
    # engine is told where to resume.
    assert await projection.handle_event(Scope(3, 3), event) == 1
    assert await projection.checkpoint_offset("s-1") == 1
    # A stale delivery of a later event, applied already: nothing changes either.
    returned = BookReturned(book_id="dune", member="ada", loan=1)
    assert await projection.handle_event(Scope(1, 1), returned) == 2
    assert await projection.handle_event(Scope(1, 1), returned) == 2
    assert await projection.handle_event(Scope(0, 0), event) == 2
    assert await projection.checkpoint_offset("s-1") == 2


anyio.run(scenario, backend=sys.argv[2])
print([(r.book_id, r.loan, r.status) for r in loans(db)])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_read_model_applies_each_event_once(
    backend: str, read_model: str, tmp_path: Path
) -> None:
    """ADR-26: the projection applies an event once, whatever the engine redelivers."""
    result = subprocess.run(
        [sys.executable, "-c", APPLY_ONCE, read_model, backend],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('dune', 1, 'returned')]"
