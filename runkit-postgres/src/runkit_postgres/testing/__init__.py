"""A throwaway PostgreSQL server for tests and benchmarks.

::

    with PostgresServer() as server:
        provider = PostgresProvider(server.dsn, schema=unique_schema())

``PostgresServer`` runs ``initdb`` and ``pg_ctl`` from the local PostgreSQL
installation (``PGBIN``, else ``pg_config --bindir``) in a temporary directory,
on a free loopback port, and removes everything on exit. PostgreSQL refuses to
run as root, so as root the server runs as the ``postgres`` OS user via
``runuser``. If ``RUNKIT_TEST_PG_DSN`` is set, that server is used instead and
nothing is started.

For outage tests, ``pause()`` stops a server abruptly (as a crash would) and
``resume()`` starts it again on the same data directory and port; give such a
test its own ``PostgresServer(use_environment=False)``.

pytest fixtures (``postgres_server``, ``postgres_dsn``, ``postgres_schema``)
live in ``runkit_postgres.testing.pytest_plugin``; import them into a
``conftest.py``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

__all__ = ["DSN_VARIABLE", "PostgresServer", "drop_schema", "unique_schema", "url_for"]

#: Environment variable naming an existing server to use instead of starting one.
DSN_VARIABLE: Final = "RUNKIT_TEST_PG_DSN"

#: Settings for fast, non-durable throwaway servers (tests).
FAST_SETTINGS: Final[Mapping[str, str]] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


# Run by a watchdog process: when the launching process exits for any reason
# (even SIGKILL, which skips fixture teardown), the pipe on stdin reaches EOF,
# and the watchdog stops the server and deletes its files.
_WATCHDOG = """
import os, shutil, subprocess, sys
pg_ctl, directory, as_root = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.stdin.buffer.read()
data = os.path.join(directory, "data")
if os.path.exists(os.path.join(data, "postmaster.pid")):
    command = [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"]
    if as_root:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
shutil.rmtree(directory, ignore_errors=True)
"""


def unique_schema(prefix: str = "t") -> str:
    """A schema name no other test or process uses."""
    return f"{prefix}_{uuid.uuid4().hex}"


def url_for(dsn: str, **params: str | int) -> str:
    """A ``postgresql://`` URL for *dsn* (key/value or URL) plus runkit parameters.

    For code that takes a persistence URL, such as
    ``runkit.with_persistence(url_for(dsn, schema=unique_schema()))``.
    """
    pairs = [(k, str(v)) for k, v in conninfo_to_dict(dsn).items()]
    pairs += [(k, str(v)) for k, v in params.items()]
    return "postgresql://?" + urlencode(pairs, quote_via=quote)


def drop_schema(dsn: str, schema: str) -> None:
    """Drop *schema* and everything in it, if it exists."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _pg_bindir() -> Path:
    if os.environ.get("PGBIN"):
        return Path(os.environ["PGBIN"])
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], check=True, capture_output=True, text=True
        ).stdout
        bindir = Path(out.strip())
        if (bindir / "initdb").exists():
            return bindir
    except (OSError, subprocess.CalledProcessError):
        pass
    # Debian keeps the server programs out of PATH, per major version.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise RuntimeError(
        "PostgreSQL server programs (initdb, pg_ctl) not found: install PostgreSQL "
        f"(e.g. apt-get install postgresql), set PGBIN, or set {DSN_VARIABLE} to a server's DSN"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """Start a throwaway PostgreSQL server (a context manager).

    ``dsn`` (a libpq key/value string) and ``url`` are set once entered; they
    connect as the superuser ``postgres`` to the ``postgres`` database over TCP.

    :param durable: keep PostgreSQL's durable defaults (fsync on); otherwise
        use ``FAST_SETTINGS``, which is fine for tests.
    :param settings: extra server settings (``-c name=value``).
    :param use_environment: use ``RUNKIT_TEST_PG_DSN`` when it is set.
    """

    def __init__(
        self,
        *,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        use_environment: bool = True,
    ) -> None:
        self._settings = {
            "listen_addresses": "127.0.0.1",
            "max_connections": "300",
            **({} if durable else FAST_SETTINGS),
            **(settings or {}),
        }
        self._use_environment = use_environment
        self._dir: Path | None = None
        self._bindir: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.dsn = ""
        self.external = False

    @staticmethod
    def programs_available() -> bool:
        """Whether the PostgreSQL server programs (``initdb``, ``pg_ctl``) are installed.

        For tests that must start a server of their own (not one named by
        ``RUNKIT_TEST_PG_DSN``), to skip when they cannot.
        """
        try:
            bindir = _pg_bindir()
        except RuntimeError:
            return False
        return (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL for the server (only for a server this object started)."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def settings(self) -> Mapping[str, str]:
        """The settings the server was started with."""
        return dict(self._settings)

    def __enter__(self) -> Self:
        if self._use_environment and os.environ.get(DSN_VARIABLE):
            self.dsn = os.environ[DSN_VARIABLE]
            self.external = True
            return self
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self, *args: str) -> list[str]:
        # initdb and pg_ctl refuse to run as root.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> None:
        """Create a cluster and start the server; prefer the context manager."""
        self._bindir = _pg_bindir()
        self._dir = Path(tempfile.mkdtemp(prefix="runkit-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._dir, "postgres", "postgres")
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(self._bindir / "pg_ctl"),
                str(self._dir),
                "1" if os.geteuid() == 0 else "0",
            ],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to our process group must not kill it first
        )
        try:
            subprocess.run(
                self._command(
                    str(self._bindir / "initdb"),
                    "-D",
                    str(self._dir / "data"),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ),
                check=True,
                capture_output=True,
                text=True,
            )
            for attempt in range(3):  # the port may be taken between probe and bind
                self.port = _free_port()
                result = self._pg_start()
                if result.returncode == 0:
                    break
                if attempt == 2:
                    raise RuntimeError(  # noqa: TRY301 - the cleanup below applies
                        self._start_failure(result)
                    )
        except BaseException:
            self.stop()
            raise
        self.dsn = f"host={self.host} port={self.port} user=postgres dbname=postgres"

    def _pg_start(self) -> subprocess.CompletedProcess[str]:
        """Run ``pg_ctl start`` on the data directory and ``self.port``; wait until it is up."""
        assert self._dir is not None
        assert self._bindir is not None
        options = " ".join(
            [f"-p {self.port}", f"-k {self._dir}"]
            + [f"-c {k}={v}" for k, v in self._settings.items()]
        )
        return subprocess.run(
            self._command(
                str(self._bindir / "pg_ctl"),
                "-D",
                str(self._dir / "data"),
                "-l",
                str(self._dir / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ),
            check=False,
            capture_output=True,
            text=True,
        )

    def _start_failure(self, result: subprocess.CompletedProcess[str]) -> str:
        assert self._dir is not None
        log = (self._dir / "log").read_text(errors="replace")[-2000:]
        return f"PostgreSQL did not start: {result.stderr}\n{log}"

    def _started_here(self, what: str) -> tuple[Path, Path]:
        if self.external or self._dir is None or self._bindir is None:
            raise RuntimeError(f"{what}() needs a server this object started (and not stopped)")
        return self._dir, self._bindir

    def pause(self) -> None:
        """Stop the server abruptly (``pg_ctl stop -m immediate``, like a crash), keeping its files.

        Connections are cut at once and new ones are refused until ``resume()``
        starts the server again on the same data directory and port. Only for a
        server this object started; a no-op if it is already paused.

        With ``FAST_SETTINGS`` (``synchronous_commit=off``) the transactions
        committed in the last fraction of a second are lost, as in a real crash
        of such a server; to keep every acknowledged commit, start the server
        with ``settings={"synchronous_commit": "on"}`` (``fsync`` may stay off:
        the files survive, only the server's processes stop).
        """
        directory, bindir = self._started_here("pause")
        if not (directory / "data" / "postmaster.pid").exists():
            return
        result = self._kill(directory, bindir)
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not stop: {result.stderr}")

    def resume(self) -> None:
        """Start a server stopped by ``pause()`` again, on the same data directory and port.

        It runs crash recovery first, and returns once it accepts connections
        (the data committed before the pause is there). Raises ``RuntimeError``
        if it does not start (the port may have been taken meanwhile). A no-op
        if the server is running.
        """
        directory, _ = self._started_here("resume")
        if (directory / "data" / "postmaster.pid").exists():
            return
        result = self._pg_start()
        if result.returncode != 0:
            raise RuntimeError(self._start_failure(result))

    def stop(self) -> None:
        """Stop the server and delete its files (no-op for an external server)."""
        directory, self._dir = self._dir, None
        watchdog, self._watchdog = self._watchdog, None
        try:
            if directory is not None and self._bindir is not None:
                self._stop(directory, self._bindir)
        finally:
            if watchdog is not None:
                assert watchdog.stdin is not None
                watchdog.stdin.close()  # EOF: it cleans up whatever is left, and exits
                watchdog.wait()

    def _stop(self, directory: Path, bindir: Path) -> None:
        if (directory / "data" / "postmaster.pid").exists():
            self._kill(directory, bindir)
        shutil.rmtree(directory, ignore_errors=True)

    def _kill(self, directory: Path, bindir: Path) -> subprocess.CompletedProcess[str]:
        """Stop the server at once, as a crash would (``pg_ctl stop -m immediate``)."""
        return subprocess.run(
            self._command(
                str(bindir / "pg_ctl"),
                "-D",
                str(directory / "data"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ),
            check=False,
            capture_output=True,
            text=True,
        )

    def version(self) -> str:
        """The server's ``version()`` string."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT version()").fetchone()
            return str(row[0]) if row else ""
