"""The event loops a node runs on: ``runkit run --backend`` (and the benchmarks).

``asyncio`` is the standard library's loop; ``uvloop`` is asyncio with uvloop's
loop (``pip install 'runkit-core[uvloop]'``), which runs the engine's many
short task steps with less overhead; ``trio`` needs ``runkit-core[trio]``. The
engine itself only uses anyio, so it runs the same on each.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["BACKENDS", "missing_package", "run_arguments"]

#: The choices, in the order ``--backend`` lists them.
BACKENDS = ("asyncio", "uvloop", "trio")


def run_arguments(backend: str) -> dict[str, Any]:
    """The keyword arguments of ``anyio.run`` for *backend* (one of ``BACKENDS``)."""
    if backend == "uvloop":
        return {"backend": "asyncio", "backend_options": {"use_uvloop": True}}
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return {"backend": backend}


def missing_package(backend: str) -> str | None:
    """The package *backend* needs and this environment lacks, or ``None``.

    Every backend but ``asyncio`` needs the package of its own name.
    """
    if backend == "asyncio" or importlib.util.find_spec(backend) is not None:
        return None
    return backend
