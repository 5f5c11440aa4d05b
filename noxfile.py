"""The test matrix: lint, type checks, and tests per Python version and backend.

``nox`` runs the default sessions (what CI runs); ``nox -l`` lists them all.
Python 3.12 and 3.13 come from pyenv on our machines (PYENV_VERSION is set
below when pyenv is present). Each session installs the locked workspace with
uv into its own virtualenv.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True

if shutil.which("pyenv") and "PYENV_VERSION" not in os.environ:
    os.environ["PYENV_VERSION"] = "3.11.7:3.12.1:3.13.0"
# Use the machine's interpreters; never download one (our machines have no
# internet beyond the package registries).
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
os.environ.setdefault("UV_PYTHON_PREFERENCE", "only-system")

PYTHONS = ["3.11", "3.12", "3.13"]
BACKENDS = {
    # marker expression, for which test files apply to each backend
    "memory": "not postgres and not dynamodb and not s3",
    "postgres": "postgres",
    "dynamodb": "dynamodb",
    "s3": "s3",
}
PACKAGES = [
    "dogma-api",
    "runkit-core",
    "runkit-memory",
    "runkit-postgres",
    "runkit-dynamodb",
    "runkit-s3",
    "examples/bank",
]


def _install(session: nox.Session, *groups: str) -> None:
    """Install the locked workspace, plus the named dependency groups."""
    session.run_install(
        "uv",
        "sync",
        "--all-packages",
        "--locked",
        *(f"--group={group}" for group in groups),
        f"--python={session.virtualenv.location}",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        silent=True,
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    _install(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package, sources and tests."""
    _install(session)
    for package in PACKAGES:
        session.run("mypy", f"{package}/src", f"{package}/tests")
    session.run("mypy", "noxfile.py", "benchmarks")


@nox.session(python=PYTHONS)
@nox.parametrize("backend", list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """pytest for one backend; async tests run on asyncio and trio."""
    _install(session)
    workers = os.environ.get("RUNKIT_TEST_WORKERS", "2")
    session.run(
        "pytest",
        "-m",
        BACKENDS[backend],
        "-n",
        workers,
        "-p",
        "xdist",
        *session.posargs,
    )


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml), built with --strict: a warning fails it."""
    _install(session, "docs")
    with tempfile.TemporaryDirectory(prefix="runkit-site-") as site:
        session.run(
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            site,
            *session.posargs,
            env={"NO_MKDOCS_2_WARNING": "1"},  # material's banner about MkDocs 2.0
        )


# What `nox` runs with no arguments, and what CI runs: everything on 3.11, and
# the memory backend (the engine and domain tests) on 3.12 and 3.13.
nox.options.sessions = [
    "lint",
    "typecheck",
    "docs",
    *(f"tests-3.11(backend='{b}')" for b in BACKENDS),
    "tests-3.12(backend='memory')",
    "tests-3.13(backend='memory')",
]
