"""The operators of a condition, one small unit each, registered in :data:`OPERATORS`.

Each operator checks its operand once at load (a message when it is wrong) and builds a test
of one value (see :mod:`engine.rules.values` for what a value is). Shared semantics:

- A missing attribute fails every operator except ``not_exists`` (before ``negate``).
- Text comparisons are exact and case-sensitive, on the value without its padding; a
  multi-valued value is compared as its values joined with a backslash (``ORIGINAL\\PRIMARY``),
  except by ``contains``, which tests membership.
- Numbers: ``<``, ``>`` and ``approx`` (and ``==``, ``!=``, ``in``, ``contains`` given a number)
  read DS/IS (and DA, TM) text as a decimal number; a value that is not one number fails them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Final

from engine.config.issues import found_value
from engine.rules.values import Value, number, text

__all__ = [
    "DEFAULT_OPERATOR",
    "DEFAULT_TOLERANCE",
    "OPERATORS",
    "Operator",
    "Test",
    "item_problems",
]

Test = Callable[[Value], bool]


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_text_or_number(x: object) -> bool:
    return isinstance(x, str) or _is_number(x)


def _equals(operand: str | int | float) -> Test:
    if isinstance(operand, str):
        return lambda v: text(v) == operand
    return lambda v: number(v) == operand


class Operator:
    """An operator: its name, the operand it takes, and the test it builds."""

    name: ClassVar[str]
    #: One line for the schema and the README.
    doc: ClassVar[str]
    #: False for exists / not_exists, which look only at presence.
    takes_value: ClassVar[bool] = True
    #: True when the operand is always a number (the attribute must be able to hold one).
    numeric: ClassVar[bool] = False

    def check(self, operand: object) -> str | None:
        """What is wrong with ``operand`` for this operator, or None."""
        if _is_text_or_number(operand):
            return None
        return f"operator '{self.name}' needs text or a number, {found_value(operand)}"

    def build(self, operand: Any, tolerance: float) -> Test:
        """The test of one value (operand already checked)."""
        raise NotImplementedError


class Regexp(Operator):
    name = "regexp"
    doc = "Python re.search of the value's text (multi-valued: values joined with '\\')"

    def check(self, operand: object) -> str | None:
        if not isinstance(operand, str):
            hint = " (put it in quotes)" if _is_number(operand) else ""
            found = found_value(operand)
            return f"operator 'regexp' needs a regular expression (text), {found}{hint}"
        try:
            re.compile(operand)
        except re.error as exc:
            return f"invalid regular expression: {exc}"
        return None

    def build(self, operand: Any, tolerance: float) -> Test:
        search = re.compile(operand).search

        def test(v: Value) -> bool:
            t = v if type(v) is str else text(v)
            return t is not None and search(t) is not None

        return test


class Contains(Operator):
    name = "contains"
    doc = (
        "multi-valued attribute: one of its values equals the operand (membership); "
        "single-valued: the text holds the operand as a substring (a number: equals it)"
    )

    def build(self, operand: Any, tolerance: float) -> Test:
        equals = _equals(operand)

        def test(v: Value) -> bool:
            if isinstance(v, tuple):
                return any(equals(x) for x in v)
            if isinstance(operand, str):
                t = text(v)
                return t is not None and operand in t
            return bool(number(v) == operand)

        return test


class Equal(Operator):
    name = "=="
    doc = "text operand: the text equals it exactly; number operand: numerically equal"

    def build(self, operand: Any, tolerance: float) -> Test:
        return _equals(operand)


class NotEqual(Operator):
    name = "!="
    doc = "the value can be compared (text, or a number for a number operand) and differs"

    def build(self, operand: Any, tolerance: float) -> Test:
        if isinstance(operand, str):
            return lambda v: (t := text(v)) is not None and t != operand
        return lambda v: (n := number(v)) is not None and bool(n != operand)


class _Ordering(Operator):
    numeric = True

    def holds(self, value: float, operand: float) -> bool:
        """The comparison itself, on two numbers."""
        raise NotImplementedError

    def check(self, operand: object) -> str | None:
        if _is_number(operand):
            return None
        return f"operator '{self.name}' needs a number, {found_value(operand)}"

    def build(self, operand: Any, tolerance: float) -> Test:
        holds = self.holds
        return lambda v: (n := number(v)) is not None and holds(n, operand)


class Less(_Ordering):
    name = "<"
    doc = "the value is a number below the operand"

    def holds(self, value: float, operand: float) -> bool:
        return value < operand


class Greater(_Ordering):
    name = ">"
    doc = "the value is a number above the operand"

    def holds(self, value: float, operand: float) -> bool:
        return value > operand


class Approx(_Ordering):
    name = "approx"
    doc = "the value is a number within 'tolerance' (absolute, default 0.001) of the operand"

    def build(self, operand: Any, tolerance: float) -> Test:
        return lambda v: (n := number(v)) is not None and bool(abs(n - operand) <= tolerance)


class Exists(Operator):
    name = "exists"
    doc = "the attribute is present (even empty); with [*]: in at least one value or item"
    takes_value = False

    def build(self, operand: Any, tolerance: float) -> Test:
        return lambda v: True


class NotExists(Exists):
    name = "not_exists"
    doc = "the attribute is absent (the only operator a missing attribute satisfies)"


class In(Operator):
    name = "in"
    doc = "the value equals one of the listed operands (each as for ==)"

    def check(self, operand: object) -> str | None:
        if not isinstance(operand, list) or not operand:
            found = found_value(operand)
            return f"operator 'in' needs a non-empty list of text or numbers, {found}"
        return None  # items are checked one by one (item_problems)

    def build(self, operand: Any, tolerance: float) -> Test:
        texts = frozenset(x for x in operand if isinstance(x, str))
        numbers = frozenset(x for x in operand if not isinstance(x, str))
        if not numbers:
            return lambda v: text(v) in texts
        return lambda v: text(v) in texts or number(v) in numbers


def item_problems(operand: list[object]) -> list[tuple[int, str]]:
    """(index, message) for each item of an ``in`` list that is not text or a number."""
    return [
        (i, f"expected text or a number, {found_value(item)}")
        for i, item in enumerate(operand)
        if not _is_text_or_number(item)
    ]


#: Every operator by name; an unknown name is a validation error.
OPERATORS: Final[dict[str, Operator]] = {
    op.name: op
    for op in (
        Regexp(),
        Contains(),
        Equal(),
        NotEqual(),
        Less(),
        Greater(),
        Approx(),
        Exists(),
        NotExists(),
        In(),
    )
}

#: The operator of a condition that gives only a ``value``.
DEFAULT_OPERATOR: Final = "regexp"
#: ``approx``'s tolerance when none is given (absolute, in the attribute's unit).
DEFAULT_TOLERANCE: Final = 0.001
