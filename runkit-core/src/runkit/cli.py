"""The ``runkit`` command line.

    runkit env                      document the DOGMA_* variables and validate the environment
    runkit drivers                  list installed persistence drivers and their URL schemes
    runkit run MODULE:ATTR          run a node for the application object at MODULE:ATTR
    runkit nodes                    list the nodes' heartbeat records in the store
    runkit status [MODULE:ATTR ...] nodes, partition owners, backlog and consumer lag
                                    (--json for the same as JSON, --watch [SECONDS] to follow)
    runkit poison list MODULE:ATTR  list poisoned commands (also: show ID, requeue ID)
    runkit execute MODULE:ATTR TYPE JSON
                                    execute one command on the cluster, as a client

    runkit --version                print the versions of runkit-core, dogma-api and the drivers

Exit status: 0 on success, 1 on a runtime failure (one line for a store still
unreachable after the start timeout, else its traceback), 2 on a usage or
configuration error (one plain message naming what to change). Ctrl-C stops
``run`` and ``status`` gracefully (0) and interrupts the other commands (130).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ._backends import BACKENDS, missing_package
from ._cli_fields import check_fields
from ._cli_output import print_table, status_text
from ._cli_parser import Parser
from ._environment import ENVIRONMENT, EnvironmentValues
from ._errors import CLIError, ConfigurationError
from ._hookspec import PROJECT_NAME
from ._loading import application_object, load_object
from ._validate import (
    KNOBS,
    Knob,
    check_readable_file,
    check_retry_delays,
    is_unspecified_address,
)
from .engine.settings import EngineSettings
from .persistence import StoreUnavailable, installed_schemes, plugin_manager, redact_url
from .persistence._plugins import broken_drivers
from .persistence._urls import empty_store_hint

if TYPE_CHECKING:
    from ._options import Option

__all__ = ["CLIError", "application_object", "load_object", "main", "print_table", "status_text"]

log = logging.getLogger("runkit.cli")

DEFAULT_MEMORY_URL = "memory:///runkit"


def usage_problem(exc: BaseException) -> str | None:
    """The message to print for a usage or configuration error, ``None`` for anything else.

    Exception groups (from task groups) count if, leaving out the engine's
    ``EngineStopped`` and cancellations that follow the real error, they hold
    exactly one usage or configuration error.
    """
    from .engine.cluster.nodes import MembershipRefused
    from .engine.commands.inbox import EngineStopped

    leaves = [e for e in _leaves(exc) if not isinstance(e, EngineStopped)]
    if len(leaves) != 1:
        return None
    (leaf,) = leaves
    if isinstance(leaf, CLIError | ConfigurationError | MembershipRefused):
        return str(leaf)
    if isinstance(leaf, StoreUnavailable) and not leaf.retryable:
        return str(leaf)  # a wrong password, database or schema: fix the URL, not a crash
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    # A cancellation that rode along with the real error (asyncio's or trio's).
    if type(exc).__name__ in {"CancelledError", "Cancelled"}:
        return []
    return [exc]


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    out.write("runkit reads these environment variables:\n\n")
    out.write(ENVIRONMENT.describe())
    out.write("\n\nCurrent environment:\n")
    for v in ENVIRONMENT:
        raw = os.environ.get(v.name)
        shown = "(unset)" if raw is None else (redact_url(raw) if v.sensitive else raw)
        out.write(f"  {v.name}={shown}\n")
    try:
        values = ENVIRONMENT.load()
    except ConfigurationError as exc:
        out.write(f"\nINVALID: {exc}\n")
        return 2
    listen = values.listen_address
    if listen and not values.advertise_address and is_unspecified_address(listen):
        # Valid alone, but `runkit run` (whose only source for it is this) would stop
        # once listening: say so here, where the environment is being checked.
        out.write(
            f"\nINVALID: DOGMA_LISTEN_ADDRESS={listen!r} is a wildcard address, which peers "
            "cannot reach: set DOGMA_ADVERTISE_ADDRESS too, e.g. "
            f"DOGMA_ADVERTISE_ADDRESS={ENVIRONMENT['DOGMA_ADVERTISE_ADDRESS'].example} "
            "(runkit run stops without it)\n"
        )
        return 2
    out.write("\nThe environment is valid.\n")
    return 0


def _cmd_drivers(args: argparse.Namespace, out: TextIO) -> int:
    by_plugin: dict[str, list[str]] = {}
    for scheme, plugin in installed_schemes().items():
        by_plugin.setdefault(plugin, []).append(f"{scheme}://")
    broken = broken_drivers()
    if not by_plugin and not broken:
        raise CLIError("no persistence drivers are installed; e.g. pip install runkit-memory")
    pm = plugin_manager()
    rows = sorted(
        (name, getattr(pm.get_plugin(name), "__name__", name), ", ".join(schemes))
        for name, schemes in by_plugin.items()
    )
    # A driver that failed to import has no schemes: its row says why instead.
    rows += [(b.name, b.module, f"BROKEN ({b.distribution}): {b.error}") for b in broken]
    print_table([("plugin", "module", "schemes"), *rows], out)
    return 0


def _cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import run_node

    package = missing_package(args.backend)
    if package is not None:
        raise CLIError(
            f"--backend {args.backend} needs the {package} package, which is not installed: "
            f"pip install 'runkit-core[{package}]', or use --backend asyncio"
        )
    return run_node(args.app, out=out, backend=args.backend, options=_run_options(args))


def _cmd_poison(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import poison_command

    return poison_command(args.app, args.action, getattr(args, "command_id", None), out=out)


def _cmd_nodes(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import nodes_command

    return nodes_command(out=out)


def _cmd_execute(args: argparse.Namespace, out: TextIO) -> int:
    """Execute one command through a ``runkit.Client``; exit once it is durable."""
    from datetime import UTC, datetime

    import anyio

    import dogma

    from . import config
    from ._options import from_environment, with_application, with_persistence_provider
    from .client import Client
    from .engine.cluster.nodes import list_nodes
    from .engine.engine import read_partition_count
    from .persistence import provider_from_url

    app = config.build(application_object(args.app))
    wanted = args.type.lower()
    types = [t for t in app.message_types() if t.kind is dogma.MessageKind.COMMAND]
    matches = [
        t
        for t in types
        if wanted
        in (t.id, t.cls.__name__.lower(), f"{t.cls.__module__}.{t.cls.__qualname__}".lower())
    ]
    if len(matches) != 1:
        names = ", ".join(sorted(t.cls.__name__ for t in types)) or "none"
        raise CLIError(
            f"{args.type!r} is {'ambiguous' if matches else 'not a command'} of application "
            f"{app.identity.name!r}; its commands: {names} (or give a type's UUID)"
        )
    [message_type] = matches
    name = message_type.cls.__name__
    check_fields(message_type.cls, args.json)
    try:
        command = message_type.unmarshal(args.json.encode())
    except (ValueError, TypeError) as exc:
        # The codec's errors start "cannot unmarshal <class>: ", which this one says already.
        detail = re.sub(r"^cannot unmarshal \S+: ", "", str(exc))
        raise CLIError(f"the JSON does not decode as {name}: {detail}") from exc
    assert isinstance(command, dogma.Command)
    url = ENVIRONMENT.load().persistence_url
    if url is None:
        raise CLIError("set DOGMA_PERSISTENCE_URL to the store the nodes use")

    async def go() -> bool:
        provider = provider_from_url(url)
        try:
            async with Client(
                with_application(app),
                with_persistence_provider(provider),
                from_environment(),  # not DOGMA_NODE_ID: a client joins under an ID of its own
            ) as client:
                # A client waits for an application that has not started yet;
                # an operator's command should not.
                if await read_partition_count(provider, app.identity.key) is None:
                    raise CLIError(
                        f"application {app.identity.name!r} has never run on this store: "
                        + (
                            empty_store_hint(url)
                            or "start a node of the cluster (runkit run ...) first"
                        )
                    )
                await client.executor_for(app).execute_command(
                    command, idempotency_key=args.idempotency_key
                )
                # Durable is not handled: with no node to own its partition
                # the command waits in the store, and "executed" would mislead.
                now = datetime.now(UTC)
                key = app.identity.key
                return any(r.runs(key) and r.is_live(now) for r in await list_nodes(provider))
        finally:
            with anyio.CancelScope(shield=True):
                await provider.close()

    try:
        handled = anyio.run(go)
    except dogma.ValidationError as exc:
        raise CLIError(f"the command is invalid: {exc}") from exc
    if handled:
        out.write(f"executed {command.message_description()}\n")
    else:
        out.write(
            f"accepted {command.message_description()}; no live node of the cluster runs "
            "the application, so it waits in the store until one starts (runkit run ...)\n"
        )
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    import contextlib
    import json
    import signal
    from datetime import UTC, datetime

    import anyio

    from . import config
    from .engine.cluster.status import read_status
    from .engine.logs import describe_error
    from .persistence import PersistenceError, provider_from_url

    apps = [config.build(application_object(spec)) for spec in args.apps]
    url = ENVIRONMENT.load().persistence_url
    if url is None:
        raise CLIError("set DOGMA_PERSISTENCE_URL to the store the nodes use")

    async def go() -> None:
        provider = provider_from_url(url)
        provider.set_read_only()  # looking must not create (or change) anything
        try:
            while True:
                try:
                    status = await read_status(
                        provider, apps, now=datetime.now(UTC), discover=not apps
                    )
                except PersistenceError as exc:
                    if not args.watch or usage_problem(exc) is not None:
                        raise  # once, or a wrong URL (a password, a database)
                    # A watch is most useful while the store has trouble: say so
                    # (on stderr: stdout may be JSON lines) and look again.
                    print(
                        f"runkit status: reading the store failed, trying again in "
                        f"{args.watch:g} s: {describe_error(exc)}",
                        file=sys.stderr,
                    )
                    await anyio.sleep(args.watch)
                    continue
                if args.json:
                    indent = None if args.watch else 2  # one snapshot per line when watching
                    text = json.dumps(status.to_json(), indent=indent) + "\n"
                else:
                    text = status_text(status)
                    if not status.nodes and (hint := empty_store_hint(url)):
                        text += f"({hint})\n"
                if args.watch and out.isatty():
                    out.write("\x1b[H\x1b[2J")  # clear the screen, cursor home
                elif args.watch and not args.json:
                    out.write(f"--- {status.read_at.isoformat(timespec='seconds')}\n")
                out.write(text)
                out.flush()
                if not args.watch:
                    return
                await anyio.sleep(args.watch)
        finally:
            with anyio.CancelScope(shield=True):
                await provider.close()

    async def watch() -> None:
        # SIGINT (Ctrl-C) or SIGTERM ends --watch, even where SIGINT is ignored
        # by default (a background job of a non-interactive shell), as `runkit run`.
        async with anyio.create_task_group() as tg:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()

            tg.start_soon(stop_on_signal)
            await go()
            tg.cancel_scope.cancel()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(watch if args.watch else go)
    return 0


def _watch_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--watch takes a number of seconds, not {text!r} "
            "(give MODULE:ATTR before --watch, or write --watch=SECONDS)"
        ) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"--watch needs a positive number of seconds, not {text}")
    return seconds


def _version() -> str:
    def installed(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    # Drivers are named from their entry points, without importing them, so a
    # broken driver cannot break --version.
    drivers = sorted(
        {
            (ep.dist.name, ep.dist.version)
            for ep in importlib.metadata.entry_points(group=PROJECT_NAME)
            if ep.dist is not None
        }
    )
    listed = ", ".join(f"{name} {version}" for name, version in drivers) or "none"
    return (
        f"runkit-core {installed('runkit-core')}, dogma-api {installed('dogma-api')}; "
        f"drivers: {listed}"
    )


class _VersionAction(argparse.Action):
    """``--version``, printed as one line (argparse's own action wraps it)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(_version())
        parser.exit()


def _knob_flag(knob: Knob) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            return knob.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; expected {knob.expected}") from None

    parse.__name__ = knob.field  # argparse names the type in some messages
    return parse


def _file_flag(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check_readable_file(text, what=what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _run_options(args: argparse.Namespace) -> list[Option]:
    """The options ``runkit run``'s flags give; each flag beats its own variable only."""
    from . import _options as o

    env = ENVIRONMENT.load()
    flags = {k.field: getattr(args, k.field) for k in KNOBS}
    given = {f: v for f, v in flags.items() if v is not None}
    _check_retry_flags(given, env)
    options = o.tuning_options(given)
    if args.tls_cert or args.tls_key or args.tls_ca:
        # with_tls() replaces the environment's whole TLS configuration: merge the
        # flags into it first, or --tls-cert/--tls-key would drop DOGMA_TLS_CA
        # (peers then trusted by fingerprint instead of by the CA).
        cert, key = args.tls_cert or env.tls_cert, args.tls_key or env.tls_key
        if not (cert and key):
            flag = "--tls-cert" if args.tls_cert else "--tls-key" if args.tls_key else "--tls-ca"
            missing = [name for name, value in (("cert", cert), ("key", key)) if not value]
            raise CLIError(
                f"{flag} needs {' and '.join(f'--tls-{m}' for m in missing)} (or "
                f"{' and '.join(f'DOGMA_TLS_{m.upper()}' for m in missing)}): "
                "a node's certificate and key go together"
            )
        options.append(o.with_tls(cert=cert, key=key, ca=args.tls_ca or env.tls_ca))
    return options


def _check_retry_flags(given: dict[str, int | float], env: EnvironmentValues) -> None:
    """Refuse a retry delay flag that puts the max delay below the base delay.

    The message names the flag, variable or default each delay came from
    (``resolve_options`` would name ``with_retry_policy()``, which the user did not write).
    """
    if not {"retry_base_delay", "retry_max_delay"} & given.keys():
        return
    values: list[float] = []
    sources: list[str | None] = []
    for knob in (k for k in KNOBS if k.field in {"retry_base_delay", "retry_max_delay"}):
        from_env = getattr(env, knob.field)
        if knob.field in given:
            values.append(given[knob.field])
            sources.append(knob.flag)
        elif from_env is not None:
            values.append(from_env)
            sources.append(knob.variable)
        else:
            values.append(getattr(EngineSettings(), knob.field))
            sources.append(None)
    try:
        check_retry_delays(values[0], values[1], sources=(sources[0], sources[1]))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _parser() -> Parser:
    parser = Parser(
        prog="runkit", description="Run and operate runkit nodes for Dogma applications."
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of runkit-core, dogma-api and the installed drivers",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_commands(dest="command", metavar="COMMAND")
    p = sub.add_parser("env", help="document and validate the DOGMA_* environment")
    p.set_defaults(fn=_cmd_env)
    p = sub.add_parser("drivers", help="list installed persistence drivers and schemes")
    p.set_defaults(fn=_cmd_drivers)
    p = sub.add_parser(
        "run",
        help="run a node for an application",
        description="Run a node for the application object at MODULE:ATTR (an instance, a "
        "class that takes no arguments, or a function returning one), configured from the "
        f"DOGMA_* environment (see runkit env); uses {DEFAULT_MEMORY_URL} when "
        "DOGMA_PERSISTENCE_URL is unset. A flag beats its environment variable.",
    )
    p.add_argument("app", metavar="MODULE:ATTR")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="asyncio",
        help="event loop: asyncio, asyncio with uvloop (runkit-core[uvloop]) or trio "
        "(runkit-core[trio])",
    )
    tuning = p.add_argument_group("engine settings (default: the DOGMA_* variable, else built-in)")
    for knob in KNOBS:
        tuning.add_argument(
            knob.flag,
            dest=knob.field,
            type=_knob_flag(knob),
            metavar="N" if knob.kind is int else "SECONDS",
            help=f"{knob.description} ({knob.variable}; default {knob.default})",
        )
    for name, what, variable in (
        ("cert", "this node's PEM certificate (with --tls-key)", "DOGMA_TLS_CERT"),
        ("key", "the certificate's PEM private key", "DOGMA_TLS_KEY"),
        ("ca", "a PEM CA bundle peers' certificates must chain to", "DOGMA_TLS_CA"),
    ):
        tuning.add_argument(
            f"--tls-{name}",
            dest=f"tls_{name}",
            type=_file_flag(f"--tls-{name}"),
            metavar="FILE",
            help=f"node-to-node TLS: {what} ({variable})",
        )
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("nodes", help="list the nodes' heartbeat records (live and expired)")
    p.set_defaults(fn=_cmd_nodes)
    p = sub.add_parser(
        "status",
        help="show nodes, partition owners, backlog and consumer lag",
        description="Show the cluster as DOGMA_PERSISTENCE_URL's store has it: the nodes, and "
        "per application each partition's owner, inbox backlog, stream end, pending deadlines "
        "and poisoned commands, and its consumers' lag. Without MODULE:ATTR, the applications "
        "live nodes report (partitions only). Reads only; creates nothing.",
    )
    p.add_argument("apps", metavar="MODULE:ATTR", nargs="*", help="applications to report on")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--watch",
        metavar="SECONDS",
        nargs="?",
        const=2.0,
        default=None,
        type=_watch_seconds,
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.set_defaults(fn=_cmd_status)
    p = sub.add_parser(
        "execute",
        help="execute one command on the cluster (as a client) and wait until it is durable",
        description="Execute a command of the application at MODULE:ATTR on the cluster whose "
        "store DOGMA_PERSISTENCE_URL names, through a runkit.Client (it owns nothing and runs "
        "no handler). TYPE is the command class name or its message type UUID; JSON is the "
        "command in the default codec's JSON (its attrs fields).",
    )
    p.add_argument("app", metavar="MODULE:ATTR")
    p.add_argument("type", metavar="TYPE")
    p.add_argument("json", metavar="JSON")
    p.add_argument(
        "--idempotency-key",
        default=None,
        type=_non_empty("--idempotency-key"),
        help="execute it at most once per key",
    )
    p.set_defaults(fn=_cmd_execute)
    p = sub.add_parser("poison", help="list, show or requeue poisoned commands")
    psub = p.add_commands(dest="action", metavar="ACTION")
    q = psub.add_parser("list", help="list poisoned commands")
    q.add_argument("app", metavar="MODULE:ATTR")
    for action in ("show", "requeue"):
        q = psub.add_parser(action, help=f"{action} one poisoned command")
        q.add_argument("app", metavar="MODULE:ATTR")
        q.add_argument("command_id", metavar="COMMAND_ID")
    p.set_defaults(fn=_cmd_poison)
    return parser


def _non_empty(flag: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"{flag} must not be empty")
        return value

    return check


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status.

    A usage or configuration error prints one message (a short block for a list
    of problems) on stderr and returns 2; a store still unreachable after the
    start timeout prints one line and returns 1; a Ctrl-C that interrupts a
    command returns 130 (run and status stop gracefully instead); any other
    error propagates with its traceback (exit status 1 from the console script).
    """
    parser = _parser()
    try:
        args = parser.parse(argv)
    except SystemExit as exc:  # --help, --version, or a usage error the parser printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    # A node's log is its record; the other commands answer on stdout and end, so
    # their logs (a client joining, say) would bury the answer: warnings only, unless -v.
    quiet = logging.INFO if args.command == "run" else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stream = out if out is not None else sys.stdout
    command = parser.given_command(args).prog  # "runkit poison list", as usage errors say
    try:
        status: int = args.fn(args, stream)
        stream.flush()  # here, where a reader that has left is recognised
    except BaseException as exc:
        leaves = _leaves(exc)
        if leaves and all(isinstance(e, BrokenPipeError) for e in leaves):
            # The reader left (`runkit status --json --watch | head -1`): not an
            # error. Point stdout at nothing, so flushing it at exit cannot fail.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if leaves and all(isinstance(e, KeyboardInterrupt) for e in leaves):
            # Ctrl-C (while `runkit execute` waits, say) is the operator's choice, not
            # a failure: one line, and the status a shell gives for SIGINT.
            print(f"{command}: interrupted", file=sys.stderr)
            return 130
        problem = usage_problem(exc)
        if problem is None:
            if len(leaves) == 1 and isinstance(leaves[0], StoreUnavailable):
                # Still unreachable after the start timeout: the message says it all.
                print(f"{command}: {leaves[0]}", file=sys.stderr)
                return 1
            raise
        print(f"{command}: {problem}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
