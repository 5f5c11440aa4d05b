"""The distributions, as built, carry what the package index and a new user need.

Builds every workspace member's wheel with ``uv build`` and reads its METADATA:
internal dependencies pinned to the workspace's versions, the project URLs, a
long description without relative links (they break on the index) and the
``trio`` extra. Then installs ``runkit-core`` and ``runkit-memory`` from those
wheels into a fresh virtualenv and runs the ``runkit`` command there.
"""

from __future__ import annotations

import email.message
import email.parser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "https://github.com/runkit-py/runkit"
URL_LABELS = ("Homepage", "Documentation", "Source", "Issues")

pytestmark = pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on PATH")


def _members() -> dict[str, Path]:
    """Distribution name -> folder, for every member of the workspace."""
    workspace = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    members = {}
    for folder in workspace["tool"]["uv"]["workspace"]["members"]:
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text(encoding="utf-8"))
        members[project["project"]["name"]] = ROOT / folder
    return members


MEMBERS = _members()


def _versions() -> dict[str, Version]:
    versions = {}
    for name, folder in MEMBERS.items():
        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
        versions[name] = Version(project["project"]["version"])
    return versions


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Distribution name -> its freshly built wheel."""
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        ["uv", "build", "--all-packages", "--wheel", "--out-dir", str(out), "--quiet"],
        cwd=ROOT,
        check=True,
        timeout=180,
    )
    built = {}
    for wheel in out.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            name = _parse(archive.read(path))["Name"]
        built[name] = wheel
    assert set(built) == set(MEMBERS)
    return built


def _parse(data: bytes) -> email.message.Message:
    return email.parser.BytesParser().parsebytes(data)


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return _parse(archive.read(path))


def _pin_problems(requires: list[str], versions: dict[str, Version]) -> list[str]:
    """What is wrong with the internal requirements among *requires* (Requires-Dist lines)."""
    problems = []
    for requirement in (Requirement(line) for line in requires):
        version = versions.get(requirement.name)
        if version is None:
            continue
        if not all(s.operator in ("==", "~=") for s in requirement.specifier) or not list(
            requirement.specifier
        ):
            problems.append(f"{requirement} is not pinned with == or ~=")
        elif not requirement.specifier.contains(version):
            problems.append(f"{requirement} excludes the workspace's {version}")
        elif requirement.specifier.contains(Version(f"{version.major}.{version.minor + 1}")):
            # 0.1 -> 0.2 may break: a compatible pin stops at the next minor version.
            problems.append(f"{requirement} admits the next minor version")
    return problems


def test_pin_check_catches_unpinned_and_loose_requirements() -> None:
    versions = {"runkit-core": Version("0.1.0")}
    assert (
        _pin_problems(["runkit-core~=0.1.0", "boto3>=1.35", "runkit-core==0.1.0"], versions) == []
    )
    assert _pin_problems(["runkit-core", "runkit-core>=0.1", "runkit-core~=0.1"], versions) == [
        "runkit-core is not pinned with == or ~=",
        "runkit-core>=0.1 is not pinned with == or ~=",
        "runkit-core~=0.1 admits the next minor version",
    ]
    assert _pin_problems(["runkit-core==0.0.9"], versions) == [
        "runkit-core==0.0.9 excludes the workspace's 0.1.0"
    ]


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_internal_dependencies_are_pinned_to_the_workspace_versions(
    wheels: dict[str, Path], name: str
) -> None:
    versions = _versions()
    requires = _metadata(wheels[name]).get_all("Requires-Dist", [])
    assert _pin_problems(requires, versions) == []
    if name != "dogma-api":
        internal = [line for line in requires if Requirement(line).name in versions]
        assert internal, f"{name} should depend on another runkit distribution"


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_project_urls_and_classifiers(wheels: dict[str, Path], name: str) -> None:
    metadata = _metadata(wheels[name])
    urls = {
        label.strip(): url.strip()
        for label, url in (line.split(",", 1) for line in metadata.get_all("Project-URL", []))
    }
    assert set(URL_LABELS) <= set(urls), urls
    assert urls["Source"] == REPOSITORY
    assert urls["Issues"] == f"{REPOSITORY}/issues"
    assert all(url.startswith("https://") for url in urls.values()), urls
    classifiers = metadata.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert metadata["License-Expression"] == "MIT"


def _relative_links(markdown: str) -> list[str]:
    """Link and image targets in *markdown* that are not absolute URLs or anchors."""
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)", markdown)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", markdown, re.MULTILINE)
    targets += re.findall(r"""(?:href|src)=["']([^"']+)""", markdown)
    return [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]


def test_link_check_catches_relative_links() -> None:
    text = (
        "See [docs/drivers/postgres.md](../docs/drivers/postgres.md), ![logo](logo.png),\n"
        '<a href="docs/index.md">docs</a> and [the index][1].\n\n[1]: docs/index.md\n'
        "Fine: [site](https://example.org/x), [top](#top), [mail](mailto:a@example.org)."
    )
    assert _relative_links(text) == [
        "../docs/drivers/postgres.md",
        "logo.png",
        "docs/index.md",
        "docs/index.md",
    ]


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_long_description_has_no_relative_links(wheels: dict[str, Path], name: str) -> None:
    metadata = _metadata(wheels[name])
    assert metadata["Description-Content-Type"] == "text/markdown"
    text = metadata.get_payload()
    assert isinstance(text, str)
    assert text.strip(), f"{name} has no long description"
    relative = _relative_links(text)
    assert not relative, f"{name}'s README has links that break on the index: {relative}"


def test_runkit_core_has_a_trio_extra(wheels: dict[str, Path]) -> None:
    metadata = _metadata(wheels["runkit-core"])
    assert "trio" in metadata.get_all("Provides-Extra", [])
    trio = [
        requirement
        for requirement in map(Requirement, metadata.get_all("Requires-Dist", []))
        if requirement.name == "trio"
        and requirement.marker is not None
        and requirement.marker.evaluate({"extra": "trio"})
    ]
    assert [str(r.specifier) for r in trio] == [">=0.27"]


@pytest.mark.timeout(120)
def test_wheels_install_into_a_fresh_virtualenv_and_run(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        ["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=60
    )
    python = venv / "bin" / "python"
    # Only the wheels of the three distributions a user installs; the rest
    # comes from the package index (or uv's cache).
    subprocess.run(
        [
            "uv",
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            *(str(wheels[n]) for n in ("dogma-api", "runkit-core", "runkit-memory")),
        ],
        check=True,
        timeout=90,
    )
    runkit = venv / "bin" / "runkit"
    drivers = subprocess.run(
        [str(runkit), "drivers"], capture_output=True, text=True, timeout=30, check=False
    )
    assert drivers.returncode == 0, drivers.stderr
    assert "memory" in drivers.stdout
    version = subprocess.run(
        [str(runkit), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    if version.returncode == 2 and "unrecognized arguments" in version.stderr:
        pytest.skip("this runkit has no --version yet")
    assert version.returncode == 0, version.stderr
    assert "0.1.0" in version.stdout
