"""Driver plugins: a third-party driver registered at run time, scheme lookup and URL errors."""

from collections.abc import AsyncIterator, Callable, Iterator
from typing import ClassVar
from urllib.parse import urlsplit

import hypothesis
import pytest

import runkit
from runkit.persistence import (
    InvalidURL,
    Provider,
    URLProblems,
    check_url,
    installed_schemes,
    plugin_manager,
    provider_from_url,
    query_params,
    redact_url,
    url_problems,
)
from runkit.testing import ConformanceSuite, unique_name
from runkit.testing.faults import FaultyProvider
from runkit_memory import MemoryProvider


class ThirdPartyProvider(FaultyProvider):
    """A "third-party" driver: the memory driver behind a (fault-free) wrapper."""


class ThirdPartyPlugin:
    """What a third-party distribution's plugin module would hold."""

    @runkit.hookimpl
    def runkit_persistence_schemes(self) -> list[str]:
        return ["thirdparty"]

    @runkit.hookimpl
    def runkit_persistence_provider(self, url: str) -> Provider | None:
        parts = urlsplit(url)
        if parts.scheme != "thirdparty":
            return None
        if parts.netloc:
            raise ValueError(f"thirdparty URL {redact_url(url)!r} must not name a host")
        query_params(url, frozenset())
        return ThirdPartyProvider(MemoryProvider(f"thirdparty:{parts.path}"))


class SilentPlugin:
    """A broken plugin: lists a scheme but never returns a provider for it."""

    @runkit.hookimpl
    def runkit_persistence_schemes(self) -> list[str]:
        return ["silent"]

    @runkit.hookimpl
    def runkit_persistence_provider(self, url: str) -> Provider | None:
        return None


@pytest.fixture
def thirdparty() -> Iterator[None]:
    pm = plugin_manager()
    pm.register(ThirdPartyPlugin(), name="thirdparty")
    try:
        yield
    finally:
        pm.unregister(name="thirdparty")


class TestThirdPartyDriver(ConformanceSuite):
    """A plugin registered at run time passes every contract test."""

    hypothesis_settings: ClassVar[hypothesis.settings] = hypothesis.settings(
        max_examples=10, stateful_step_count=20, deadline=None
    )

    @pytest.fixture
    def url(self, thirdparty: None) -> str:
        return f"thirdparty:///{unique_name('silo')}"

    @pytest.fixture
    async def provider(self, url: str) -> AsyncIterator[Provider]:
        provider = provider_from_url(url)
        assert isinstance(provider, ThirdPartyProvider)
        async with provider:
            yield provider

    @pytest.fixture
    def make_provider(self, url: str) -> Callable[[], Provider]:
        return lambda: provider_from_url(url)


def _installed() -> str:
    return ", ".join(sorted(installed_schemes()))


def test_registered_plugin_is_selected_by_its_scheme(thirdparty: None) -> None:
    assert installed_schemes()["thirdparty"] == "thirdparty"
    assert isinstance(provider_from_url("thirdparty:///x"), ThirdPartyProvider)
    assert isinstance(provider_from_url("THIRDPARTY:///x"), ThirdPartyProvider)
    assert isinstance(provider_from_url("memory:///x"), MemoryProvider)


def test_unregistered_plugin_scheme_is_unknown_again() -> None:
    assert "thirdparty" not in installed_schemes()
    with pytest.raises(ValueError) as info:
        provider_from_url("thirdparty:///x")
    assert str(info.value) == (
        f"no persistence driver handles 'thirdparty' URLs (installed schemes: {_installed()}); "
        "install a runkit driver plugin that handles it"
    )


@pytest.mark.parametrize("url", ["localhost:5432/app", "db.internal:5432/app?schema=x"])
def test_a_url_without_its_scheme_says_so(url: str) -> None:
    # The host reads as the scheme: "install a driver for it" would mislead.
    message = (
        f"persistence URL {url!r} does not start with a scheme ({url.partition(':')[0]!r} is not "
        f"one); expected e.g. 'memory:///app' or 'postgresql://host/db' (installed schemes: "
        f"{_installed()})"
    )
    with pytest.raises(ValueError) as info:
        provider_from_url(url)
    assert str(info.value) == message
    assert url_problems(url) == [message]


