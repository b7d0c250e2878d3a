"""The rule language: classification and matching rules as data.

A rule set (YAML or JSON, ``schemas/ruleset.schema.json``, described in ``rulesets/README.md``)
names rules; a rule is a list of conditions that must all hold, and produces a label. Rules are
checked and compiled once at load; evaluating them is a pure function of one instance's header
(a pydicom Dataset) and its series summary, with no I/O and no logging of values.

Public API::

    load_ruleset(path) -> RuleSet              # raises ConfigError (every problem, with lines)
    load_rulesets(paths) -> RuleSet            # several files, one namespace
    check_ruleset(path) -> list[ConfigIssue]
    check_rulesets(paths) -> (RuleSet | None, list[ConfigIssue])
    compile_rules(data, source, base=(), lines=None) -> RuleSet   # rules embedded elsewhere
    ruleset_files(folder) -> list[Path]        # *.yaml|yml|json under it, not in *.cases/
    RuleInput(dataset, summary=None)
    RuleSet.classify(instance) -> frozenset[str]     # labels
    RuleSet.matching(instance) -> frozenset[str]     # names of non-internal rules that hold
    RuleSet.matches(rule_name, instance) -> bool
    RuleSet.explain(instance) -> list[RuleTrace]
    RuleSet.series_labels() -> SeriesLabels          # add(labels), labels, to_json/from_json
    RuleSetGroup({name: RuleSet}).matching(instance) -> dict[str, frozenset[str]]
"""

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine.rules.attributes import SUMMARY_FIELDS
from engine.rules.compiler import Rule, Source
from engine.rules.instance import RuleInput
from engine.rules.loader import (
    check_ruleset,
    check_rulesets,
    compile_rules,
    load_ruleset,
    load_rulesets,
    ruleset_files,
)
from engine.rules.nodes import ConditionTrace
from engine.rules.operators import OPERATORS
from engine.rules.ruleset import RuleSet, RuleSetGroup, RuleTrace
from engine.rules.series import SeriesLabels

__all__ = [
    "OPERATORS",
    "SUMMARY_FIELDS",
    "ConditionTrace",
    "Rule",
    "RuleInput",
    "RuleSet",
    "RuleSetGroup",
    "RuleTrace",
    "SeriesLabels",
    "Source",
    "check_ruleset",
    "check_rulesets",
    "compile_rules",
    "load_ruleset",
    "load_rulesets",
    "ruleset_files",
]
