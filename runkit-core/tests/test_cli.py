"""The runkit CLI: env and drivers (run and poison are tested with the engine)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest

import dogma
from runkit.cli import main


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_env_documents_every_variable_and_says_valid() -> None:
    status, text = run("env")
    assert status == 0
    for name in ("DOGMA_SITE_NAME", "DOGMA_NODE_ID", "DOGMA_PERSISTENCE_URL"):
        assert name in text
    assert "DOGMA_NODE_ID=(unset)" in text
    assert text.rstrip().endswith("The environment is valid.")


def test_env_reports_invalid_variables_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_NODE_ID", "nope")
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "postgresql://bob:hunter2@db/app")
    status, text = run("env")
    assert status == 2
    assert "INVALID: 1 problem with the DOGMA_* environment variables" in text
    assert "DOGMA_NODE_ID='nope'" in text
    assert "DOGMA_PERSISTENCE_URL=postgresql://bob:***@db/app" in text
    assert "hunter2" not in text


@pytest.mark.parametrize("listen", ["0.0.0.0:7400", "[::]:7400"])
def test_env_reports_a_wildcard_listen_address_without_an_advertise_address(
    monkeypatch: pytest.MonkeyPatch, listen: str
) -> None:
    # Each variable is valid alone, but `runkit run` stops with the pair.
    monkeypatch.setenv("DOGMA_LISTEN_ADDRESS", listen)
    status, text = run("env")
    assert status == 2
    assert text.endswith(
        f"INVALID: DOGMA_LISTEN_ADDRESS={listen!r} is a wildcard address, which peers cannot "
        "reach: set DOGMA_ADVERTISE_ADDRESS too, e.g. "
        "DOGMA_ADVERTISE_ADDRESS=node-1.internal:7000 (runkit run stops without it)\n"
    )
    monkeypatch.setenv("DOGMA_ADVERTISE_ADDRESS", "10.0.0.5:7400")
    status, text = run("env")
    assert (status, text.rstrip().rsplit("\n", 1)[-1]) == (0, "The environment is valid.")


def test_drivers_lists_installed_schemes() -> None:
    status, text = run("drivers")
    assert status == 0
    assert text.splitlines()[0].split() == ["plugin", "module", "schemes"]
    assert "memory://" in text
    assert "postgres://, postgresql://" in text


def test_bad_app_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("poison", "list", "no-colon")
    assert status == 2
    assert "'no-colon' is not MODULE:ATTR" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runkit.cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("env", "drivers", "run", "poison"):
        assert command in result.stdout


def test_run_uses_memory_when_unset_and_stops_gracefully_on_sigint(tmp_path: object) -> None:
    import os
    import signal

    env = {**os.environ, "BANK_READ_DB": str(tmp_path) + "/bank.sqlite3"}
    env = {k: v for k, v in env.items() if not k.startswith("DOGMA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runkit.cli", "run", "bank:app"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == (
            "DOGMA_PERSISTENCE_URL is not set; using the embedded memory driver "
            "(memory:///runkit): state is lost when the process exits\n"
        )
        assert proc.stdout.readline().startswith("starting node ")
        assert "running bank on memory:///runkit;" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "received SIGINT: stopping (finishing in-flight work; send it again" in out
    assert out.rstrip().endswith("stopped")


def test_run_rejects_objects_that_are_not_applications(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("run", "runkit.cli:CLIError")
    assert status == 2
    assert capsys.readouterr().err == (
        "runkit run: 'runkit.cli:CLIError' is the class CLIError, not a Dogma application "
        "(it has no configure(c) method)\n"
    )


@pytest.mark.parametrize("action", [("list",), ("show", "x"), ("requeue", "x")])
def test_poison_needs_the_nodes_store(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], action: tuple[str, ...]
) -> None:
    # Named as its usage errors name it: the whole command.
    monkeypatch.delenv("DOGMA_PERSISTENCE_URL", raising=False)
    status, _ = run("poison", *action[:1], "bank:app", *action[1:])
    assert status == 2
    assert capsys.readouterr().err == (
        f"runkit poison {action[0]}: set DOGMA_PERSISTENCE_URL to the store the "
        "application's nodes use\n"
    )


def test_poison_refuses_a_store_the_app_never_ran_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///never-ran")
    status, _ = run("poison", "list", "bank:app")
    assert status == 2
    assert "has never run on this store" in capsys.readouterr().err


def test_nodes_lists_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from runkit.engine.cluster.membership import Membership
    from runkit.engine.settings import EngineSettings
    from runkit_memory import MemoryProvider

    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-nodes")
    settings = EngineSettings(advertise_address="node-1.internal:7000")

    client = EngineSettings()

    async def heartbeat_once() -> None:
        provider = MemoryProvider("cli-nodes")
        membership = Membership(provider, settings)
        # A runkit.Client is a member too, but owns nothing: it is not a node.
        client_membership = Membership(provider, client, role="client")
        async with anyio.create_task_group() as tg:
            await tg.start(membership.run)
            await tg.start(client_membership.run)
            status, text = await anyio.to_thread.run_sync(lambda: run("nodes"))
            assert status == 0
            rows = {line.split()[0]: line.split() for line in text.splitlines()[1:-1]}
            assert rows[str(settings.node_id)][1:4] == ["live", "node", "node-1.internal:7000"]
            assert rows[str(client.node_id)][1:4] == ["live", "client", "-"]
            assert text.rstrip().endswith("1 live node(s), 0 expired; 1 live client(s)")
            tg.cancel_scope.cancel()

    anyio.run(heartbeat_once)


def test_nodes_and_status_show_a_node_s_address_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    import anyio

    from runkit.engine.cluster.membership import Membership
    from runkit.engine.settings import EngineSettings
    from runkit_memory import MemoryProvider

    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-addresses")
    shown = {
        # A wildcard on the advertised port says nothing more: one address.
        EngineSettings(
            listen_address="0.0.0.0:7400", advertise_address="127.0.0.1:7400"
        ): "127.0.0.1:7400",
        # Another host or port does (behind NAT, or a port mapping): labelled.
        EngineSettings(
            listen_address="10.0.0.5:7400", advertise_address="node-2.internal:7000"
        ): "node-2.internal:7000 (listens on 10.0.0.5:7400)",
    }

    async def heartbeat_once() -> None:
        provider = MemoryProvider("cli-addresses")
        async with anyio.create_task_group() as tg:
            for settings in shown:
                await tg.start(Membership(provider, settings).run)
            for command in ("nodes", "status"):
                status, text = await anyio.to_thread.run_sync(run, command)
                assert status == 0
                lines = {line.split()[0]: line for line in text.splitlines()}
                for settings, address in shown.items():
                    row = lines[str(settings.node_id)]
                    assert f"  {address}  " in row, (command, row)
                    assert ", " not in row, (command, row)
            tg.cancel_scope.cancel()

    anyio.run(heartbeat_once)


MEMORY_HINT = (
    "a memory:// store lives inside the process that opened it, so the nodes of "
    "another process cannot be seen through it: run them on a shared store "
    "(postgresql://, dynamodb:// or s3://) and set DOGMA_PERSISTENCE_URL to it"
)


def test_nodes_on_an_empty_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-no-nodes")
    status, text = run("nodes")
    assert status == 0
    assert text == f"no nodes have heartbeat records in this store ({MEMORY_HINT})\n"


def test_commands_on_a_memory_store_say_it_is_their_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `runkit run` shows "running ... on memory:///runkit"; the store it names is
    # in that process, so "start a node first" would send the reader in circles.
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///runkit")
    command = '{"customer_id":"C1","customer_name":"Ann","account_id":"A1","account_name":"S"}'
    status, _ = run("execute", "bank:app", "OpenAccountForNewCustomer", command)
    assert status == 2
    assert capsys.readouterr().err == (
        f"runkit execute: application 'bank' has never run on this store: {MEMORY_HINT}\n"
    )
    status, _ = run("poison", "list", "bank:app")
    assert status == 2
    assert capsys.readouterr().err.rstrip().endswith(f"; {MEMORY_HINT}")
    status, text = run("status", "bank:app")
    assert status == 0
    assert text.endswith(f"({MEMORY_HINT})\n")


# -- usage and configuration errors: one plain message, exit 2 ----------------------

APPS = """
import bank


