"""How rule sets are evaluated fast, with the same answers as evaluating every rule.

- Memo: the labelled rules' results are a pure function of the values of every attribute they
  read (and of the summary fields they name), so they are remembered under the fingerprints
  of those values (:meth:`RuleInput.fingerprints_of`: the raw bytes of elements not yet
  decoded, never decoding them). An instance whose values were seen before (the next slice
  of a series) costs a key lookup. Rules using JMESPath read the whole dataset: they are
  evaluated every time instead.
- Shared memo: a rule other rules refer to, testing several attributes, remembers its own
  result by what it reads, so a project's study-level ``match`` is evaluated once per study.
- Index: on a memo miss, a rule needing ``attr == text`` or ``attr in [texts]`` (itself or
  through the rules it refers to) is only tried when the instance has one of those texts;
  one set intersection per such attribute leaves the candidates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final, Protocol

from engine.rules.attributes import AttrPath
from engine.rules.compiler import Rule
from engine.rules.instance import RuleInput
from engine.rules.nodes import AttrTest, Env, Fast, Reader, RuleRef, cached
from engine.rules.values import NOT_MEMOISABLE, LookupTag, text

__all__ = ["MEMO_SIZE", "SHARED_MEMO_TESTS", "Evaluator", "Hits", "collect_reads", "memoised"]

#: Memo entries kept per rule set (or group); the oldest goes first when full.
MEMO_SIZE: Final = 65536
#: A shared rule testing at least this many attributes (with its references) gets its own memo.
SHARED_MEMO_TESTS: Final = 4
_CHARSET: Final = LookupTag(0x00080005)


class RuleSetLike(Protocol):
    """What the evaluator reads of a :class:`engine.rules.ruleset.RuleSet` (which builds on
    this module): its rules, their index by name, their compiled conditions, the positions of
    labelled rules and of the dynamic ones."""

    @property
    def rules(self) -> tuple[Rule, ...]: ...

    @property
    def entries(self) -> tuple[int, ...]: ...

    @property
    def dynamic(self) -> frozenset[int]: ...

    @property
    def index(self) -> dict[str, int]: ...

    @property
    def fns(self) -> list[Fast]: ...


Hits = tuple[frozenset[int], ...]
_NONE: Final[frozenset[int]] = frozenset()

_SAME_READS: dict[tuple[object, ...], tuple[object, ...]] = {}


def memoised(fn: Fast, tags: tuple[int, ...], fields: tuple[str, ...]) -> Fast:
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


def collect_reads(rule: Rule, tags: set[int], fields: set[str]) -> int:
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


#: What a rule needs to hold: attribute key -> (the attribute, the texts it may have).
Requirements = dict[object, tuple[AttrPath, frozenset[str]]]
Index = tuple[tuple[Reader, dict[str, frozenset[int]], frozenset[int]], ...]


def _requirements(ruleset: RuleSetLike, index: int, memo: dict[int, Requirements]) -> Requirements:
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

    def __init__(self, members: Sequence[RuleSetLike]) -> None:
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
                    collect_reads(rule, tags, fields)
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
        hits: list[list[int] | None] = [None] * len(self.members)
        entries, members = self.entries, self.members
        for e in self.candidates(inp):  # any order: every rule is a pure function
            m, i = entries[e]
            env = envs[m]
            if env is None:
                env = envs[m] = Env(inp, members[m].fns)
            results = env.results
            held = results.get(i)
            if held is None:
                held = results[i] = env.fns[i](env)
            if held:
                found = hits[m]
                if found is None:
                    found = hits[m] = []
                found.append(i)
        return tuple([_NONE if h is None else frozenset(h) for h in hits])

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
