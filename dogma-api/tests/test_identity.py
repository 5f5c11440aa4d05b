"""Dogma's UUID rule and identity-name rule."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dogma

VALID = "5195fe85-eb3f-4121-84b0-be72cbc5722f"
NIL = "00000000-0000-0000-0000-000000000000"


def non_nil_uuids() -> st.SearchStrategy[uuid.UUID]:
    return st.uuids(allow_nil=False)


# --------------------------------------------------------------------------- keys


@settings(deadline=None)
@given(non_nil_uuids(), st.booleans())
def test_key_accepts_hyphenated_uuid_in_either_case_and_lowercases_it(
    u: uuid.UUID, upper: bool
) -> None:
    text = str(u).upper() if upper else str(u)
    assert dogma.validate_identity_key(text) == str(u)


@settings(deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32))
def test_key_accepts_any_hex_regardless_of_version_and_variant_bits(digits: str) -> None:
    text = f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
    if text == NIL:
        return
    assert dogma.validate_identity_key(text) == text.lower()


def test_key_accepts_mixed_case() -> None:
    assert dogma.validate_identity_key("5195FE85-eb3f-4121-84B0-be72cbc5722F") == VALID


@settings(deadline=None)
@given(non_nil_uuids())
def test_key_rejects_forms_python_uuid_accepts(u: uuid.UUID) -> None:
    # Every form below is accepted by uuid.UUID(); Dogma accepts only the hyphenated form.
    forms = [
        "{" + str(u) + "}",
        "urn:uuid:" + str(u),
        u.hex,
        u.hex.upper(),
        "{" + u.hex + "}",
    ]
    for form in forms:
        assert uuid.UUID(form) == u
        with pytest.raises(ValueError, match=re.escape(f"invalid identity key {form!r}")):
            dogma.validate_identity_key(form)


@settings(deadline=None)
@given(non_nil_uuids(), st.integers(min_value=0, max_value=35), st.characters())
def test_key_rejects_any_wrong_character(u: uuid.UUID, index: int, ch: str) -> None:
    text = str(u)
    wrong = "-" if index not in (8, 13, 18, 23) else "0"
    if ch not in "0123456789abcdefABCDEF-":
        wrong = ch
    broken = text[:index] + wrong + text[index + 1 :]
    with pytest.raises(ValueError, match=rf"character {index} is "):
        dogma.validate_identity_key(broken)


@settings(deadline=None)
@given(st.text(max_size=80).filter(lambda s: len(s) != 36))
@example("")
@example(" " + VALID)
@example(VALID + "\n")
def test_key_rejects_wrong_length(text: str) -> None:
    with pytest.raises(ValueError, match=rf"it is {len(text)} characters long, not 36"):
        dogma.validate_identity_key(text)


@pytest.mark.parametrize("text", [NIL, NIL.upper()])
def test_key_rejects_nil_uuid(text: str) -> None:
    with pytest.raises(ValueError, match="it is the nil UUID"):
        dogma.validate_identity_key(text)


def test_key_error_names_value_and_rule() -> None:
    with pytest.raises(ValueError) as info:
        dogma.validate_identity_key("not-a-uuid")
    assert str(info.value) == (
        "invalid identity key 'not-a-uuid': it is 10 characters long, not 36; "
        "expected a UUID in the 36-character hyphenated form "
        "(e.g. '5195fe85-eb3f-4121-84b0-be72cbc5722f'), which must not be the nil UUID"
    )


def test_key_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="identity key must be a str, got UUID"):
        dogma.validate_identity_key(uuid.UUID(VALID))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- names

printable_no_space = st.characters(
    blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
)


@settings(deadline=None)
@given(st.text(alphabet=printable_no_space, min_size=1, max_size=63))
def test_name_accepts_printable_text_without_whitespace(name: str) -> None:
    assert dogma.validate_identity_name(name) == name


@pytest.mark.parametrize(
    "name", ["a", "account", "daily-debit-limit", "ünïcödé", "日本", "a" * 255]
)
def test_name_accepts_examples(name: str) -> None:
    assert dogma.validate_identity_name(name) == name


def test_name_limit_is_in_bytes_not_characters() -> None:
    assert dogma.validate_identity_name("é" * 127) == "é" * 127  # 254 bytes
    with pytest.raises(ValueError, match=r"it is 256 bytes long"):
        dogma.validate_identity_name("é" * 128)


def test_name_rejects_empty() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "invalid identity name '': it is empty; "
            "names must be 1-255 bytes of printable UTF-8 with no whitespace"
        ),
    ):
        dogma.validate_identity_name("")


def test_name_rejects_more_than_255_bytes() -> None:
    with pytest.raises(ValueError, match="it is 256 bytes long"):
        dogma.validate_identity_name("a" * 256)


@pytest.mark.parametrize("ch", [" ", "\t", "\n", "\u00a0", "\u2003", "\u3000", "\u2028"])
def test_name_rejects_whitespace(ch: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"it contains whitespace ({ch!r})")):
        dogma.validate_identity_name(f"a{ch}b")


@pytest.mark.parametrize("ch", ["\x00", "\x7f", "\u200b", "\ue000"])
def test_name_rejects_non_printable(ch: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"non-printable character ({ch!r})")):
        dogma.validate_identity_name(f"a{ch}b")


def test_name_rejects_lone_surrogate() -> None:
    with pytest.raises(ValueError, match="it is not valid UTF-8"):
        dogma.validate_identity_name("a\ud800")


def test_name_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="identity name must be a str, got bytes"):
        dogma.validate_identity_name(b"abc")  # type: ignore[arg-type]