class NeedsArgs:
    def __init__(self, db, cache):
        self.db = db

    def configure(self, c):
        raise AssertionError("never configured")


def needs_args(db):
    return bank.app


def not_an_app():
    return 42


def explodes():
    raise RuntimeError("the database exploded")


class BadKey:
    def configure(self, c):
        c.identity("bad", "not-a-uuid")


number = 42
"""


@pytest.fixture
def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh module of (broken) applications, importable in and out of process."""
    name = f"cliapps_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI expecting a usage error: exit 2 and one message on stderr, nothing else."""
    status, text = run(*argv)
    captured = capsys.readouterr()
    assert status == 2, (text, captured.err)
    assert "Traceback" not in captured.err
    return captured.err


def cli(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    """Run ``python -m runkit.cli`` in a subprocess with a clean DOGMA_* environment."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DOGMA_")}
    return subprocess.run(
        [sys.executable, "-m", "runkit.cli", *argv],
        capture_output=True,
        text=True,
        env={**environ, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_version_names_core_dogma_and_every_installed_driver(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.metadata

    status, _ = run("--version")
    assert status == 0
    drivers = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("runkit-dynamodb", "runkit-memory", "runkit-postgres", "runkit-s3")
    )
    assert capsys.readouterr().out == (
        f"runkit-core {importlib.metadata.version('runkit-core')}, "
        f"dogma-api {importlib.metadata.version('dogma-api')}; drivers: {drivers}\n"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-colon", "'no-colon' is not MODULE:ATTR, e.g. 'bank:app'"),
        (
            "no_such_module:app",
            "cannot import module 'no_such_module' of 'no_such_module:app': no module named "
            "'no_such_module' (run from the project directory, or install it)",
        ),
        ("bank:nope", "module 'bank' has no attribute 'nope'"),
        (
            "library/app.py:app",
            "'library/app.py' in 'library/app.py:app' is a file path; MODULE is a module's "
            "dotted name, importable from the current directory: e.g. 'library.app:app'",
        ),
        (
            "app.py:app",
            "'app.py' in 'app.py:app' is a file path; MODULE is a module's dotted name, "
            "importable from the current directory: e.g. 'app:app'",
        ),
        # "./" (the current directory) is no part of the dotted name.
        (
            "./badapp:app",
            "'./badapp' in './badapp:app' is a file path; MODULE is a module's dotted name, "
            "importable from the current directory: e.g. 'badapp:app'",
        ),
        (
            "./library/./app.py:app",
            "'./library/./app.py' in './library/./app.py:app' is a file path; MODULE is a "
            "module's dotted name, importable from the current directory: e.g. 'library.app:app'",
        ),
        (
            "{apps}:NeedsArgs",
            "'{apps}:NeedsArgs' is the class NeedsArgs that needs arguments (db, cache); point "
            "MODULE:ATTR at an application instance, or at a function or class that takes no "
            "arguments",
        ),
        (
            "{apps}:needs_args",
            "'{apps}:needs_args' is a function that needs arguments (db); point MODULE:ATTR at "
            "an application instance, or at a function or class that takes no arguments",
        ),
        (
            "{apps}:not_an_app",
            "'{apps}:not_an_app' is a function that returned int, which is not a Dogma "
            "application (it has no configure(c) method)",
        ),
        (
            "{apps}:number",
            "'{apps}:number' is of type int, not a Dogma application (an object with a "
            "configure(c) method, a class that takes no arguments, or a function returning one)",
        ),
    ],
)
def test_module_attr_problems(
    apps: str, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    spec, message = spec.format(apps=apps), message.format(apps=apps)
    assert error_of(capsys, "run", spec) == f"runkit run: {message}\n"


def test_an_invalid_application_lists_its_problems(
    apps: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = error_of(capsys, "run", f"{apps}:BadKey")
    assert err.startswith(f"runkit run: application {apps}.BadKey has 1 configuration problem\n")
    assert "  - application " in err
    assert "invalid identity key 'not-a-uuid'" in err


def test_a_bad_persistence_url_lists_every_problem(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "DOGMA_PERSISTENCE_URL", "postgresql://bob:hunter2@db/app?foo=bar&pool_max_size=ten"
    )
    err = error_of(capsys, "run", "bank:app")
    assert err == (
        "runkit run: 2 problems with the DOGMA_* environment variables\n"
        "  - DOGMA_PERSISTENCE_URL='postgresql://bob:***@db/app?foo=bar&pool_max_size=ten': "
        "postgresql:// URL has unknown parameter 'foo': it is neither a libpq connection "
        "parameter nor one of runkit's (max_record_bytes, max_value_bytes, pool_max_size, "
        "pool_min_size, pool_timeout, schema)\n"
        "  - DOGMA_PERSISTENCE_URL: postgresql:// URL parameter 'pool_max_size' must be an "
        "integer, not 'ten'\n"
    )


def test_env_reports_every_bad_url_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory://app?cache=1")
    status, text = run("env")
    assert status == 2
    assert "The environment is valid." not in text
    assert "INVALID: 2 problems with the DOGMA_* environment variables" in text
    assert "has a host ('app'); memory URLs have none" in text
    assert "DOGMA_PERSISTENCE_URL: memory:// URL has unknown parameter 'cache'" in text


def test_an_unknown_scheme_lists_the_installed_ones_and_invents_no_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "mysql://db/app")
    err = error_of(capsys, "run", "bank:app")
    assert "no persistence driver handles 'mysql' URLs (installed schemes: " in err
    assert "install a runkit driver plugin that handles it" in err
    assert "pip install" not in err


def test_a_driver_that_is_not_installed_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runkit.persistence import plugin_manager

    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "postgresql://db/app")
    pm = plugin_manager()
    postgres = pm.unregister(name="postgres")
    try:
        err = error_of(capsys, "run", "bank:app")
    finally:
        pm.register(postgres, name="postgres")
    assert err.startswith("runkit run: 1 problem with the DOGMA_* environment variables\n")
    assert "no persistence driver handles 'postgresql' URLs" in err
    assert "install the driver: pip install runkit-postgres" in err


@pytest.mark.parametrize("backend", ["trio", "uvloop"])
def test_a_backend_whose_package_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # as if it were not installed
    assert error_of(capsys, "run", "--backend", backend, "bank:app") == (
        f"runkit run: --backend {backend} needs the {backend} package, which is not "
        f"installed: pip install 'runkit-core[{backend}]', or use --backend asyncio\n"
    )


def test_backends_map_to_anyio_run_arguments() -> None:
    from runkit._backends import BACKENDS, missing_package, run_arguments

    assert BACKENDS == ("asyncio", "uvloop", "trio")
    assert run_arguments("asyncio") == {"backend": "asyncio"}
    assert run_arguments("uvloop") == {
        "backend": "asyncio",
        "backend_options": {"use_uvloop": True},
    }
    assert run_arguments("trio") == {"backend": "trio"}
    with pytest.raises(ValueError, match="unknown backend 'curio'"):
        run_arguments("curio")
    assert missing_package("asyncio") is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--partition-count", "ten"),
            "argument --partition-count: 'ten' is not a whole number; expected 1 to 4096",
        ),
        (
            ("--heartbeat-interval", "0"),
            "argument --heartbeat-interval: '0' is out of range; expected 0.05 to 60 seconds",
        ),
        (
            ("--max-attempts", "-1"),
            "argument --max-attempts: '-1' is out of range; expected 1 to 1,000,000",
        ),
        (
            ("--tls-cert", "/nope/node.crt"),
            "--tls-cert '/nope/node.crt' does not exist",
        ),
    ],
)
def test_bad_flag_values(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    err = error_of(capsys, "run", *argv, "bank:app")
    assert err == f"runkit run: {message} (see 'runkit run --help')\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "runkit: the following arguments are required: COMMAND"),
        (("-v",), "runkit: the following arguments are required: COMMAND"),
        (("--nope",), "runkit: the following arguments are required: COMMAND"),
        (("env", "x"), "runkit env: unrecognized arguments: x"),
        (("drivers", "--nope"), "runkit drivers: unrecognized arguments: --nope"),
        (("run",), "runkit run: the following arguments are required: MODULE:ATTR"),
        (("nodes", "x", "y"), "runkit nodes: unrecognized arguments: x y"),
        (
            ("status", "--watch", "0"),
            "runkit status: --watch needs a positive number of seconds, not 0",
        ),
        (
            ("execute",),
            "runkit execute: the following arguments are required: MODULE:ATTR, TYPE, JSON",
        ),
        (
            ("execute", "bank:app", "T", "{}", "--idempotency-key"),
            "runkit execute: argument --idempotency-key: expected one argument",
        ),
        (("poison",), "runkit poison: the following arguments are required: ACTION"),
        (
            ("poison", "show", "bank:app"),
            "runkit poison show: the following arguments are required: COMMAND_ID",
        ),
        (("poison", "list", "bank:app", "x"), "runkit poison list: unrecognized arguments: x"),
    ],
)
def test_usage_errors_are_one_line_pointing_at_help(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    # The command whose arguments are wrong says so, and where to read about them.
    command = message.partition(":")[0]
    assert error_of(capsys, *argv) == f"{message} (see '{command} --help')\n"


@pytest.mark.parametrize(
    ("argv", "command", "fragment"),
    [
        (("bogus",), "runkit", "argument COMMAND: invalid choice: 'bogus' (choose from "),
        (("poison", "bogus"), "runkit poison", "argument ACTION: invalid choice: 'bogus' "),
        (("run", "--backend", "curio", "x:y"), "runkit run", "invalid choice: 'curio' "),
    ],
)
def test_invalid_choices_are_one_line_pointing_at_help(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], command: str, fragment: str
) -> None:
    # argparse words the list of choices differently across Python versions.
    err = error_of(capsys, *argv)
    assert err.count("\n") == 1
    assert err.startswith(f"{command}: ")
    assert fragment in err
    assert err.endswith(f") (see '{command} --help')\n")


def test_a_usage_error_s_message_is_one_line_even_if_argparse_wraps_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runkit.cli import _parser

    with pytest.raises(SystemExit) as exc:
        _parser().error("the following arguments\n  are required: COMMAND")
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "runkit: the following arguments are required: COMMAND (see 'runkit --help')\n"
    )


def test_help_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (("--help",), ("execute", "--help"), ("poison", "show", "-h")):
        status, _ = run(*argv)
        out = capsys.readouterr()
        assert (status, out.err) == (0, "")
        assert out.out.startswith(f"usage: runkit {' '.join(argv[:-1])}".rstrip() + " [-h]")


def test_tls_flags_come_in_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert error_of(capsys, "run", "--tls-ca", str(ca), "bank:app") == (
        "runkit run: --tls-ca needs --tls-cert and --tls-key (or DOGMA_TLS_CERT and "
        "DOGMA_TLS_KEY): a node's certificate and key go together\n"
    )
    assert error_of(capsys, "run", "--tls-cert", str(ca), "bank:app") == (
        "runkit run: --tls-cert needs --tls-key (or DOGMA_TLS_KEY): "
        "a node's certificate and key go together\n"
    )


def _tls_settings(argv: list[str]) -> tuple[str | None, str | None, str | None]:
    from runkit import _run
    from runkit.cli import _parser, _run_options

    args = _parser().parse_args(["run", *argv, "bank:app"])
    engine, _ = _run._engine(args.app, _run_options(args), io.StringIO())
    return engine.settings.tls_cert, engine.settings.tls_key, engine.settings.tls_ca


def test_a_tls_flag_beats_its_own_variable_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--tls-cert/--tls-key keep DOGMA_TLS_CA; --tls-ca takes the certificate from the variables."""
    env_cert, env_key, env_ca, cert, key, ca = (
        str(tmp_path / name) for name in ("e.crt", "e.key", "e-ca.crt", "f.crt", "f.key", "ca.crt")
    )
    for path in (env_cert, env_key, env_ca, cert, key, ca):
        Path(path).write_text("-----BEGIN X-----\n")
    monkeypatch.setenv("DOGMA_TLS_CERT", env_cert)
    monkeypatch.setenv("DOGMA_TLS_KEY", env_key)
    monkeypatch.setenv("DOGMA_TLS_CA", env_ca)
    # Dropping the CA would trust any peer's self-signed certificate by fingerprint.
    assert _tls_settings(["--tls-cert", cert, "--tls-key", key]) == (cert, key, env_ca)
    assert _tls_settings(["--tls-key", key]) == (env_cert, key, env_ca)
    assert _tls_settings(["--tls-ca", ca]) == (env_cert, env_key, ca)
    monkeypatch.delenv("DOGMA_TLS_CA")
    assert _tls_settings(["--tls-ca", ca]) == (env_cert, env_key, ca)
    assert _tls_settings([]) == (env_cert, env_key, None)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--retry-base-delay", "5"],
            {"DOGMA_RETRY_MAX_DELAY": "1"},
            "--retry-base-delay (5) is above DOGMA_RETRY_MAX_DELAY (1)",
        ),
        (
            ["--retry-base-delay", "50"],
            {},
            "--retry-base-delay (50) is above the default retry max delay (30)",
        ),
        (
            ["--retry-max-delay", "1"],
            {"DOGMA_RETRY_BASE_DELAY": "9"},
            "DOGMA_RETRY_BASE_DELAY (9) is above --retry-max-delay (1)",
        ),
        (
            ["--retry-max-delay", "0.01"],
            {},
            "the default retry base delay (0.1) is above --retry-max-delay (0.01)",
        ),
        (
            ["--retry-base-delay", "3", "--retry-max-delay", "2"],
            {"DOGMA_RETRY_BASE_DELAY": "1", "DOGMA_RETRY_MAX_DELAY": "60"},
            "--retry-base-delay (3) is above --retry-max-delay (2)",
        ),
    ],
)
def test_contradicting_retry_delays_name_the_flag_or_variable_of_each(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert error_of(capsys, "run", *argv, "bank:app") == (
        f"runkit run: {message}; the retry max delay must be at least the base delay\n"
    )


def test_flags_reach_the_settings_and_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from runkit import _run
    from runkit.cli import _parser, _run_options

    cert, key = tmp_path / "node.crt", tmp_path / "node.key"
    for path in (cert, key):
        path.write_text("-----BEGIN X-----\n")
    monkeypatch.setenv("DOGMA_PARTITION_COUNT", "64")
    monkeypatch.setenv("DOGMA_HEARTBEAT_INTERVAL", "3")
    monkeypatch.setenv("DOGMA_RETRY_BASE_DELAY", "0.5")
    args = _parser().parse_args(
        [
            "run",
            "--partition-count=8",
            "--backlog-limit=20",
            "--start-timeout=7.5",
            "--max-attempts=2",
            "--retry-max-delay=9",
            f"--tls-cert={cert}",
            f"--tls-key={key}",
            "bank:App",
        ]
    )
    out = io.StringIO()
    engine, url = _run._engine(args.app, _run_options(args), out)
    s = engine.settings
    assert url == "memory:///runkit"
    assert (s.partition_count, s.heartbeat_interval) == (8, 3.0)  # flag, then environment
    assert (s.backlog_limit, s.start_timeout) == (20, 7.5)
    assert (s.max_attempts, s.retry_base_delay, s.retry_max_delay) == (2, 0.5, 9.0)
    assert (s.tls_cert, s.tls_key, s.tls_ca) == (str(cert), str(key), None)
    assert out.getvalue().startswith("DOGMA_PERSISTENCE_URL is not set; using the embedded")


# -- the same through a real process: exit codes, and no traceback -----------------


def test_subprocess_usage_errors_exit_2_without_a_traceback(apps: str, tmp_path: Path) -> None:
    cases = [
        (("run", f"{apps}:NeedsArgs"), {}, "needs arguments (db, cache)"),
        (("run", "bank:app"), {"DOGMA_PERSISTENCE_URL": "s3:///Bad_Bucket?zz=1"}, "zz"),
        (("run", "--partition-count", "0", "bank:app"), {}, "'0' is out of range"),
        (("env",), {"DOGMA_PARTITION_COUNT": "many"}, "'many' is not a whole number"),
    ]
    for argv, env, fragment in cases:
        result = cli(*argv, env=env, cwd=tmp_path)
        assert result.returncode == 2, (argv, result.stderr)
        assert fragment in result.stderr + result.stdout, (argv, result.stderr)
        assert "Traceback" not in result.stderr, (argv, result.stderr)


def test_subprocess_unexpected_errors_keep_their_traceback_and_exit_1(
    apps: str, tmp_path: Path
) -> None:
    result = cli("run", f"{apps}:explodes", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith("RuntimeError: the database exploded")


def test_subprocess_ctrl_c_ends_a_command_with_one_line_and_status_130(tmp_path: Path) -> None:
    # Ctrl-C while `runkit execute` waits (here while it imports the application)
    # is the operator's choice, not a failure: no traceback.
    (tmp_path / "interrupted_app.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"
    )
    url = {"DOGMA_PERSISTENCE_URL": "memory:///interrupted"}
    result = cli("execute", "interrupted_app:app", "T", "{}", env=url, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (130, "runkit execute: interrupted\n")


def test_subprocess_usage_error_is_one_plain_line() -> None:
    result = cli("execute")
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "runkit execute: the following arguments are required: MODULE:ATTR, TYPE, JSON "
        "(see 'runkit execute --help')\n",
    )


def test_subprocess_execute_s_configuration_error_is_one_plain_line(tmp_path: Path) -> None:
    # In process, pytest's log handler hides what the CLI logs; a real process shows it.
    command = '{"customer_id":"C1","customer_name":"Ann","account_id":"A1","account_name":"S"}'
    argv = ("execute", "bank:app", "OpenAccountForNewCustomer", command)
    url = {"DOGMA_PERSISTENCE_URL": "memory:///runkit", "BANK_READ_DB": str(tmp_path / "r.db")}
    result = cli(*argv, env=url)
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        f"runkit execute: application 'bank' has never run on this store: {MEMORY_HINT}\n",
    )
    verbose = cli("-v", *argv, env=url)  # the client's own log, on request
    assert verbose.returncode == 2
    assert " joined the cluster: 0 live node(s)\n" in verbose.stderr


def test_subprocess_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("runkit-core ")
    assert ", dogma-api " in result.stdout


def _start(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DOGMA_")}
    return subprocess.Popen(
        [sys.executable, "-m", "runkit.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environ, **env},
        cwd=cwd,
    )


def _wait_running(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("running "):
            return "".join(lines)
    raise AssertionError(f"the node did not start: {''.join(lines)} {proc.communicate()[1]}")


def _run_then_stop(
    argv: list[str], tmp_path: Path, signum: signal.Signals
) -> tuple[str, str, str, int]:
    """Run a node until it says it is running, then send *signum*.

    Returns what it printed up to running, the rest of its output, its error
    output and its exit status.
    """
    proc = _start(argv, {"BANK_READ_DB": str(tmp_path / "bank.sqlite3")}, tmp_path)
    try:
        started = _wait_running(proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return started, out, err, proc.returncode


def test_run_instantiates_an_application_class(tmp_path: Path) -> None:
    argv = ["run", "--heartbeat-interval", "0.5", "--partition-count", "4", "bank:App"]
    _, out, err, status = _run_then_stop(argv, tmp_path, signal.SIGINT)
    assert status == 0, err
    assert "bank:App names a class: using a new instance, App()" in err
    assert out.rstrip().endswith("stopped")


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")
def test_run_on_uvloop_starts_and_stops_gracefully(tmp_path: Path) -> None:
    argv = ["run", "--backend", "uvloop", "--partition-count", "4", "bank:app"]
    started, out, err, status = _run_then_stop(argv, tmp_path, signal.SIGTERM)
    assert "(uvloop); Ctrl-C or SIGTERM stops it gracefully" in started
    assert status == 0, err
    assert "received SIGTERM: stopping" in out
    assert out.rstrip().endswith("stopped")


def test_a_duplicate_node_id_is_a_configuration_error(
    postgres_dsn: str, postgres_schema: str, tmp_path: Path
) -> None:
    from runkit_postgres.testing import url_for

    node_id = str(uuid.uuid4())
    env = {
        "DOGMA_PERSISTENCE_URL": url_for(postgres_dsn, schema=postgres_schema),
        "DOGMA_NODE_ID": node_id,
        # Long enough that a busy machine cannot starve the first node's heartbeat
        # for the three intervals after which the second would take its ID over.
        "DOGMA_HEARTBEAT_INTERVAL": "2",
        "BANK_READ_DB": str(tmp_path / "bank.sqlite3"),
    }
    first = _start(["run", "bank:app"], env, tmp_path)
    try:
        _wait_running(first)
        second = cli("run", "bank:app", env=env, cwd=tmp_path)
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert "EngineStopped" not in second.stderr
    assert f"runkit run: node ID {node_id} is in use by another process" in second.stderr
    assert "Give every node its own ID" in second.stderr
    assert first.returncode == 0


@pytest.fixture
def broken_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An installed distribution whose ``runkit`` entry point fails to import; returns its module.

    A fresh plugin manager (restored afterwards) loads the entry points again.
    """
    from runkit.persistence import _plugins

    module = f"broken_driver_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text("import no_such_dependency_of_the_driver\n")
    info = tmp_path / "fake_driver-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-driver\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[runkit]\nbroken = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_plugins, "_manager", None)
    monkeypatch.setattr(_plugins, "_broken", (), raising=False)
    return module


def test_a_driver_that_fails_to_import_is_listed_as_broken_and_skipped(
    broken_driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    import runkit

    status, text = run("drivers")
    assert status == 0
    lines = text.splitlines()
    assert lines[0].split() == ["plugin", "module", "schemes"]
    assert any(
        line.split()[:3] == ["memory", "runkit_memory._plugin", "memory://"] for line in lines
    )
    assert lines[-1].split() == [
        "broken",
        broken_driver,
        "BROKEN",
        "(fake-driver",
        "0.1):",
        "ModuleNotFoundError:",
        "No",
        "module",
        "named",
        "'no_such_dependency_of_the_driver'",
    ]
    assert run("env")[0] == 0
    assert repr(runkit.with_persistence("memory:///x")) == "with_persistence('memory:///x')"
    # Its scheme is unknown: the error says which driver failed to load, and why.
    with pytest.raises(runkit.ConfigurationError) as info:
        runkit.with_persistence("fake://x")
    assert info.value.problems[0].endswith(
        "install a runkit driver plugin that handles it; the driver 'broken' of fake-driver "
        "0.1 failed to load: ModuleNotFoundError: No module named "
        "'no_such_dependency_of_the_driver'"
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "runkit.persistence"]
    assert warnings == [
        "skipping the persistence driver 'broken' of fake-driver 0.1: importing "
        f"{broken_driver} failed: ModuleNotFoundError: No module named "
        "'no_such_dependency_of_the_driver'"
    ]


def test_drivers_with_none_installed_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runkit.persistence import installed_schemes, plugin_manager

    pm = plugin_manager()
    removed = {name: pm.unregister(name=name) for name in set(installed_schemes().values())}
    try:
        assert error_of(capsys, "drivers") == (
            "runkit drivers: no persistence drivers are installed; e.g. pip install runkit-memory\n"
        )
    finally:
        for name, plugin in removed.items():
            pm.register(plugin, name=name)
    assert "memory" in installed_schemes()


def test_usage_problem_unwraps_task_group_errors() -> None:
    from runkit import ConfigurationError
    from runkit.cli import usage_problem
    from runkit.engine.cluster.nodes import NodeIdInUse
    from runkit.engine.commands.inbox import EngineStopped

    in_use = NodeIdInUse(uuid.uuid4(), "process p wrote its heartbeat record")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [in_use]), EngineStopped("stopped")])
    assert usage_problem(nested) == str(in_use)
    assert usage_problem(ConfigurationError("bad", ["x"])) == "bad\n  - x"
    # Anything else, or two errors at once, is not a usage error: it keeps its traceback.
    assert usage_problem(ExceptionGroup("g", [RuntimeError("bug")])) is None
    assert usage_problem(ExceptionGroup("g", [in_use, RuntimeError("bug")])) is None
    assert usage_problem(ValueError("a bug, not configuration")) is None


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ('{"customer_id": "C1"}', "field 'account_id' is missing"),
        ('{"customer_id": "C1",', "invalid JSON: Expecting property name enclosed in double"),
    ],
)
def test_execute_says_why_the_json_does_not_decode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, problem: str
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-execute-json")
    status, _ = run("execute", "bank:app", "OpenAccount", command)
    assert status == 2
    # One sentence, the type named once (no "a OpenAccount: cannot unmarshal OpenAccount").
    assert capsys.readouterr().err.startswith(
        f"runkit execute: the JSON does not decode as OpenAccount: {problem}"
    )


TRANSFER = (
    '"transaction_id": "T1", "from_account_id": "A1", "to_account_id": "A2", "amount": 5, '
    '"scheduled_time": "2026-01-01T00:00:00Z"'
)
TRANSFER_FIELDS = (
    "transaction_id, from_account_id, to_account_id, amount, scheduled_time, to_third_party_bank"
)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        # A misspelt optional field: the codec would drop it and use the default.
        (
            '"to_third_party_bnak": true',
            "Transfer has no field 'to_third_party_bnak' (did you mean 'to_third_party_bank'?)",
        ),
        ('"x": 1, "amout": 2', "Transfer has no fields 'x', 'amout' (did you mean 'amount'?)"),
    ],
)
def test_execute_refuses_fields_the_command_does_not_have(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], extra: str, problem: str
) -> None:
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "memory:///cli-execute-fields")
    status, _ = run("execute", "bank:app", "Transfer", f"{{{TRANSFER}, {extra}}}")
    assert status == 2
    assert capsys.readouterr().err == (
        f"runkit execute: {problem}; its fields are {TRANSFER_FIELDS}\n"
    )


def test_execute_leaves_the_fields_of_a_custom_encoding_to_its_class() -> None:
    from runkit._cli_fields import check_fields

    @attrs.frozen
    class Custom(dogma.Command):
        amount: int = 0

        @classmethod
        def unmarshal_binary(cls, data: bytes) -> Custom:
            return cls(len(data))

    check_fields(Custom, '{"anything": 1}')  # its own JSON: not attrs fields


@attrs.frozen
class _Line:
    sku: str
    qty: int = 1


@attrs.frozen
class _Address:
    street: str
    city: str = ""


@attrs.frozen
class _Order(dogma.Command):
    id: str
    ship_to: _Address | None = None
    lines: tuple[_Line, ...] = ()
    by_sku: dict[str, _Line] = attrs.field(factory=dict)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '{"id": "o", "ship_to": {"street": "s", "ctiy": "x"}}',
            "_Order.ship_to (_Address) has no field 'ctiy' (did you mean 'city'?); "
            "its fields are street, city",
        ),
        (
            '{"id": "o", "lines": [{"sku": "a"}, {"sku": "b", "qyt": 2}]}',
            "_Order.lines[1] (_Line) has no field 'qyt' (did you mean 'qty'?); "
            "its fields are sku, qty",
        ),
        (
            '{"id": "o", "by_sku": {"a": {"sku": "a", "x": 0}}}',
            "_Order.by_sku['a'] (_Line) has no field 'x'; its fields are sku, qty",
        ),
    ],
)
def test_execute_refuses_unknown_fields_of_nested_classes_too(text: str, problem: str) -> None:
    # The codec would drop a misspelt nested field and use its default, silently.
    from runkit._cli_fields import check_fields
    from runkit._errors import CLIError

    with pytest.raises(CLIError) as info:
        check_fields(_Order, text)
    assert str(info.value) == problem
    check_fields(_Order, '{"id": "o", "ship_to": {"street": "s"}, "lines": [{"sku": "a"}]}')


def test_an_empty_idempotency_key_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run("execute", "bank:app", "OpenAccount", "{}", "--idempotency-key", "")
    assert status == 2
    assert "--idempotency-key must not be empty" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_an_error() -> None:
    # `runkit env | head -1`: the pipe closes while runkit still writes.
    script = f"{sys.executable!r} -m runkit.cli env | head -c 10 > /dev/null"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("other_application_node", [False, True])
def test_execute_with_no_live_node_says_the_command_waits_instead_of_executed(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    other_application_node: bool,
) -> None:
    # Durable, so status 0; but no node owns its partition, so nothing handled
    # it yet: "executed" would have the operator believe the deposit was made.
    from datetime import UTC, datetime, timedelta

    import anyio

    from runkit.engine.meta import load_partition_count
    from runkit_memory import MemoryProvider

    silo = f"cli-execute-no-node-{uuid.uuid4()}"
    app_key = "22028264-0bca-43e1-8d9d-cd094efb10b7"  # bank's identity key

    async def started_once() -> None:  # the cluster ran once, and stopped
        provider = MemoryProvider(silo)
        await load_partition_count(provider, app_key, 4, datetime.now(UTC))
        if other_application_node:  # live, but it never owns the bank's partitions
            import msgspec

            from runkit.engine.cluster.nodes import NODES_KEYSPACE, RECORD_VERSION, Heartbeat

            now, node_id = datetime.now(UTC), str(uuid.uuid4())
            beat = Heartbeat(
                version=RECORD_VERSION,
                node_id=node_id,
                incarnation=str(uuid.uuid4()),
                started_at=now,
                written_at=now,
                expires_at=now + timedelta(hours=1),
                heartbeat_interval=1.0,
                apps=["d0000000-0000-4000-8000-0000000000ff"],
            )
            async with await provider.keyspaces.open(NODES_KEYSPACE) as ks:
                await ks.set(node_id.encode("ascii"), msgspec.msgpack.encode(beat), "")

    anyio.run(started_once)
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", f"memory:///{silo}")
    status, out = run(
        "execute",
        "bank:app",
        "Deposit",
        '{"transaction_id": "D1", "account_id": "A1", "amount": 100}',
    )
    assert status == 0, capsys.readouterr().err
    assert out == (
        "accepted deposit D1: depositing $1.00 into account A1; no live node of the cluster "
        "runs the application, so it waits in the store until one starts (runkit run ...)\n"
    )


def test_a_second_signal_stops_a_node_at_once_during_a_slow_graceful_stop(
    tmp_path: Path,
) -> None:
    # A graceful stop may take as long as the store's timeouts; the operator
    # who signals again must not have to reach for SIGKILL.
    script = textwrap.dedent(
        """
        import sys
        import anyio
        import runkit._run as run

        class SlowToStop:
            applications = ()

            class settings:
                node_id = "n"

            async def runtime(self, key):
                pass

            async def run(self):
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(60)  # e.g. a store that stopped answering

        run._engine = lambda spec, options, out: (SlowToStop(), "memory:///x")
        sys.exit(run.run_node("x:y", out=sys.stdout))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        _wait_running(proc)
        proc.send_signal(signal.SIGINT)
        assert "received SIGINT: stopping" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "received SIGTERM again: stopping at once" in out, err
    assert proc.returncode == 128 + signal.SIGTERM
