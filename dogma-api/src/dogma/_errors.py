"""Errors raised by applications and engines.

Hierarchy::

    ValueError
     └── ValidationError            a message is malformed
    NotImplementedError
     └── NotSupported               an optional capability is absent
    Exception
     ├── UnexpectedMessage          a handler was given a type it does not handle
     └── EventObserverNotSatisfied  no further observed event can occur
"""

from __future__ import annotations


class ValidationError(ValueError):
    """Raised by ``Message.validate()`` when a message is not well-formed.

    Well-formedness means that all required data is present and correctly
    encoded; it is not a business-rule check against current state.
    """


class NotSupported(NotImplementedError):
    """Raised by an optional method whose capability the implementation lacks.

    Aggregate roots raise it from ``marshal_binary()``/``unmarshal_binary()``
    when they do not support snapshots, and projections raise it from
    ``reset()`` when they cannot be reset.
    """

    def __init__(self, message: str = "not supported") -> None:
        super().__init__(message)


class UnexpectedMessage(Exception):
    """Raised by a handler given a message of a type it was not configured for.

    The engine treats it as a bug in the handler or its routes, never as a
    transient failure to retry.

    ``raise dogma.UnexpectedMessage`` (the class, as Go code panics with the
    value) works too; the message is then unknown.

    Attributes:
        message: The message the handler did not expect (``None`` if not given).
    """

    def __init__(self, message: object = None) -> None:
        super().__init__(
            "unexpected message" if message is None else f"unexpected message: {_describe(message)}"
        )
        self.message = message


class EventObserverNotSatisfied(Exception):
    """Raised by ``CommandExecutor.execute_command()`` when no observer can be satisfied.

    The engine raises it once it knows that no further event matching any of
    the observers can occur as a consequence of the command.
    """

    def __init__(self, message: str = "event observer not satisfied") -> None:
        super().__init__(message)


def _describe(message: object) -> str:
    cls = type(message)
    name = f"{cls.__module__}.{cls.__qualname__}"
    describe = getattr(message, "message_description", None)
    if callable(describe):
        try:
            text = describe()
        except Exception:  # a broken description must not mask the real error
            return name
        if isinstance(text, str) and text:
            return f"{name} ({text})"
    return name