def test_unknown_first_party_scheme_names_the_package_to_install() -> None:
    pm = plugin_manager()
    memory = pm.unregister(name="memory")
    assert memory is not None
    try:
        assert "memory" not in installed_schemes()
        with pytest.raises(ValueError) as info:
            provider_from_url("memory:///app")
        assert str(info.value) == (
            f"no persistence driver handles 'memory' URLs (installed schemes: {_installed()}); "
            "install the driver: pip install runkit-memory"
        )
    finally:
        pm.register(memory, name="memory")
    assert isinstance(provider_from_url("memory:///app"), MemoryProvider)


def test_plugin_returning_no_provider_for_its_scheme_is_reported() -> None:
    pm = plugin_manager()
    pm.register(SilentPlugin(), name="silent")
    try:
        with pytest.raises(ValueError) as info:
            provider_from_url("silent://user:pw@host/x")
        assert str(info.value) == (
            "the 'silent' plugin lists scheme 'silent' but returned no provider "
            "for 'silent://user:***@host/x'"
        )
    finally:
        pm.unregister(name="silent")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "localhost/db",
            "persistence URL 'localhost/db' has no scheme; "
            "expected e.g. 'memory:///app' or 'postgresql://host/db'",
        ),
        (
            "//bob:s3cret@db/app",
            "persistence URL '//bob:***@db/app' has no scheme; "
            "expected e.g. 'memory:///app' or 'postgresql://host/db'",
        ),
        (
            "postgresql://bob:s3cret@[::1/app",
            "malformed persistence URL 'postgresql://bob:***@[::1/app': Invalid IPv6 URL",
        ),
    ],
)
def test_malformed_url_names_the_wrong_part_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url(url)
    assert str(info.value) == message
    assert "s3cret" not in str(info.value)


def test_plugin_errors_for_its_own_urls_hide_passwords(thirdparty: None) -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url("thirdparty://admin:s3cret@host/x")
    assert str(info.value) == (
        "thirdparty URL 'thirdparty://admin:***@host/x' must not name a host"
    )
    with pytest.raises(ValueError) as info:
        provider_from_url("thirdparty:///x?password=s3cret")
    assert str(info.value) == "thirdparty:// URL has unknown parameter 'password' (allowed: none)"


def test_non_str_url_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^persistence URL must be str, not bytes$"):
        provider_from_url(b"memory:///x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://bob:s3cret@db:5432/app", "postgresql://bob:***@db:5432/app"),
        ("postgresql://:s3cret@db/app", "postgresql://:***@db/app"),
        ("s3://key:s3cret@[::1]:9000/bucket?x=1", "s3://key:***@[::1]:9000/bucket?x=1"),
        ("postgresql://bob@db/app", "postgresql://bob@db/app"),
        ("memory:///app", "memory:///app"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:s3cret@h1:5432,h2:5433/app", "postgresql://bob:***@h1:5432,h2:5433/app"),
        ("postgresql://bob:s3cret@[::1]:5432/app", "postgresql://bob:***@[::1]:5432/app"),
        (
            "postgresql://db/app?password=s3cret&sslmode=require",
            "postgresql://db/app?password=***&sslmode=require",
        ),
        ("host=db password='s 3cret' user=bob", "host=db password=*** user=bob"),
        ("://bob:s3cret@db/x", "://bob:***@db/x"),
        ("memory:///silo", "memory:///silo"),
        # Unencoded '/', '#' or '?' in the password: urlsplit cannot see it.
        ("postgresql://app:Sup3r/Secret@db/app", "postgresql://app:***@db/app"),
        ("postgresql://app:Sup3r#Secret@db/app", "postgresql://app:***@db/app"),
        ("s3://AKIA:wJal/K7MD/bPx@h:9000/b", "s3://AKIA:***@h:9000/b"),
        ("postgresql://db:5432/app?user=me@corp", "postgresql://db:5432/app?user=me@corp"),
    ],
)
def test_redact_url_hides_every_password_form(url: str, shown: str) -> None:
    from runkit.persistence import redact_url

    assert redact_url(url) == shown


