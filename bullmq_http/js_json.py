"""JSON read as JavaScript's JSON.parse reads it, and written exactly as its
JSON.stringify writes it, so that what the service stores is byte for byte what
BullMQ's Node library would have stored; `compact` is how the service writes every
other JSON (answers, events, the values it signs, log lines).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

TOO_DEEP = "is nested too deeply to be read as JSON"


def parse(body: bytes) -> Any:
    """Parse bytes as one JSON value as JSON.parse does: every number a double, and
    only finite ones; raise ValueError saying what is wrong ("... must be valid JSON")."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not valid UTF-8") from None
    try:
        return json.loads(
            text, parse_constant=_not_json, parse_float=_finite_number, parse_int=_finite_number
        )
    except RecursionError:
        raise ValueError(TOO_DEEP) from None
    except ValueError as error:
        raise ValueError(f"must be valid JSON ({error})") from None


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_number(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]}{'...' if len(text) > 40 else ''} is too large")
    return number


# Made once: json.dumps with options builds a new encoder on every call.
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def compact(value: Any) -> str:
    """Write a value the service made (strings, numbers, lists, dicts with string keys)
    as JSON, compact and not ASCII-escaped, as JSON.stringify writes such values too."""
    return _compact(value)


def stringify(value: Any) -> str:
    """Write a parsed JSON value exactly as JavaScript's JSON.stringify writes it.

    Compact; numbers as JavaScript writes them (js_number); an object's keys in the
    order JavaScript keeps them: array indexes ("0", "7") first, ascending, then the
    others as they came, a repeated key where it first came with its last value.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is True or value is False or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return js_number(value)
    if isinstance(value, list):
        return "[" + ",".join(map(stringify, value)) + "]"
    indexes = sorted((key for key in value if is_array_index(key)), key=int)
    keys = indexes + [key for key in value if not is_array_index(key)] if indexes else value
    return (
        "{"
        + ",".join(f"{json.dumps(key, ensure_ascii=False)}:{stringify(value[key])}" for key in keys)
        + "}"
    )


def is_array_index(key: str) -> bool:
    """Say whether JavaScript takes an object key for an array index."""
    return (
        key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) < 2**32 - 1
    )


def js_number(number: float) -> str:
    """Write a finite number as JavaScript does (Number::toString in ECMA-262): the
    shortest digits that read back the same (as Python's repr), placed by its rules."""
    if number == 0:
        return "0"  # -0 too
    mantissa, _, exponent = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    written = whole + fraction
    significant = written.lstrip("0")
    # The value is 0.<digits> * 10**n.
    n = len(whole) + int(exponent or 0) - (len(written) - len(significant))
    digits = significant.rstrip("0")
    sign = "-" if number < 0 else ""
    if len(digits) <= n <= 21:
        return sign + digits + "0" * (n - len(digits))
    if 0 < n <= 21:
        return f"{sign}{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{digits}"
    fraction = f".{digits[1:]}" if len(digits) > 1 else ""
    return f"{sign}{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"
