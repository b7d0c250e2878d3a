"""Compiled rule sets: classify, match and explain instances.

Rules are compiled once into closures: each attribute is read once per instance, conditions
stop at the first deciding one, a referenced rule is evaluated once per instance. The memo and
the index that make repeated evaluation cheap are in :mod:`engine.rules.evaluator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pydicom.dataset import Dataset

from engine.rules.compiler import Rule
from engine.rules.evaluator import (
    MEMO_SIZE,
    SHARED_MEMO_TESTS,
    Evaluator,
    Hits,
    collect_reads,
    memoised,
)
from engine.rules.instance import RuleInput
from engine.rules.jmes import JmesTest
from engine.rules.nodes import ConditionTrace, Env, Fast
from engine.rules.series import SeriesLabels
from engine.rules.values import LookupTag

__all__ = ["RuleSet", "RuleSetGroup", "RuleTrace", "as_input"]

_CHARSET = LookupTag(0x00080005)


@dataclass(frozen=True)
class RuleTrace:
    """One rule evaluated on one instance, condition by condition (``RuleSet.explain``)."""

    name: str
    label: str | None
    series_level: bool
    result: bool
    conditions: tuple[ConditionTrace, ...]

    def lines(self) -> list[str]:
        """The trace as text for the operator's terminal; it shows header values, so it is
        for the local operator only and never goes to a log."""
        produces = "internal" if self.label is None else f"label {self.label}"
        if self.series_level:
            produces += ", series level"
        out = [f"rule {self.name} ({produces}): {'yes' if self.result else 'no'}"]
        for condition in self.conditions:
            out += condition.lines()
        return out


def as_input(instance: RuleInput | Dataset) -> RuleInput:
    """``instance`` as a RuleInput (a bare Dataset gets an empty summary)."""
    return instance if isinstance(instance, RuleInput) else RuleInput(instance)


def _conjunction(fns: Sequence[Fast]) -> Fast:
    if len(fns) == 1:
        return fns[0]

    def rule(env: Env) -> bool:
        for fn in fns:  # noqa: SIM110 (a loop is faster than all() over a generator)
            if not fn(env):
                return False
        return True

    return rule


class RuleSet:
    """Checked, linked rules compiled for evaluation. Build with :func:`compile_rules`,
    :func:`load_ruleset` or :func:`load_rulesets`, which report problems as ConfigIssues."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.index: dict[str, int] = {r.name: i for i, r in enumerate(self.rules)}
        self.fns: list[Fast] = [
            _conjunction([c.build(self.index) for c in r.conditions]) for r in self.rules
        ]
        #: Rules that produce a label, by position.
        self.entries: tuple[int, ...] = tuple(
            i for i, r in enumerate(self.rules) if r.label is not None
        )
        self.dynamic: frozenset[int] = self._dynamic()
        self._memoise_shared()
        self.labels: frozenset[str] = frozenset(r.label for r in self.rules if r.label)
        self.series_level_labels: frozenset[str] = frozenset(
            r.label for r in self.rules if r.label and r.series_level
        )
        self.sources: tuple[Path, ...] = tuple(dict.fromkeys(r.source.file for r in self.rules))
        self._evaluator = Evaluator([self])
        #: The top-level tags :meth:`classify` reads (private creators and (0008,0005)
        #: included), or None when a rule reads the whole header (JMESPath): a dataset holding
        #: only these elements is classified as the whole header is.
        self.header_tags: frozenset[int] | None = (
            None if self.dynamic else frozenset(self._evaluator.tags)
        )
        self._labels: dict[frozenset[int], frozenset[str]] = {}
        self._names: dict[frozenset[int], frozenset[str]] = {}

    def _dynamic(self) -> frozenset[int]:
        """Rules using JMESPath, directly or through references."""
        dynamic = {
            i for i, r in enumerate(self.rules) if any(isinstance(n, JmesTest) for n in r.nodes())
        }
        refs = [{self.index[ref.name] for ref in r.refs()} for r in self.rules]
        changed = True
        while changed:
            grown = {i for i, targets in enumerate(refs) if targets & dynamic}
            changed = not grown <= dynamic
            dynamic |= grown
        return frozenset(dynamic)

    def _reads(self, index: int) -> tuple[set[int], set[str], int]:
        """(tags, summary fields, number of attribute tests) rule ``index`` depends on,
        through its references too."""
        tags: set[int] = {_CHARSET}
        fields: set[str] = set()
        tests, seen, todo = 0, {index}, [index]
        while todo:
            rule = self.rules[todo.pop()]
            tests += collect_reads(rule, tags, fields)
            for ref in rule.refs():
                target = self.index[ref.name]
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return tags, fields, tests

    def _memoise_shared(self) -> None:
        """Give each shared rule (one others refer to) that tests several attributes a memo of
        its own, keyed by the values it depends on: a project's study-level ``match`` rule is
        then evaluated once per study, not once per series."""
        shared = {self.index[ref.name] for rule in self.rules for ref in rule.refs()}
        for i in sorted(shared - self.dynamic):
            tags, fields, tests = self._reads(i)
            if tests >= SHARED_MEMO_TESTS:
                self.fns[i] = memoised(self.fns[i], tuple(sorted(tags)), tuple(sorted(fields)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def _hits(self, instance: RuleInput | Dataset) -> frozenset[int]:
        return self._evaluator.evaluate(as_input(instance))[0]

    def classify(self, instance: RuleInput | Dataset) -> frozenset[str]:
        """The labels of the instance: those of every non-internal rule that holds."""
        hits = self._hits(instance)
        found = self._labels.get(hits)
        if found is None:
            found = self._labels[hits] = frozenset(self.rules[i].label or "" for i in hits)
        return found

    def matching(self, instance: RuleInput | Dataset) -> frozenset[str]:
        """The names of the non-internal rules that hold."""
        return self.names_of(self._hits(instance))

    def names_of(self, hits: frozenset[int]) -> frozenset[str]:
        """Rule names for rule positions (as an :class:`Evaluator` returns them)."""
        found = self._names.get(hits)
        if found is None:
            found = self._names[hits] = frozenset(self.rules[i].name for i in hits)
        return found

    def matches(self, rule_name: str, instance: RuleInput | Dataset) -> bool:
        """Whether rule ``rule_name`` holds (KeyError when there is no such rule)."""
        index = self.index[rule_name]
        if self.rules[index].label is not None:
            return index in self._hits(instance)
        return Env(as_input(instance), self.fns).rule(index)

    def explain(self, instance: RuleInput | Dataset) -> list[RuleTrace]:
        """Every rule, each condition with the value it saw and its result (no short cuts).

        The traces hold header values: show them to the local operator, never log them.
        """
        env = Env(as_input(instance), self.fns)
        out = []
        for rule in self.rules:
            traces = tuple(c.trace(env, self.index) for c in rule.conditions)
            result = all(t.result for t in traces)
            out.append(RuleTrace(rule.name, rule.label, rule.series_level, result, traces))
        return out

    def series_labels(self) -> SeriesLabels:
        """A new accumulator for one series, knowing which labels are series-level."""
        return SeriesLabels(self.series_level_labels)


class RuleSetGroup:
    """Several rule sets evaluated together (one per project, say): one memo key and one
    index over all their rules, where asking each rule set in turn would pay per set."""

    def __init__(self, members: Mapping[str, RuleSet]) -> None:
        self.names: tuple[str, ...] = tuple(members)
        self.members: tuple[RuleSet, ...] = tuple(members.values())
        self._evaluator = Evaluator(self.members)
        self._results: dict[Hits, Mapping[str, frozenset[str]]] = {}

    def matching(self, instance: RuleInput | Dataset) -> Mapping[str, frozenset[str]]:
        """For each member, the names of its non-internal rules that hold (read-only)."""
        hits = self._evaluator.evaluate(as_input(instance))
        found = self._results.get(hits)
        if found is None:
            if len(self._results) >= MEMO_SIZE:
                self._results.clear()
            found = self._results[hits] = MappingProxyType(
                {
                    name: member.names_of(h)
                    for name, member, h in zip(self.names, self.members, hits, strict=True)
                }
            )
        return found