# AWS secret keys routinely hold '/'; passwords may hold '#' or '?'.
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (f"dynamodb://AKIAEXAMPLE:{SECRET}@localhost:8000/app", SECRET),
        (f"s3://AKIAEXAMPLE:{SECRET}@localhost:9000/bucket", SECRET),
        ("postgresql://app:Sup3r/Secret@db.example.com/app", "Sup3r/Secret"),
        ("postgresql://app:Sup3r#Secret@db.example.com/app", "Sup3r#Secret"),
    ],
)
def test_url_errors_never_show_any_piece_of_a_password(url: str, secret: str) -> None:
    with pytest.raises(ValueError) as info:
        provider_from_url(url)
    text = " ".join([str(info.value), *map(str, getattr(info.value, "problems", ()) or ())])
    for piece in secret.replace("#", "/").split("/"):
        assert piece not in text, text


@pytest.mark.parametrize(
    ("url", "shown", "secret"),
    [
        # The whole value goes, whatever it holds: parsed, not matched up to a space or '&'.
        (
            "postgresql://app@127.0.0.1:55432/postgres?password=correct horse&schema=rk2",
            "postgresql://app@127.0.0.1:55432/postgres?password=***&schema=rk2",
            "correct horse",
        ),
        (
            "postgresql://app@h/db?password=pa%26ss123&schema=rk2",
            "postgresql://app@h/db?password=***&schema=rk2",
            "pa%26ss123",
        ),
        (
            "postgresql://app@h/db?password=p%25s&x=1",
            "postgresql://app@h/db?password=***&x=1",
            "p%25s",
        ),
        (
            "postgresql://app@h/db?password=p@ss&x=1",
            "postgresql://app@h/db?password=***&x=1",
            "p@ss",
        ),
        (
            "postgresql://app@h/db?sslpassword=pässwörd€&x=1",
            "postgresql://app@h/db?sslpassword=***&x=1",
            "pässwörd€",
        ),
        (
            "postgresql://app@h/db?pass%77ord=s3cret",
            "postgresql://app@h/db?pass%77ord=***",
            "s3cret",
        ),
        # Very short ones, here and in the user info: nothing else is touched.
        (
            "postgresql://p:p@h/p?password=p&schema=p",
            "postgresql://p:***@h/p?password=***&schema=p",
            None,
        ),
        # An unencoded '&' or '#' leaves a part that is no parameter: hidden to the end.
        ("postgresql://app@h/db?password=pa&ss123", "postgresql://app@h/db?password=***", "ss123"),
        (
            "postgresql://app@h/db?password=pa&Zq9&schema=rk2",
            "postgresql://app@h/db?password=***",
            "Zq9",
        ),
        ("postgresql://app@h/db?password=pa#ss123", "postgresql://app@h/db?password=***", "ss123"),
        ("s3:///b?prefix=x#frag", "s3:///b?prefix=x#frag", None),
        # libpq's keyword/value form: a value ends at unescaped whitespace, '&' included.
        ("host=db password=a&b user=bob", "host=db password=*** user=bob", "a&b"),
        ("host=db password=a\\ b user=bob", "host=db password=*** user=bob", "a\\ b"),
    ],
)
def test_redact_url_hides_password_parameters_whole(
    url: str, shown: str, secret: str | None
) -> None:
    assert redact_url(url) == shown
    if secret is not None:
        assert secret not in shown


def test_redacted_password_parameters_everywhere_urls_are_shown() -> None:
    url = "postgresql://app@127.0.0.1:55432/postgres?password=correct horse&schema=rk2"
    assert repr(runkit.with_persistence(url)) == (
        "with_persistence('postgresql://app@127.0.0.1:55432/postgres?password=***&schema=rk2')"
    )
    with pytest.raises(runkit.ConfigurationError) as info:
        runkit.with_persistence(url.replace("schema", "nope"))
    assert "horse" not in str(info.value)
    assert "password=***&nope=rk2" in str(info.value)


class CheckingPlugin(ThirdPartyPlugin):
    """A third-party driver that also implements the URL-checking hook."""

    @runkit.hookimpl
    def runkit_persistence_url_problems(self, url: str) -> list[str] | None:
        if urlsplit(url).scheme != "thirdparty":
            return None
        problems = URLProblems(url)
        query_params(url, frozenset({"ttl"}), problems)
        if urlsplit(url).netloc:
            problems.add(f"thirdparty URL {redact_url(url)!r} must not name a host")
        return problems.problems


