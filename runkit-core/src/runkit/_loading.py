"""Finding the application a command line names: ``MODULE:ATTR``."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from ._errors import CLIError

__all__ = ["application_object", "load_object"]

log = logging.getLogger("runkit.cli")


def load_object(spec: str) -> Any:
    """Import ``MODULE:ATTR`` (ATTR may be dotted) and return the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not MODULE:ATTR, e.g. 'bank:app'")
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        # A file path imports as nothing: name the dotted module it most likely means.
        path = module_name.removesuffix(".py").replace("\\", "/")
        # "./bank/app" is "bank.app": a "." part (the current directory) adds nothing.
        dotted = ".".join(part for part in path.split("/") if part not in {"", "."})
        raise CLIError(
            f"{module_name!r} in {spec!r} is a file path; MODULE is a module's dotted name, "
            f"importable from the current directory: e.g. '{dotted}:{attr}'"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise CLIError(
                f"cannot import module {module_name!r} of {spec!r}: no module named "
                f"{exc.name!r} (run from the project directory, or install it)"
            ) from None
        raise CLIError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from None
    except ImportError as exc:
        raise CLIError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def application_object(spec: str) -> Any:
    """The Dogma application at ``MODULE:ATTR``: an instance, or made by calling ATTR.

    ATTR may name the application object, its class (instantiated when its
    constructor takes no arguments; logged) or a function returning it.
    """
    obj = load_object(spec)
    if not isinstance(obj, type) and callable(getattr(obj, "configure", None)):
        return obj
    if isinstance(obj, type) and not callable(getattr(obj, "configure", None)):
        raise CLIError(
            f"{spec!r} is the class {obj.__qualname__}, not a Dogma application "
            "(it has no configure(c) method)"
        )
    if callable(obj):
        what = f"the class {obj.__qualname__}" if isinstance(obj, type) else "a function"
        required = _required_parameters(obj)
        if required:
            raise CLIError(
                f"{spec!r} is {what} that needs arguments ({', '.join(required)}); point "
                "MODULE:ATTR at an application instance, or at a function or class that "
                "takes no arguments"
            )
        made = obj()
        if isinstance(obj, type):
            log.info("%s names a class: using a new instance, %s()", spec, obj.__qualname__)
        if callable(getattr(made, "configure", None)):
            return made
        raise CLIError(
            f"{spec!r} is {what} that returned {type(made).__qualname__}, which is not a "
            "Dogma application (it has no configure(c) method)"
        )
    raise CLIError(
        f"{spec!r} is of type {type(obj).__qualname__}, not a Dogma application (an object "
        "with a configure(c) method, a class that takes no arguments, or a function "
        "returning one)"
    )


def _required_parameters(fn: Callable[..., Any]) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none; just call them
        return []
    return [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
