"""Kubernetes quantities and Go-style durations: the one place sizes and times are parsed."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\s*$", re.ASCII)

QUANTITY_FORMS = "a Kubernetes quantity such as 4Gi, 512Mi, 80G or 1073741824"
MAX_QUANTITY_CHARS = 64  # checked before parsing: Decimal and int() are superlinear in the digits


class QuantityError(ValueError):
    """A size that is not a Kubernetes quantity, or not allowed here."""


def parse_quantity(text: str | int, *, allow_zero: bool = False) -> int:
    """Return the byte count of a Kubernetes quantity ("4Gi", "512Mi", "1.5G", "1024").

    Fractions of a byte are rounded up. Negative sizes, and zero unless allowed, are errors
    whose message shows the accepted forms.
    """
    if isinstance(text, bool):
        raise QuantityError(f"size {text!r} is not a quantity: use {QUANTITY_FORMS}")
    if isinstance(text, int):
        value = Decimal(text)
        shown = str(text)
    else:
        if len(text) > MAX_QUANTITY_CHARS:
            raise QuantityError(f"size is {len(text)} characters long; at most {MAX_QUANTITY_CHARS} are accepted "
                                f"(it starts {text[:20]!r}): use {QUANTITY_FORMS}")
        shown = text
        match = _QUANTITY.match(text or "")
        if not match:
            raise QuantityError(f"size {text!r} is not a quantity: use {QUANTITY_FORMS}")
        number, suffix = match.group(1), match.group(2) or ""
        try:
            value = Decimal(number) * (_BINARY.get(suffix) or _DECIMAL[suffix])
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
            raise QuantityError(f"size {text!r} is not a quantity: use {QUANTITY_FORMS}") from exc
    if value < 0:
        raise QuantityError(f"size {shown!r} is negative: use {QUANTITY_FORMS}")
    result = int(value.to_integral_value(rounding="ROUND_CEILING"))
    if result == 0 and not allow_zero:
        raise QuantityError(f"size {shown!r} is zero: ask for at least 1 byte, as {QUANTITY_FORMS}")
    return result


def plain_int(text: object, *, max_digits: int = 19) -> int | None:
    """The value of a string of ASCII digits (a count, an index, a cursor), else None.

    `str.isdigit()` alone is not enough: it is true for superscripts and other Unicode digits
    that `int()` rejects, and a long string makes `int()` superlinear.
    """
    if not isinstance(text, str) or not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def format_bytes(n: int) -> str:
    """Render a byte count the way `kubectl` users read it: exact binary suffix when it fits."""
    if n == 0:
        return "0"
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _BINARY[suffix]
        if n >= unit:
            return f"{n / unit:.1f}{suffix}"
    return str(n)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)", re.ASCII)
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_FORMS = "a duration such as 250ms, 5s, 1m30s or 2h"


class DurationError(ValueError):
    """A time span that is not a Go/Kubernetes-style duration."""


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """Return the seconds of a Go-style duration ("250ms", "1m30s", "2h")."""
    s = (text or "").strip()
    if not s:
        raise DurationError(f"duration {text!r} is empty: use {DURATION_FORMS}")
    if s.startswith("-"):
        raise DurationError(f"duration {text!r} is negative: use {DURATION_FORMS}")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s):
        raise DurationError(f"duration {text!r} is not a duration: use {DURATION_FORMS}")
    if total == 0 and not allow_zero:
        raise DurationError(f"duration {text!r} is zero: use {DURATION_FORMS}")
    return total


def format_duration(seconds: float) -> str:
    """Short human form: 850ms, 12s, 5m, 1h30m."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return out or "0s"
