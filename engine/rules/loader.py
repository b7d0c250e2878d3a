"""Load rule sets from files (or from a mapping embedded in another file) into a RuleSet.

A rule set file is YAML or JSON (``schemas/ruleset.schema.json``)::

    description: MR series
    rules:
      dwi:
        conditions:
          - rule: mr
          - {attr: DiffusionBValue, op: exists}

Every problem of every file is collected as a :class:`ConfigIssue` (``file:line path:
message``); nothing is compiled unless all files are clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from engine.config.loader import (
    PROJECT_SUFFIXES,
    ConfigError,
    ConfigIssue,
    JsonPath,
    _found,
    _issue_order,
    _parse,
)
from engine.rules.compiler import Rule, Source, check_rules, schema_issues
from engine.rules.linking import link
from engine.rules.ruleset import RuleSet

__all__ = [
    "CASES_SUFFIX",
    "RULESET_SUFFIXES",
    "check_ruleset",
    "check_rulesets",
    "compile_rules",
    "load_ruleset",
    "load_rulesets",
    "ruleset_files",
]

#: File name endings read as rule set files.
RULESET_SUFFIXES = PROJECT_SUFFIXES
#: Folder beside a rule set holding its golden cases: ``mr.yaml`` -> ``mr.cases/``.
CASES_SUFFIX = ".cases"


def _file_rules(path: Path) -> tuple[list[Rule], list[ConfigIssue]]:
    """The checked (not yet linked) rules of one file, and its problems."""
    parsed = _parse(path)
    if parsed.data is None and parsed.issues:
        return [], parsed.issues
    data = {} if parsed.data is None else parsed.data
    issues = list(parsed.issues)
    if not isinstance(data, dict):
        return [], [*issues, ConfigIssue(path, None, "(root)", f"expected object, {_found(data)}")]
    issues += schema_issues(data, Source(path, (), parsed.lines), definition="")
    rules_data = data.get("rules")
    if not isinstance(rules_data, dict):
        return [], issues
    rules, found = check_rules(rules_data, Source(path, ("rules",), parsed.lines))
    return rules, issues + found


def check_rulesets(paths: Iterable[Path]) -> tuple[RuleSet | None, list[ConfigIssue]]:
    """Check ``paths`` as one rule set (rule names shared across the files)."""
    rules: list[Rule] = []
    issues: list[ConfigIssue] = []
    for path in paths:
        found, problems = _file_rules(path)
        rules += found
        issues += problems
    issues += link(rules)
    issues.sort(key=_issue_order)
    return (None if issues else RuleSet(rules)), issues


def check_ruleset(path: Path) -> list[ConfigIssue]:
    """Every problem in the rule set file ``path`` (empty when it loads)."""
    return check_rulesets([path])[1]


def load_rulesets(paths: Iterable[Path]) -> RuleSet:
    """Several files as one rule set (``rules/classify/*.yaml`` for the engine's labels); rule
    names must be unique across them and references may cross files. Raises ConfigError."""
    ruleset, issues = check_rulesets(list(paths))
    if ruleset is None:
        raise ConfigError(issues)
    return ruleset


def load_ruleset(path: Path) -> RuleSet:
    """One rule set file; raises :class:`ConfigError` with every problem found."""
    return load_rulesets([path])


def compile_rules(
    data: object,
    source: Path | Source,
    base: JsonPath = (),
    lines: Mapping[JsonPath, int] | None = None,
) -> RuleSet:
    """A rules mapping already in memory (rules embedded in a project file, say).

    ``source`` (or ``Source(file, base, lines)``) says where the mapping sits for messages:
    the file, the JSON path of the mapping in it (``("routing", "rules")``) and the line of
    each path as recorded by ``LineLoader``. The mapping is checked against the schema's
    ``$defs/rules`` and then semantically. Raises :class:`ConfigError` with every problem.
    """
    where = source if isinstance(source, Source) else Source(source, base, lines or {})
    issues = schema_issues(data, where)
    rules: list[Rule] = []
    if isinstance(data, dict):
        rules, found = check_rules(data, where)
        issues += found
    issues += link(rules)
    if issues:
        raise ConfigError(sorted(issues, key=_issue_order))
    return RuleSet(rules)


def ruleset_files(folder: Path) -> list[Path]:
    """Rule set files under ``folder``, recursively, sorted: ``*.yaml``, ``*.yml``, ``*.json``
    outside ``*.cases`` folders; hidden and ``_*`` files and folders are skipped."""
    found = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(p.startswith((".", "_")) or p.endswith(CASES_SUFFIX) for p in parts[:-1]):
            continue
        if path.name.startswith((".", "_")) or path.suffix.lower() not in RULESET_SUFFIXES:
            continue
        if path.is_file():
            found.append(path)
    return found
