"""Errors raised by the engine's configuration layer."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CLIError", "ConfigurationError"]


class ConfigurationError(ValueError):
    """One or more configuration problems, all reported at once.

    ``problems`` holds one line per problem, each naming what is wrong and what
    to change.
    """

    def __init__(self, summary: str, problems: Iterable[str] = ()) -> None:
        self.summary = summary
        self.problems = tuple(problems)
        lines = [summary, *(f"  - {p}" for p in self.problems)]
        super().__init__("\n".join(lines))


class CLIError(Exception):
    """A usage problem on the command line the user can fix; printed without a traceback (exit 2).

    Defined here, not in ``runkit.cli``, so that ``python -m runkit.cli`` (where
    the CLI module is ``__main__``) and the modules it imports share the class.
    """
