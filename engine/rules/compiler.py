"""From rule data (a parsed YAML/JSON mapping) to checked rules, collecting every problem.

Layers, as for site and project files: the JSON Schema (``schemas/ruleset.schema.json``) for
shape, then the checks it cannot express: one kind per condition, attribute names and syntax,
operators and their operands, regular expressions, JMESPath expressions, rule references
(dangling, cyclic) and labels. Each problem is a :class:`ConfigIssue` with file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.files import nearest_line
from engine.config.issues import ConfigIssue, JsonPath, did_you_mean, format_path, norm_path
from engine.config.schema import load_schema
from engine.config.schema import schema_issues as config_schema_issues
from engine.rules.attributes import AttrPath, parse_attr
from engine.rules.jmes import JmesTest, Truthy
from engine.rules.jmes import compile_jmespath as _compile_jmespath
from engine.rules.nodes import AttrTest, Group, Node, Not, RuleRef
from engine.rules.operators import (
    DEFAULT_OPERATOR,
    DEFAULT_TOLERANCE,
    OPERATORS,
    Operator,
    item_problems,
)

__all__ = [
    "CONDITION_KEYS",
    "KINDS",
    "Rule",
    "Source",
    "check_rules",
    "close_match",
    "schema_issues",
]

#: The keys that give a condition its kind; a condition has exactly one.
KINDS = ("attr", "jmespath", "any", "all", "not", "rule", "not_rule")
#: Every key a condition may have (the schema's list).
CONDITION_KEYS = (*KINDS, "op", "value", "tolerance", "negate", "description")
#: VRs holding text only: numbers are not compared with them.
TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT"})


@dataclass(frozen=True)
class Source:
    """Where a rules mapping is: its file, its JSON path in the file, the line of each path."""

    file: Path
    base: JsonPath = ()
    lines: Mapping[JsonPath, int] = field(default_factory=dict)

    def line_of(self, path: Iterable[object]) -> int | None:
        """Line of ``path`` (relative to the rules mapping), else of its nearest parent."""
        return self.line_at((*self.base, *path))

    def line_at(self, path: Iterable[object]) -> int | None:
        """Line of ``path`` (from the file's root), else of its nearest parent."""
        return nearest_line(self.lines, path)

    def issue(self, path: Iterable[object], message: str) -> ConfigIssue:
        where = norm_path(path)
        return ConfigIssue(
            self.file, self.line_of(where), format_path((*self.base, *where)), message
        )


@dataclass(frozen=True)
class Rule:
    """One checked rule. ``label`` is None for internal rules."""

    name: str
    label: str | None
    series_level: bool
    description: str
    conditions: tuple[Node, ...]
    source: Source

    def nodes(self) -> Iterable[Node]:
        for condition in self.conditions:
            yield from condition.walk()

    def refs(self) -> list[RuleRef]:
        return [n for n in self.nodes() if isinstance(n, RuleRef)]


#: `` (did you mean 'x'?)`` or '' (the one wording of engine.config.issues).
close_match = did_you_mean


def _has_number(operand: object) -> bool:
    items = operand if isinstance(operand, list) else [operand]
    return any(isinstance(x, int | float) and not isinstance(x, bool) for x in items)


class _Checker:
    """Checks one rules mapping and builds its nodes, recording issues on the way."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.issues: list[ConfigIssue] = []

    def add(self, path: JsonPath, message: str) -> None:
        self.issues.append(self.source.issue(path, message))

    def rule(self, name: str, body: object) -> Rule:
        """The rule (with no conditions when they are malformed: its name still counts)."""
        if not isinstance(body, dict):
            body = {}  # the schema says what it expected
        path: JsonPath = (name,)
        internal = body.get("internal") is True
        series_level = body.get("series_level") is True
        label = body.get("label")
        if internal and label:
            self.add(
                (*path, "label"), "an internal rule produces no label: remove 'label' or 'internal'"
            )
        if internal and series_level:
            message = "an internal rule produces no label, so 'series_level' does not apply"
            self.add((*path, "series_level"), message)
        conditions = body.get("conditions")
        if not isinstance(conditions, list):
            conditions = []
        nodes = [self.condition(c, (*path, "conditions", i)) for i, c in enumerate(conditions)]
        description = body.get("description")
        return Rule(
            name=name,
            label=None if internal else (label if isinstance(label, str) and label else name),
            series_level=series_level and not internal,
            description=description if isinstance(description, str) else "",
            conditions=tuple(n for n in nodes if n is not None),
            source=self.source,
        )

    def condition(self, cond: object, path: JsonPath) -> Node | None:
        if not isinstance(cond, dict):
            return None
        where = format_path(path[1:])
        negate = cond.get("negate") is True
        kinds = [k for k in KINDS if k in cond]
        if len(kinds) > 1:
            found = " and ".join(f"'{k}'" for k in kinds)
            self.add(path, f"a condition has exactly one of {', '.join(KINDS)}; found {found}")
            return None
        if not kinds:
            if all(k in CONDITION_KEYS for k in cond):  # else the schema named the stray key
                self.add(path, f"a condition needs one of {', '.join(KINDS)}")
            return None
        kind = kinds[0]
        if kind not in ("attr", "jmespath"):
            for key in ("op", "value", "tolerance"):
                if key in cond:
                    self.add((*path, key), f"'{key}' applies only to attr and jmespath conditions")
        target = cond[kind]
        if kind in ("any", "all"):
            if not isinstance(target, list):
                return None
            children = [self.condition(c, (*path, kind, i)) for i, c in enumerate(target)]
            if None in children:
                return None
            return Group(where, negate, kind, tuple(c for c in children if c is not None))
        if kind == "not":
            child = self.condition(target, (*path, "not"))
            return None if child is None else Not(where, negate, child)
        if not isinstance(target, str):
            return None
        if kind in ("rule", "not_rule"):
            return RuleRef(where, negate != (kind == "not_rule"), target, path, kind)
        if kind == "jmespath":
            return self._jmespath(cond, path, where, negate, target)
        return self._attr(cond, path, where, negate, target)

    def _operator(self, cond: dict[str, Any], path: JsonPath, jmes: bool) -> Operator | None:
        """The checked operator of an attr/jmespath condition (operand checked too)."""
        name = cond.get("op")
        has_value = "value" in cond
        if name is None:
            if jmes and not has_value:
                return Truthy()
            if not has_value:
                if all(k in CONDITION_KEYS for k in cond):
                    message = (
                        "give a 'value' (a regular expression, the default operator) or an 'op'"
                    )
                    self.add(path, message)
                return None
            name = DEFAULT_OPERATOR
        if not isinstance(name, str):
            return None
        op = OPERATORS.get(name)
        if op is None:
            known = ", ".join(OPERATORS)
            self.add(
                (*path, "op"),
                f"unknown operator '{name}'{close_match(name, OPERATORS)}; operators: {known}",
            )
            return None
        ok = True
        if not op.takes_value:
            if has_value:
                self.add((*path, "value"), f"operator '{op.name}' takes no 'value'")
                ok = False
        elif not has_value:
            self.add(path, f"operator '{op.name}' needs a 'value'")
            ok = False
        else:
            problem = op.check(cond["value"])
            if problem:
                self.add((*path, "value"), problem)
                ok = False
            elif isinstance(cond["value"], list):
                for i, message in item_problems(cond["value"]):
                    self.add((*path, "value", i), message)
                    ok = False
        if "tolerance" in cond and op.name != "approx":
            self.add((*path, "tolerance"), "'tolerance' applies only to operator approx")
            ok = False
        return op if ok else None

    def _tolerance(self, cond: dict[str, Any]) -> float:
        tolerance = cond.get("tolerance", DEFAULT_TOLERANCE)
        return float(tolerance) if isinstance(tolerance, int | float) else DEFAULT_TOLERANCE

    def _attr(
        self, cond: dict[str, Any], path: JsonPath, where: str, negate: bool, text: str
    ) -> Node | None:
        attr, problem = parse_attr(text)
        if problem:
            self.add((*path, "attr"), problem)
        op = self._operator(cond, path, jmes=False)
        if attr is None or op is None:
            return None
        if not self._fits(attr, op, cond.get("value"), path):
            return None
        return AttrTest(where, negate, op, cond.get("value"), self._tolerance(cond), attr)

    def _fits(self, attr: AttrPath, op: Operator, operand: object, path: JsonPath) -> bool:
        """Whether the operator can say anything about this attribute's values."""
        vr = attr.vr
        if vr in ("SQ", "SQ item") and op.takes_value:
            what = "a sequence" if vr == "SQ" else "a sequence item"
            inside = f"{attr.text}.Keyword" if vr == "SQ item" else f"{attr.text}[*].Keyword"
            message = (
                f"{attr.text} is {what}: only exists and not_exists apply "
                f"(test an attribute inside it: {inside})"
            )
            self.add((*path, "op"), message)
            return False
        if vr in TEXT_VRS and op.numeric:
            self.add(
                (*path, "op"),
                f"operator '{op.name}' compares numbers, but {attr.text} is text (VR {vr})",
            )
            return False
        if vr in TEXT_VRS and op.takes_value and _has_number(operand):
            message = (
                f"{attr.text} is text (VR {vr}): compare it with text (put the value in quotes)"
            )
            self.add((*path, "value"), message)
            return False
        return True

    def _jmespath(
        self, cond: dict[str, Any], path: JsonPath, where: str, negate: bool, expression: str
    ) -> Node | None:
        compiled, problem = _compile_jmespath(expression)
        if problem:
            self.add((*path, "jmespath"), problem)
        op = self._operator(cond, path, jmes=True)
        if compiled is None or op is None:
            return None
        tolerance = self._tolerance(cond)
        return JmesTest(where, negate, op, cond.get("value"), tolerance, expression, compiled)


def check_rules(data: Mapping[str, object], source: Source) -> tuple[list[Rule], list[ConfigIssue]]:
    """Semantic checks of each rule in ``data`` (a rules mapping) and its compiled nodes.

    Values of the wrong shape are skipped here (the schema reports them).
    """
    checker = _Checker(source)
    rules = [checker.rule(str(name), body) for name, body in data.items()]
    return rules, checker.issues


def schema_issues(data: object, source: Source, definition: str = "rules") -> list[ConfigIssue]:
    """Shape errors of ``data`` against ``$defs/<definition>`` of the ruleset schema
    (``definition=""``: the whole document)."""
    root = load_schema("ruleset")
    schema: dict[str, Any] = root
    if definition:
        schema = {"$defs": root["$defs"], "$ref": f"#/$defs/{definition}"}
    return config_schema_issues(
        data, schema, source.file, source.line_at, source.base, at_key=True
    )
