"""Compiled conditions: each node builds a fast closure once, and can explain itself.

A closure takes an :class:`Env` (one instance evaluated against one rule set) and returns a
bool. Values are read through the instance's cache, so each attribute is read once per
instance however many conditions name it; groups stop at the first deciding child.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.rules.attributes import AttrPath
from engine.rules.instance import RuleInput
from engine.rules.operators import Operator, Test
from engine.rules.values import Value, show

__all__ = [
    "AttrTest",
    "ConditionTrace",
    "Env",
    "Fast",
    "Group",
    "Node",
    "Not",
    "Reader",
    "RuleRef",
    "ValueTest",
    "cached",
]

Fast = Callable[["Env"], bool]
Reader = Callable[[RuleInput], tuple[Value, ...]]


class Env:
    """One instance evaluated against one rule set: rule results computed at most once."""

    __slots__ = ("fns", "inp", "results")

    def __init__(self, inp: RuleInput, fns: Sequence[Fast]) -> None:
        self.inp = inp
        self.fns = fns
        self.results: dict[int, bool] = {}

    def rule(self, index: int) -> bool:
        """Whether rule ``index`` holds (evaluated on first use)."""
        found = self.results.get(index)
        if found is None:
            found = self.results[index] = self.fns[index](self)
        return found


@dataclass(frozen=True)
class ConditionTrace:
    """One condition as evaluated: where it is, what it tests, the value seen, the result."""

    where: str
    what: str
    seen: str | None
    result: bool
    children: tuple[ConditionTrace, ...] = ()

    def lines(self, indent: str = "  ") -> list[str]:
        seen = "" if self.seen is None else f" (saw {self.seen})"
        out = [f"{indent}{self.where}: {self.what}{seen} -> {'yes' if self.result else 'no'}"]
        for child in self.children:
            out += child.lines(indent + "  ")
        return out


def cached(key: object, read: Reader) -> Reader:
    """``read`` through the instance's value cache under ``key``."""

    def get(inp: RuleInput) -> tuple[Value, ...]:
        values = inp.values
        try:
            return values[key]
        except KeyError:
            found = values[key] = read(inp)
            return found

    return get


def _seen(candidates: tuple[Value, ...], many: bool) -> str:
    if not candidates:
        return "(missing)"
    if many:
        return "any of " + ", ".join(show(c) for c in candidates)
    return show(candidates[0])


@dataclass
class Node:
    """A condition; ``where`` is its place in the rule (``conditions[1].any[0]``)."""

    where: str
    negate: bool

    def build(self, index: Mapping[str, int]) -> Fast:
        """The fast closure; ``index`` maps rule names to their position."""
        raise NotImplementedError

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        """Evaluate without stopping early, recording every value seen."""
        raise NotImplementedError

    def describe(self) -> str:
        """The condition in a few words, for ``explain``."""
        raise NotImplementedError

    def walk(self) -> Iterator[Node]:
        """This node and every node below it."""
        yield self

    def _what(self) -> str:
        return ("not " if self.negate else "") + self.describe()


