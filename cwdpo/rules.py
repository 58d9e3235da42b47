"""Value rules: what a config value may be, and the words that say so in an error.

`Rule.violated(value)` returns what was expected (for the message naming the key and the
value) or None; the constructors (`real`, `integer`, `fraction`, `choice`, ...) are the
vocabulary the schema's tables in `config_schema` are written in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    """`ok(value)` says whether a value is allowed; `expected` says what is, for the message."""

    ok: Check
    expected: str
    nullable: bool = False
    meaning: str = ""  # what the value is, shown after the range

    def violated(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        if value is not None and self.ok(value):
            return None
        return (
            self.expected
            + (" or null" if self.nullable else "")
            + (f" ({self.meaning})" if self.meaning else "")
        )


def about(rule: Rule, meaning: str) -> Rule:
    return replace(rule, meaning=meaning)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def real(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    nullable: bool = False,
    integer: bool = False,
) -> Rule:
    def ok(v: Any) -> bool:
        if not (is_int(v) if integer else is_real(v)):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    what = "an integer" if integer else "a number"
    rng = _interval(lo, hi, lo_open, hi_open)
    return Rule(ok, f"{what} {rng}".strip(), nullable)


def integer(lo: int | None = None, hi: int | None = None, *, nullable: bool = False) -> Rule:
    return real(lo, hi, nullable=nullable, integer=True)


def positive(nullable: bool = False) -> Rule:
    return real(0, lo_open=True, nullable=nullable)


def fraction(nullable: bool = False) -> Rule:
    return real(0, 1, nullable=nullable)


def choice(*options: Any, nullable: bool = False) -> Rule:
    return Rule(lambda v: v in options, f"one of {list(options)}", nullable)


def boolean(nullable: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false", nullable)


def string(nullable: bool = False) -> Rule:
    return Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string", nullable)


def either(a: Rule, b: Rule) -> Rule:
    return Rule(
        lambda v: a.ok(v) or b.ok(v), f"{a.expected}, or {b.expected}", a.nullable or b.nullable
    )
