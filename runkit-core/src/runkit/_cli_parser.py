"""The ``runkit`` command line's argument parser: a usage error is one plain line."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["Parser"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a usage error as one line on stderr, exit status 2.

    For example ``runkit execute: the following arguments are required: MODULE:ATTR,
    TYPE, JSON (see 'runkit execute --help')``, where argparse prints its usage block
    and an ``error:`` line. Subcommands added with `add_commands` are parsers of this
    class too, so each reports its own errors alike.
    """

    _commands: argparse._SubParsersAction[Parser] | None = None

    def add_commands(self, *, dest: str, metavar: str) -> argparse._SubParsersAction[Parser]:
        """Add required subcommands (``add_subparsers``); `parse` names the one given in errors."""
        self._commands = self.add_subparsers(
            dest=dest, required=True, metavar=metavar, parser_class=Parser
        )
        return self._commands

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse *argv* as ``parse_args`` does, blaming arguments nobody took on their command.

        argparse hands a subcommand's unknown arguments up to the top-level parser,
        whose error would point at ``runkit --help`` rather than the subcommand's.
        """
        args, extras = self.parse_known_args(argv)
        if extras:
            self.given_command(args).error(f"unrecognized arguments: {' '.join(extras)}")
        return args

    def given_command(self, args: argparse.Namespace) -> Parser:
        """The parser of the innermost (sub)command *args* was parsed by (its ``prog`` names it)."""
        if self._commands is None:
            return self
        given = self._commands.choices.get(getattr(args, self._commands.dest, None) or "")
        return self if given is None else given.given_command(args)

    def error(self, message: str) -> NoReturn:
        """Print *message* as one line naming this command and its ``--help``; exit with 2."""
        # Messages may carry newlines (an ArgumentTypeError's text, say): one line.
        text = " ".join(message.split())
        # A type's own message usually names its flag already: not "argument --x: --x ...".
        text = re.sub(r"^argument (\S+): (?=\1\b)", "", text)
        self.exit(2, f"{self.prog}: {text} (see '{self.prog} --help')\n")
