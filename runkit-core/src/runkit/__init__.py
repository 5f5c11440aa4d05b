"""runkit: a horizontally scalable engine for Dogma applications."""

from ._errors import ConfigurationError as ConfigurationError
from ._hookspec import hookimpl as hookimpl
from ._hookspec import hookspec as hookspec

__all__ = ["ConfigurationError", "hookimpl", "hookspec"]