def test_check_url_reports_every_problem_the_driver_finds() -> None:
    pm = plugin_manager()
    pm.register(CheckingPlugin(), name="checking")
    try:
        url = "thirdparty://bob:s3cret@host/x?ttl=1&a=1&ttl=2"
        assert url_problems(url) == [
            "thirdparty:// URL has unknown parameter 'a' (allowed: ttl)",
            "thirdparty:// URL repeats parameter 'ttl'",
            "thirdparty URL 'thirdparty://bob:***@host/x?ttl=1&a=1&ttl=2' must not name a host",
        ]
        with pytest.raises(InvalidURL) as info:
            check_url(url)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, runkit.ConfigurationError)
        assert str(info.value) == (
            "persistence URL 'thirdparty://bob:***@host/x?ttl=1&a=1&ttl=2' has 3 problems\n"
            "  - thirdparty:// URL has unknown parameter 'a' (allowed: ttl)\n"
            "  - thirdparty:// URL repeats parameter 'ttl'\n"
            "  - thirdparty URL 'thirdparty://bob:***@host/x?ttl=1&a=1&ttl=2' must not name a host"
        )
        check_url("thirdparty:///x?ttl=1")  # valid: no error
    finally:
        pm.unregister(name="checking")


def test_a_driver_without_the_checking_hook_is_checked_by_making_a_provider(
    thirdparty: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hook is optional: without it the URL is checked by the provider hook
    # (which does no I/O), so a malformed URL still fails at the option, not
    # at start-up.
    problem = "thirdparty URL 'thirdparty://host/x' must not name a host"
    assert url_problems("thirdparty://host/x") == [problem]
    with pytest.raises(ValueError, match="must not name a host"):
        check_url("thirdparty://host/x")
    with pytest.raises(ValueError, match="must not name a host"):
        runkit.with_persistence("thirdparty://host/x")
    monkeypatch.setenv("DOGMA_PERSISTENCE_URL", "thirdparty://host/x")
    with pytest.raises(runkit.ConfigurationError, match="DOGMA_PERSISTENCE_URL"):
        runkit.from_environment()
    assert url_problems("thirdparty:///x") == []
    runkit.with_persistence("thirdparty:///x")


def test_check_url_scheme_problems() -> None:
    assert url_problems("localhost/db") == [
        "persistence URL 'localhost/db' has no scheme; "
        "expected e.g. 'memory:///app' or 'postgresql://host/db'"
    ]
    (problem,) = url_problems("cockroach://db/app")
    assert problem.endswith("install a runkit driver plugin that handles it")
    assert "pip install" not in problem
    with pytest.raises(TypeError, match="persistence URL must be str, not bytes"):
        check_url(b"memory:///x")  # type: ignore[arg-type]


def test_an_uninstalled_first_party_driver_names_its_package() -> None:
    pm = plugin_manager()
    postgres = pm.unregister(name="postgres")
    assert postgres is not None
    try:
        (problem,) = url_problems("postgresql://db/app?foo=1")
        assert problem == (
            f"no persistence driver handles 'postgresql' URLs (installed schemes: {_installed()}); "
            "install the driver: pip install runkit-postgres"
        )
    finally:
        pm.register(postgres, name="postgres")


@pytest.mark.parametrize(
    ("url", "count"),
    [
        ("memory://host/?a=1#f", 3),
        ("postgresql://u:s3cret@h:99999/db?foo=1&pool_timeout=soon&schema=1x#f", 5),
        ("dynamodb://h:1/bad prefix?region=x_y&insecure=maybe&zz=1", 4),
        ("s3://u:s3cret@h/Bad_Bucket/below?prefix=&region=nope&role_arn=x", 5),
    ],
)
def test_every_driver_reports_every_problem_without_io(url: str, count: int) -> None:
    problems = url_problems(url)
    assert len(problems) == count, problems
    assert not any("s3cret" in p for p in problems)
    # The provider refuses the URL with the same problems.
    with pytest.raises(ValueError) as info:
        provider_from_url(url)
    assert isinstance(info.value, InvalidURL)
    assert list(info.value.problems) == problems
