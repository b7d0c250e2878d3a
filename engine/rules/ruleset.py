"""Compiled rule sets: classify, match and explain instances.

Speed comes from techniques that keep the semantics exact:

- rules are compiled once into closures; each attribute is read once per instance;
  conditions stop at the first deciding one; a referenced rule is evaluated once per instance;
- results are memoised by the values of every attribute the rules read: the result is a
  pure function of those values (and of the summary fields named), so an instance whose values
  were seen before (the next slice of a series) costs a key lookup. Keys use the raw bytes of
  elements not yet decoded, never decoding them; rules using JMESPath read the whole dataset,
  so they are evaluated every time instead;
- on a memo miss, rules whose conditions include ``attr == text`` or ``attr in [texts]`` are
  looked up by that attribute's text in one dict instead of being tried one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from pydicom.dataset import Dataset

from engine.rules.attributes import AttrPath
from engine.rules.compiler import Rule
from engine.rules.instance import RuleInput
from engine.rules.nodes import (
    AttrTest,
    ConditionTrace,
    Env,
    Fast,
    JmesTest,
    Reader,
    RuleRef,
    cached,
)
from engine.rules.series import SeriesLabels
from engine.rules.values import NOT_MEMOISABLE, LookupTag, text

__all__ = ["MEMO_SIZE", "SHARED_MEMO_TESTS", "RuleSet", "RuleSetGroup", "RuleTrace"]

#: Memo entries kept per rule set (or group); the oldest goes first when full.
MEMO_SIZE: Final = 65536
#: A shared rule testing at least this many attributes (with its references) gets its own memo.
SHARED_MEMO_TESTS: Final = 4
_CHARSET: Final = LookupTag(0x00080005)

Hits = tuple[frozenset[int], ...]


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


_SAME_READS: dict[tuple[object, ...], tuple[object, ...]] = {}


def _memoised(fn: Fast, tags: tuple[int, ...], fields: tuple[str, ...]) -> Fast:
    """``fn`` remembering its result by the fingerprints of ``tags`` and ``fields``.

    Rules reading the same attributes (every project's ``match``, say) share one key per
    instance, built once: the instance keeps it under the (interned) tuple of what is read.
    """
    memo: dict[object, bool] = {}
    reads = _SAME_READS.setdefault((tags, fields), (tags, fields))

    def rule(env: Env) -> bool:
        inp = env.inp
        key = inp.results.get(reads)
        if key is None:
            key = inp.fingerprints_of(tags)
            if key is not None and fields:
                key = (key, tuple([inp.summary.get(f) for f in fields]))
            inp.results[reads] = key if key is not None else NOT_MEMOISABLE
        if key is NOT_MEMOISABLE:
            return fn(env)
        found = memo.get(key)
        if found is None:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            found = memo[key] = fn(env)
        return found

    return rule


def _collect_reads(rule: Rule, tags: set[int], fields: set[str]) -> int:
    """Add the top-level tags (private creators included) and summary fields ``rule`` reads
    itself; return how many attribute tests it has."""
    tests = 0
    for node in rule.nodes():
        if not isinstance(node, AttrTest):
            continue
        tests += 1
        top = node.attr.top_tag
        if top is None:
            fields.add(node.attr.summary or "")
            continue
        tags.add(top)
        if top >> 16 & 1 and top & 0xFFFF >= 0x1000:  # a private tag: its creator too
            tags.add(LookupTag((top & 0xFFFF0000) | (top & 0xFFFF) >> 8))
    return tests


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
            tests += _collect_reads(rule, tags, fields)
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
                self.fns[i] = _memoised(self.fns[i], tuple(sorted(tags)), tuple(sorted(fields)))

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


#: What a rule needs to hold: attribute key -> (the attribute, the texts it may have).
Requirements = dict[object, tuple[AttrPath, frozenset[str]]]
Index = tuple[tuple[Reader, dict[str, frozenset[int]], frozenset[int]], ...]


def _requirements(ruleset: RuleSet, index: int, memo: dict[int, Requirements]) -> Requirements:
    """What rule ``index`` needs to hold, from its top-level ``attr == text`` and
    ``attr in [texts]`` conditions (not negated, no ``[*]``) and, through top-level ``rule:``
    references, from the rules it needs in turn.

    An instance whose text for such an attribute is not among the allowed texts cannot satisfy
    the rule (``==`` and ``in`` with text operands are exactly this match), so the rule need not
    be tried. References are acyclic (checked at load), so the recursion ends.
    """
    if index in memo:
        return memo[index]
    out: Requirements = {}

    def need(attr: AttrPath, texts: frozenset[str]) -> None:
        if attr.key in out:
            texts = out[attr.key][1] & texts
        out[attr.key] = (attr, texts)

    for node in ruleset.rules[index].conditions:
        if isinstance(node, RuleRef) and not node.negate:
            for attr, texts in _requirements(ruleset, ruleset.index[node.name], memo).values():
                need(attr, texts)
        elif isinstance(node, AttrTest) and not node.negate and not node.attr.many:
            operands = node.operand if isinstance(node.operand, list) else [node.operand]
            if node.op.name in ("==", "in") and all(isinstance(x, str) for x in operands):
                need(node.attr, frozenset(operands))
    memo[index] = out
    return out


class Evaluator:
    """Evaluates the labelled rules of one or more rule sets on an instance: memo, index."""

    def __init__(self, members: Sequence[RuleSet]) -> None:
        self.members = tuple(members)
        self.memo: dict[object, Hits] = {}
        #: every labelled rule that is not dynamic, as (member, rule position)
        self.entries: list[tuple[int, int]] = []
        self.dynamic: list[tuple[int, int]] = []
        tags: set[int] = {_CHARSET}
        fields: set[str] = set()
        needs: list[Requirements] = []
        for m, member in enumerate(self.members):
            memo: dict[int, Requirements] = {}
            for i, rule in enumerate(member.rules):
                if i not in member.dynamic:
                    _collect_reads(rule, tags, fields)
            for i in member.entries:
                if i in member.dynamic:
                    self.dynamic.append((m, i))
                else:
                    self.entries.append((m, i))
                    needs.append(_requirements(member, i, memo))
        self.tags = tuple(sorted(tags))
        self.fields = tuple(sorted(fields))
        self.everything = frozenset(range(len(self.entries)))
        self.index = self._index(needs)

    def _index(self, needs: list[Requirements]) -> Index:
        """Per required attribute: (reader, text -> entries allowed, entries free of it).

        An entry is allowed for a text when it needs that text or does not constrain the
        attribute, so one set intersection per attribute leaves the candidates.
        """
        attrs: dict[object, AttrPath] = {}
        for need in needs:
            for key, (attr, _) in need.items():
                attrs.setdefault(key, attr)
        out = []
        for key, attr in attrs.items():
            free = frozenset(e for e, need in enumerate(needs) if key not in need)
            allowed: dict[str, set[int]] = {}
            for e, need in enumerate(needs):
                for t in need[key][1] if key in need else ():
                    allowed.setdefault(t, set()).add(e)
            table = {t: frozenset(es) | free for t, es in allowed.items()}
            out.append((cached(key, attr.read), table, free))
        mean = [sum(map(len, t.values())) / max(1, len(t)) + len(f) for _, t, f in out]
        return tuple(entry for _, entry in sorted(zip(mean, out, strict=True), key=lambda x: x[0]))

    def key(self, inp: RuleInput) -> object | None:
        """The memo key: fingerprints of every tag read and the summary fields (None: none)."""
        parts = inp.fingerprints_of(self.tags)
        if parts is None or not self.fields:
            return parts
        summary = inp.summary
        return parts, tuple([summary.get(f) for f in self.fields])

    def evaluate(self, inp: RuleInput) -> Hits:
        """Per member, the positions of its labelled rules that hold for ``inp``."""
        done: Hits | None = inp.results.get(self)
        if done is not None:
            return done
        key = self.key(inp)
        hits = None if key is None else self.memo.get(key)
        envs: list[Env | None] = [None] * len(self.members)
        if hits is None:
            hits = self._run(inp, envs)
            if key is not None:
                self._remember(key, hits)
        if self.dynamic:
            hits = self._add_dynamic(inp, envs, hits)
        inp.results[self] = hits
        return hits

    def _env(self, inp: RuleInput, envs: list[Env | None], m: int) -> Env:
        env = envs[m]
        if env is None:
            env = envs[m] = Env(inp, self.members[m].fns)
        return env

    def candidates(self, inp: RuleInput) -> frozenset[int]:
        """Entries whose required texts the instance has (the others cannot hold)."""
        found = self.everything
        for read, table, free in self.index:  # most selective first: the sets shrink fast
            values = read(inp)
            value = text(values[0]) if values else None
            allowed = free if value is None else table.get(value, free)
            found = allowed if found is self.everything else found & allowed
            if not found:
                break
        return found

    def _run(self, inp: RuleInput, envs: list[Env | None]) -> Hits:
        hits: list[list[int]] = [[] for _ in self.members]
        entries = self.entries
        for e in sorted(self.candidates(inp)):
            m, i = entries[e]
            if self._env(inp, envs, m).rule(i):
                hits[m].append(i)
        return tuple(frozenset(h) for h in hits)

    def _add_dynamic(self, inp: RuleInput, envs: list[Env | None], hits: Hits) -> Hits:
        extra: list[set[int]] = [set() for _ in self.members]
        for m, i in self.dynamic:
            if self._env(inp, envs, m).rule(i):
                extra[m].add(i)
        return tuple(h | e if e else h for h, e in zip(hits, extra, strict=True))

    def _remember(self, key: object, hits: Hits) -> None:
        memo = self.memo
        if len(memo) >= MEMO_SIZE:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread
                del memo[next(iter(memo))]
        memo[key] = hits


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
