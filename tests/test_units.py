import pytest

from spillway.units import (
    DurationError,
    QuantityError,
    format_bytes,
    format_duration,
    parse_duration,
    parse_quantity,
    plain_int,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4Gi", 4 << 30), ("512Mi", 512 << 20), ("1", 1), ("1k", 1000), ("1.5Gi", 3 << 29), ("80G", 80 * 10**9),
     (" 2Ki ", 2048), ("0.5", 1), (1024, 1024), ("1e", None)],
)
def test_parse_quantity(text: str | int, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(QuantityError, match="4Gi"):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "4GB", "4 Gi x", "-1Gi", "0", "0Mi", "--1"])
def test_bad_quantities_show_the_accepted_forms(bad: str) -> None:
    with pytest.raises(QuantityError) as err:
        parse_quantity(bad)
    assert "4Gi, 512Mi" in str(err.value)
    assert repr(bad) in str(err.value)


def test_zero_allowed_when_asked() -> None:
    assert parse_quantity("0", allow_zero=True) == 0


def test_format_bytes_round_trips() -> None:
    for n in (1, 1023, 1 << 20, 3 << 30, 80 << 30, 64 << 20):
        text = format_bytes(n)
        if "." not in text:
            assert parse_quantity(text) == n
    assert format_bytes(1536 << 20) == "1536Mi"
    assert format_bytes((1 << 30) + 1) == "1.0Gi"


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("5s", 5), ("1m30s", 90), ("2h", 7200), ("1.5s", 1.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "s", "-5s", "5x", "0s", "1m 30s"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(DurationError, match="250ms"):
        parse_duration(bad)


def test_format_duration() -> None:
    assert format_duration(0.85) == "850ms"
    assert format_duration(5400) == "1h30m"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("42", 42), ("9" * 19, int("9" * 19)), ("", None), ("9" * 20, None), ("\u00b9", None),
     ("\u0663", None), ("-1", None), (" 1", None), ("1.0", None), (7, None), (None, None)],
)
def test_plain_int_takes_ascii_digits_only(text: object, expected: int | None) -> None:
    # "\u00b9" (superscript one) passes str.isdigit() and makes int() raise; "\u0663"
    # (Arabic-Indic three) is a digit int() accepts but no cursor or index this project writes
    assert plain_int(text) == expected


@pytest.mark.parametrize("text", ["\u0663Gi", "1\u00b9", "\u0661s"])
def test_quantities_and_durations_take_ascii_digits_only(text: str) -> None:
    with pytest.raises((QuantityError, DurationError)):
        parse_duration(text) if text.endswith("s") else parse_quantity(text)
