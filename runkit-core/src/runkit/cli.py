"""The ``runkit`` command line.

    runkit env                      document the DOGMA_* variables and validate the environment
    runkit drivers                  list installed persistence drivers and their URL schemes
    runkit run MODULE:ATTR          run a node for the application object at MODULE:ATTR
    runkit nodes                    list the nodes' heartbeat records in the store
    runkit poison list MODULE:ATTR  list poisoned commands (also: show ID, requeue ID)

Exit status: 0 on success, 1 on a runtime failure, 2 on a usage or configuration
error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ._environment import ENVIRONMENT
from ._errors import ConfigurationError
from .persistence import installed_schemes, plugin_manager, redact_url

__all__ = ["main"]

log = logging.getLogger("runkit.cli")

DEFAULT_MEMORY_URL = "memory:///runkit"


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback (exit 2)."""


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    out.write("runkit reads these environment variables:\n\n")
    out.write(ENVIRONMENT.describe())
    out.write("\n\nCurrent environment:\n")
    for v in ENVIRONMENT:
        raw = os.environ.get(v.name)
        shown = "(unset)" if raw is None else (redact_url(raw) if v.sensitive else raw)
        out.write(f"  {v.name}={shown}\n")
    try:
        ENVIRONMENT.load()
    except ConfigurationError as exc:
        out.write(f"\nINVALID: {exc}\n")
        return 2
    out.write("\nThe environment is valid.\n")
    return 0


def print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Write *rows* (the first is the header) as left-aligned, space-separated columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _cmd_drivers(args: argparse.Namespace, out: TextIO) -> int:
    by_plugin: dict[str, list[str]] = {}
    for scheme, plugin in installed_schemes().items():
        by_plugin.setdefault(plugin, []).append(f"{scheme}://")
    if not by_plugin:
        out.write("No persistence drivers are installed; e.g. pip install runkit-memory\n")
        return 1
    pm = plugin_manager()
    rows = sorted(
        (name, getattr(pm.get_plugin(name), "__name__", name), ", ".join(schemes))
        for name, schemes in by_plugin.items()
    )
    print_table([("plugin", "module", "schemes"), *rows], out)
    return 0


def load_object(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and return the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not MODULE:ATTR, e.g. 'bank:app'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import run_node

    return run_node(args.app, out=out, backend=args.backend)


def _cmd_poison(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import poison_command

    return poison_command(args.app, args.action, getattr(args, "command_id", None), out=out)


def _cmd_nodes(args: argparse.Namespace, out: TextIO) -> int:
    from ._run import nodes_command

    return nodes_command(out=out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runkit", description="Run and operate runkit nodes for Dogma applications."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("env", help="document and validate the DOGMA_* environment")
    p.set_defaults(fn=_cmd_env)
    p = sub.add_parser("drivers", help="list installed persistence drivers and schemes")
    p.set_defaults(fn=_cmd_drivers)
    p = sub.add_parser(
        "run",
        help="run a node for an application",
        description="Run a node for the application object at MODULE:ATTR, configured "
        f"from the environment; uses {DEFAULT_MEMORY_URL} when DOGMA_PERSISTENCE_URL is unset.",
    )
    p.add_argument("app", metavar="MODULE:ATTR")
    p.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help="async event loop"
    )
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("nodes", help="list the nodes' heartbeat records (live and expired)")
    p.set_defaults(fn=_cmd_nodes)
    p = sub.add_parser("poison", help="list, show or requeue poisoned commands")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("list", help="list poisoned commands")
    q.add_argument("app", metavar="MODULE:ATTR")
    for action in ("show", "requeue"):
        q = psub.add_parser(action, help=f"{action} one poisoned command")
        q.add_argument("app", metavar="MODULE:ATTR")
        q.add_argument("command_id", metavar="COMMAND_ID")
    p.set_defaults(fn=_cmd_poison)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stream = out if out is not None else sys.stdout
    try:
        status: int = args.fn(args, stream)
    except (CLIError, ConfigurationError, ValueError, TypeError) as exc:
        print(f"runkit {args.command}: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
