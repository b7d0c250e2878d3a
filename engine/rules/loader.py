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

from engine.config.files import parse_file
from engine.config.issues import ConfigError, ConfigIssue, JsonPath, found_value, issue_order
from engine.config.rulesets import CASES_SUFFIX, RULESET_SUFFIXES, ruleset_files
from engine.config.sections import RulesetKind
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

# CASES_SUFFIX, RULESET_SUFFIXES and ruleset_files live with the other rule set file names in
# engine.config.rulesets (fiona validate lists rule set files without the rules package).



def _file_rules(path: Path) -> tuple[list[Rule], list[ConfigIssue]]:
    """The checked (not yet linked) rules of one file, and its problems."""
    parsed = parse_file(path)
    if parsed.data is None and parsed.issues:
        return [], parsed.issues
    data = {} if parsed.data is None else parsed.data
    issues = list(parsed.issues)
    if not isinstance(data, dict):
        message = f"expected object, {found_value(data)}"
        return [], [*issues, ConfigIssue(path, None, "(root)", message)]
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
    issues.sort(key=issue_order)
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
        raise ConfigError(sorted(issues, key=issue_order))
    return RuleSet(rules)



#: Every other folder of ``rulesets/`` (``classify/``, a project's own): classification rule
#: sets, registered by :mod:`engine.projects`.
RULESET_KIND = RulesetKind("", "ruleset.schema.json", check_ruleset)