@dataclass
class ValueTest(Node):
    """Shared by attribute and JMESPath tests: read candidates, apply the operator."""

    op: Operator
    operand: Any
    tolerance: float

    def cache_key(self) -> object:
        """Key of the values read in the instance's value cache."""
        raise NotImplementedError

    def uncached(self) -> Reader:
        """Read the candidate values (without the cache)."""
        raise NotImplementedError

    def reader(self) -> Reader:
        return cached(self.cache_key(), self.uncached())

    def many(self) -> bool:
        return False

    def _test(self) -> Test:
        return self.op.build(self.operand, self.tolerance)

    def build(self, index: Mapping[str, int]) -> Fast:
        get, negate = self.reader(), self.negate
        if not self.op.takes_value:
            absent = (self.op.name == "not_exists") is not negate  # true when absence holds
            return lambda env: (len(get(env.inp)) > 0) is not absent
        test = self._test()
        if self.many():
            return lambda env: any(map(test, get(env.inp))) is not negate
        key, read = self.cache_key(), self.uncached()

        def one(env: Env) -> bool:  # the hot path: the value cache inlined
            values = env.inp.values
            try:
                found = values[key]
            except KeyError:
                found = values[key] = read(env.inp)
            return (len(found) > 0 and test(found[0])) is not negate

        return one

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        found = self.reader()(env.inp)
        if not self.op.takes_value:
            result = (len(found) > 0) == (self.op.name == "exists")
        else:
            result = any(map(self._test(), found))
        return ConditionTrace(
            self.where, self._what(), _seen(found, self.many()), result != self.negate
        )

    def _operand(self) -> str:
        if not self.op.takes_value:
            return ""
        items = self.operand if isinstance(self.operand, list) else [self.operand]
        shown = ", ".join(f"'{x}'" if isinstance(x, str) else str(x) for x in items)
        if isinstance(self.operand, list):
            shown = f"[{shown}]"
        tolerance = f" ± {self.tolerance:g}" if self.op.name == "approx" else ""
        return f" {shown}{tolerance}"


@dataclass
class AttrTest(ValueTest):
    """``attr`` + ``op`` + ``value``."""

    attr: AttrPath = field(default_factory=lambda: AttrPath(""))

    def cache_key(self) -> object:
        return self.attr.key

    def uncached(self) -> Reader:
        return self.attr.read

    def many(self) -> bool:
        return self.attr.many

    def describe(self) -> str:
        return f"{self.attr.text} {self.op.name}{self._operand()}"


@dataclass
class Group(Node):
    """``any`` / ``all`` of a list of conditions."""

    kind: str = "all"
    children: tuple[Node, ...] = ()

    def build(self, index: Mapping[str, int]) -> Fast:
        fns, negate = tuple(c.build(index) for c in self.children), self.negate
        if self.kind == "any":

            def any_(env: Env) -> bool:
                for fn in fns:
                    if fn(env):
                        return not negate
                return negate

            return any_

        def all_(env: Env) -> bool:
            for fn in fns:
                if not fn(env):
                    return negate
            return not negate

        return all_

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        children = tuple(c.trace(env, index) for c in self.children)
        results = [c.result for c in children]
        result = any(results) if self.kind == "any" else all(results)
        return ConditionTrace(self.where, self._what(), None, result != self.negate, children)

    def describe(self) -> str:
        return f"{self.kind} of {len(self.children)}"

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Not(Node):
    """``not``: the one condition below does not hold."""

    child: Node | None = None

    def build(self, index: Mapping[str, int]) -> Fast:
        assert self.child is not None
        fn, negate = self.child.build(index), self.negate
        return lambda env: fn(env) is negate

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        assert self.child is not None
        child = self.child.trace(env, index)
        return ConditionTrace(self.where, self._what(), None, child.result == self.negate, (child,))

    def describe(self) -> str:
        return "not"

    def walk(self) -> Iterator[Node]:
        yield self
        if self.child is not None:
            yield from self.child.walk()


@dataclass
class RuleRef(Node):
    """``rule: NAME`` (or ``not_rule: NAME``, stored as negate)."""

    name: str = ""
    #: JSON path of the reference in its rules mapping, for messages.
    path: tuple[str | int, ...] = ()
    #: The key it was written with: rule or not_rule.
    keyword: str = "rule"

    def build(self, index: Mapping[str, int]) -> Fast:
        target, negate = index[self.name], self.negate

        def ref(env: Env) -> bool:  # Env.rule inlined: references are frequent
            results = env.results
            found = results.get(target)
            if found is None:
                found = results[target] = env.fns[target](env)
            return found is not negate

        return ref

    def trace(self, env: Env, index: Mapping[str, int]) -> ConditionTrace:
        result = env.rule(index[self.name]) != self.negate
        return ConditionTrace(self.where, self._what(), None, result)

    def describe(self) -> str:
        return f"rule {self.name}"
