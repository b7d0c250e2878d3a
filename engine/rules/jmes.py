"""JMESPath conditions: the escape hatch over the instance's DICOM JSON model (PS3.18 F.2).

The model is computed once per instance, and only when such a condition is evaluated
(:meth:`RuleInput.json_model`). Rules using one are never memoised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jmespath

from engine.rules.instance import RuleInput
from engine.rules.nodes import ConditionTrace, Env, Fast, Reader, ValueTest
from engine.rules.operators import Operator
from engine.rules.values import Opaque, Value, normalise

__all__ = ["JmesTest", "Truthy", "compile_jmespath"]


def _truthy(result: object) -> bool:
    """JMESPath truth: false, null and empty text, lists and objects are false."""
    return not (result is None or result is False or result in ("", [], {}))


def _json_value(result: object) -> Value | None:
    if result is None:
        return None
    if isinstance(result, dict):
        return Opaque("JSON object")
    if isinstance(result, list):
        return normalise(
            [Opaque("JSON") if isinstance(x, dict | list) else x for x in result], True
        )
    return normalise([result], False)


@dataclass
class JmesTest(ValueTest):
    """``jmespath`` (+ optional ``op`` / ``value``) over the instance's DICOM JSON model."""

    expression: str = ""
    compiled: Any = None  # jmespath.parser.ParsedResult

    def _search(self, inp: RuleInput) -> object:
        """The expression's result; None when there is no model or the expression fails on
        this instance (``length(null)``, say): a missing value, like a missing attribute."""
        model = inp.json_model()
        if model is None:
            return None
        try:
            return self.compiled.search(model)
        except jmespath.exceptions.JMESPathError:
            return None

    def cache_key(self) -> object:
        return ("jmespath", self.expression)

    def uncached(self) -> Reader:
        def read(inp: RuleInput) -> tuple[Value, ...]:
            value = _json_value(self._search(inp))
            return () if value is None else (value,)

        return read

    def build(self, index: Mapping[str, int]) -> Fast:
        if self.op.name != "truthy":
            return super().build(index)
        negate, key = self.negate, ("jmespath?", self.expression)

        def fast(env: Env) -> bool:
            found = env.inp.values.get(key)
            if found is None:
                found = env.inp.values[key] = (_truthy(self._search(env.inp)),)
            return found[0] is not negate

        return fast

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        if self.op.name != "truthy":
            return super().trace(env, index)
        result = self._search(env.inp)
        shown = "(no JSON model)" if env.inp.json_model() is None else repr(result)
        return ConditionTrace(self.where, self._what(), shown, _truthy(result) != self.negate)

    def describe(self) -> str:
        if self.op.name == "truthy":
            return f"jmespath {self.expression!r}"
        return f"jmespath {self.expression!r} {self.op.name}{self._operand()}"


class Truthy(Operator):
    """Placeholder operator of a JMESPath condition without ``op``: the result is true."""

    name = "truthy"
    doc = "JMESPath result is not null, false or empty"


def compile_jmespath(expression: str) -> tuple[Any, str | None]:
    """(compiled expression, None), or (None, what is wrong with it)."""
    try:
        return jmespath.compile(expression), None
    except jmespath.exceptions.JMESPathError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = first.split(": ", 1)[-1].rstrip(":")  # drop jmespath's "Invalid ... expression: "
        position = getattr(exc, "lex_position", None)
        where = f" at position {position + 1}" if isinstance(position, int) else ""
        return None, f"invalid JMESPath expression: {what}{where}"
