"""The import graph is layered: dogma <- runkit core <- drivers, with no shortcuts.

Checked statically over the sources (every import statement), so a lazy import
inside a function cannot hide a violation, plus at run time in a subprocess.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = ("runkit_memory", "runkit_postgres", "runkit_dynamodb", "runkit_s3")
# Which top-level modules each package's library code may not import.
FORBIDDEN = {
    "dogma-api/src/dogma": ("runkit", "anyio", "trio", "asyncio", *DRIVERS, "bank"),
    "runkit-core/src/runkit": (*DRIVERS, "bank", "psycopg", "boto3", "botocore", "trio", "asyncio"),
    "runkit-memory/src/runkit_memory": ("runkit_postgres", "runkit_dynamodb", "runkit_s3", "bank"),
    "runkit-postgres/src/runkit_postgres": ("runkit_dynamodb", "runkit_s3", "bank", "asyncio"),
    "runkit-dynamodb/src/runkit_dynamodb": ("runkit_postgres", "runkit_s3", "bank", "asyncio"),
    "runkit-s3/src/runkit_s3": ("runkit_postgres", "runkit_dynamodb", "bank", "asyncio"),
    "examples/bank/src/bank/domain": ("runkit", *DRIVERS),
    "examples/bank/src/bank/messages": ("runkit", *DRIVERS),
}
# Test-support modules may use what tests use (moto's launcher runs moto).
ALLOWED_FILES = {"runkit-core/src/runkit/testing/_moto_server.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_code_respects_the_layers(package: str) -> None:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED_FILES:
            continue
        bad = imported_modules(path) & set(FORBIDDEN[package])
        violations += [f"{rel} imports {m}" for m in sorted(bad)]
    assert not violations, "\n".join(violations)


def test_importing_runkit_loads_no_driver_and_no_event_loop_library() -> None:
    code = (
        "import sys, runkit, runkit.persistence, runkit.config, runkit.rendezvous\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        f"{(*DRIVERS, 'trio', 'psycopg', 'boto3')!r}]\n"
        "print(','.join(sorted(bad)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


@pytest.mark.parametrize(
    ("plugin", "client"),
    [
        ("runkit_postgres._plugin", "psycopg"),
        ("runkit_dynamodb._plugin", "boto3"),
        ("runkit_s3._plugin", "boto3"),
    ],
)
def test_loading_a_driver_plugin_does_not_import_its_client_library(
    plugin: str, client: str
) -> None:
    # Resolving any URL loads every installed plugin to learn its schemes; a
    # plugin that imports its client library up front costs seconds each.
    code = f"import sys, {plugin}; print({client!r} in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


ENGINE = ROOT / "runkit-core/src/runkit/engine"
# The top: the modules that wire the sides together; nothing below them imports them.
TOP = ("engine", "runtime", "owned_partition", "executor", "startup")
# Which engine subpackages (or top modules) each engine subpackage, or the shared
# modules, may not import.
ENGINE_FORBIDDEN = {
    "commands": ("events", "cluster", *TOP),
    "events": ("commands", "cluster", *TOP),
    "cluster": TOP,
    "shared": ("commands", "events", "cluster", *TOP),
}
SHARED = (
    "streams",
    "envelope",
    "partitions",
    "ids",
    "logs",
    "backoff",
    "signals",
    "workers",
    "fresh_reads",
    "settings",
    "meta",
)


def engine_subpackages_imported(path: Path) -> set[str]:
    """Engine subpackages *path* imports, by relative or absolute import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    depth = len(path.relative_to(ENGINE).parts) - 1  # 0: engine/x.py, 1: engine/sub/x.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.startswith("runkit.engine."):
                found.add(module.split(".")[2])
            elif node.level == depth + 1 and module:
                found.add(module.split(".")[0])
            elif node.level == depth + 1 and not module:
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(ENGINE_FORBIDDEN))
def test_engine_subpackages_respect_their_layers(layer: str) -> None:
    if layer == "shared":
        # A shared module may be a subpackage (streams): check all its modules.
        paths: list[Path] = []
        for name in SHARED:
            package = ENGINE / name
            paths += sorted(package.glob("*.py")) if package.is_dir() else [ENGINE / f"{name}.py"]
        assert all(path.is_file() for path in paths), paths
    else:
        paths = sorted((ENGINE / layer).glob("*.py"))
    violations = [
        f"{path.relative_to(ROOT).as_posix()} imports engine.{sub}"
        for path in paths
        for sub in sorted(engine_subpackages_imported(path) & set(ENGINE_FORBIDDEN[layer]))
    ]
    assert not violations, "\n".join(violations)


def test_every_engine_module_has_a_layer() -> None:
    # A new top-level module or subpackage must be given a layer above.
    found = {p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"}
    found |= {p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()}
    layers = {*SHARED, *TOP, *(name for name in ENGINE_FORBIDDEN if name != "shared")}
    assert sorted(found) == sorted(layers)


# The streams subpackage bottom-up: each module imports only modules before it.
STREAMS = ("records", "reading", "bus", "tail", "unconfirmed", "writer")


def test_streams_modules_import_only_lower_ones() -> None:
    package = ENGINE / "streams"
    assert sorted(p.stem for p in package.glob("*.py")) == sorted((*STREAMS, "__init__"))
    violations = []
    for index, name in enumerate(STREAMS):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported = {node.module} if node.module else {a.name for a in node.names}
                violations += [
                    f"streams.{name} imports streams.{m}"
                    for m in imported
                    if m not in STREAMS[:index]
                ]
    assert not violations, "\n".join(violations)
