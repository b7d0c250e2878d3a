"""Checks across the rules of a set: unique names, references that exist and do not form a
cycle (the cycle is shown), and rules sharing a label agreeing on ``series_level``."""

from __future__ import annotations

from collections.abc import Mapping

from engine.config.issues import ConfigIssue, issue_order
from engine.rules.compiler import Rule, close_match
from engine.rules.nodes import RuleRef

__all__ = ["link"]


def _cycles(graph: Mapping[str, list[tuple[str, RuleRef]]]) -> list[tuple[list[str], RuleRef, str]]:
    """Every back edge of a depth-first walk: (cycle, the reference closing it, its rule)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []
    for start in graph:
        if start in state:
            continue
        state[start] = 1
        path, stack = [start], [(start, iter(graph[start]))]
        while stack:
            name, edges = stack[-1]
            edge = next(edges, None)
            if edge is None:
                state[name] = 2
                stack.pop()
                path.pop()
                continue
            target, ref = edge
            if target not in graph:
                continue
            if state.get(target) == 1:
                found.append(([*path[path.index(target) :], target], ref, name))
            elif target not in state:
                state[target] = 1
                path.append(target)
                stack.append((target, iter(graph[target])))
    return found


def link(rules: list[Rule]) -> list[ConfigIssue]:
    """Checks across rules: unique names, defined and acyclic references, label agreement."""
    issues: list[ConfigIssue] = []
    by_name: dict[str, Rule] = {}
    for rule in rules:
        first = by_name.get(rule.name)
        if first is None:
            by_name[rule.name] = rule
            continue
        where = f"{first.source.file}:{first.source.line_of((first.name,))}"
        issues.append(
            rule.source.issue((rule.name,), f"rule '{rule.name}' is already defined in {where}")
        )
    graph: dict[str, list[tuple[str, RuleRef]]] = {}
    for rule in by_name.values():
        graph[rule.name] = []
        for ref in rule.refs():
            if ref.name in by_name:
                graph[rule.name].append((ref.name, ref))
                continue
            message = f"rule '{ref.name}' is not defined{close_match(ref.name, by_name)}"
            issues.append(rule.source.issue((*ref.path, ref.keyword), message))
    for cycle, ref, owner in _cycles(graph):
        message = f"rule reference cycle: {' -> '.join(cycle)}"
        issues.append(by_name[owner].source.issue((*ref.path, ref.keyword), message))
    labels: dict[str, Rule] = {}
    for rule in by_name.values():
        if rule.label is None:
            continue
        other = labels.setdefault(rule.label, rule)
        if other.series_level != rule.series_level:
            message = (
                f"label '{rule.label}' is also produced by rule '{other.name}' with series_level: "
                f"{'true' if other.series_level else 'false'}; rules sharing a label must agree"
            )
            issues.append(rule.source.issue((rule.name,), message))
    return sorted(issues, key=issue_order)
