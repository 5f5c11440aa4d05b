"""Application configuration: build, validate and query an application's routes.

``build(app)`` calls ``configure()`` on the application and its handlers (twice,
to catch non-determinism), checks every Dogma configuration rule, and returns an
immutable ``ApplicationConfig``. Every problem found is reported at once in one
``runkit.ConfigurationError``.
"""

from ._build import build as build
from ._model import ApplicationConfig as ApplicationConfig
from ._model import HandlerConfig as HandlerConfig
from ._model import HandlerKind as HandlerKind
from ._model import Identity as Identity
from ._model import RouteConfig as RouteConfig
from ._model import RouteKind as RouteKind

__all__ = (
    "ApplicationConfig",
    "HandlerConfig",
    "HandlerKind",
    "Identity",
    "RouteConfig",
    "RouteKind",
    "build",
)

# Show the public path in reprs and tracebacks, not the private module.
for _obj in (
    ApplicationConfig,
    HandlerConfig,
    HandlerKind,
    Identity,
    RouteConfig,
    RouteKind,
    build,
):
    _obj.__module__ = __name__
del _obj
