"""Golden cases of rule sets, and ``fiona test-rules``.

Every rule set file has its cases beside it: ``mr.yaml`` -> ``mr.cases/NAME.json``, each::

    {"description": "where it came from (synthetic, modelled on ...)",
     "input": {DICOM JSON of the instance's header},
     "summary": {"num_files": 30},                      (optional)
     "expected": ["dwi", "mr"]}

``"series": [{...}, {...}]`` instead of ``"input"`` runs several instances of one series and
expects the series' labels (``SeriesLabels``). ``expected`` is the exact set of labels the rule
set file produces: a case names what must and, by leaving it out, what must not be found.

A rule set without cases, a label no case expects, and a case expecting a label the rule set
cannot produce are errors too.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from engine.rules.instance import RuleInput
from engine.rules.loader import CASES_SUFFIX, check_rulesets, ruleset_files
from engine.rules.ruleset import RuleSet, RuleTrace

__all__ = [
    "DEFAULT_RULESETS",
    "Case",
    "CaseError",
    "cases_dir",
    "check_cases",
    "load_case",
    "run_test_rules",
]

#: What ``fiona test-rules`` checks when given nothing.
DEFAULT_RULESETS = Path("rulesets/classify")
_KEYS = {"$comment", "description", "input", "series", "summary", "expected"}


class CaseError(Exception):
    """A case file that cannot be used (the message says why)."""


@dataclass(frozen=True)
class Case:
    """One golden case: instances (one, or a series), their summary, the labels expected."""

    file: Path
    description: str
    instances: tuple[Dataset, ...]
    summary: Mapping[str, object] | None
    expected: frozenset[str]
    series: bool


def cases_dir(ruleset: Path) -> Path:
    """The cases folder of a rule set file: ``mr.yaml`` -> ``mr.cases``."""
    return ruleset.with_suffix(CASES_SUFFIX)


def _dataset(doc: object, where: str) -> Dataset:
    if not isinstance(doc, dict):
        raise CaseError(f"{where}: expected a DICOM JSON object")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Dataset.from_json(doc)
    except Exception as exc:  # pydicom raises several kinds for malformed DICOM JSON
        raise CaseError(f"{where}: not a DICOM JSON dataset ({exc})") from None


def load_case(path: Path) -> Case:
    """Read one case file; :class:`CaseError` when it is not a usable case."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CaseError(f"cannot read: {exc}") from None
    if not isinstance(doc, dict):
        raise CaseError("expected a JSON object")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise CaseError(f"unknown keys: {', '.join(unknown)} (allowed: {', '.join(sorted(_KEYS))})")
    if ("input" in doc) == ("series" in doc):
        raise CaseError("give exactly one of 'input' (one instance) or 'series' (a list)")
    description = doc.get("description")
    if not isinstance(description, str) or not description.strip():
        raise CaseError("'description' must say where the case came from")
    expected = doc.get("expected")
    if not isinstance(expected, list) or not all(isinstance(x, str) for x in expected):
        raise CaseError("'expected' must be a list of labels")
    summary = doc.get("summary")
    if summary is not None and not isinstance(summary, dict):
        raise CaseError("'summary' must be an object")
    if "series" in doc:
        series = doc["series"]
        if not isinstance(series, list) or not series:
            raise CaseError("'series' must be a non-empty list of DICOM JSON objects")
        instances = tuple(_dataset(d, f"series[{i}]") for i, d in enumerate(series))
    else:
        instances = (_dataset(doc["input"], "input"),)
    try:
        RuleInput(Dataset(), summary)
    except ValueError as exc:
        raise CaseError(f"summary: {exc}") from None
    return Case(path, description, instances, summary, frozenset(expected), "series" in doc)


def _run(ruleset: RuleSet, case: Case) -> frozenset[str]:
    if not case.series:
        return ruleset.classify(RuleInput(case.instances[0], case.summary))
    labels = ruleset.series_labels()
    for ds in case.instances:
        labels.add(ruleset.classify(RuleInput(ds, case.summary)))
    return labels.labels


def _related(ruleset: RuleSet, labels: Iterable[str]) -> list[str]:
    """Rules producing ``labels`` and every rule they refer to, in file order."""
    wanted = {r.name for r in ruleset.rules if r.label in set(labels)}
    todo = list(wanted)
    while todo:
        rule = ruleset.rules[ruleset.index[todo.pop()]]
        for ref in rule.refs():
            if ref.name not in wanted:
                wanted.add(ref.name)
                todo.append(ref.name)
    return [r.name for r in ruleset.rules if r.name in wanted]


def _mismatch(ruleset: RuleSet, case: Case, got: frozenset[str]) -> list[str]:
    missing, extra = sorted(case.expected - got), sorted(got - case.expected)
    out = [
        f"FAIL {case.file}: {case.description}",
        f"  expected: {', '.join(sorted(case.expected)) or '(none)'}",
        f"  got:      {', '.join(sorted(got)) or '(none)'}",
    ]
    if missing:
        out.append(f"  missing:  {', '.join(missing)}")
    if extra:
        out.append(f"  extra:    {', '.join(extra)}")
    names = set(_related(ruleset, [*missing, *extra]))
    for n, ds in enumerate(case.instances):
        if case.series:
            out.append(f"  instance {n}:")
        traces: list[RuleTrace] = ruleset.explain(RuleInput(ds, case.summary))
        for trace in traces:
            if trace.name in names:
                out += ["    " + line for line in trace.lines()]
    return out


def check_cases(path: Path) -> tuple[int, list[str]]:
    """Run every case of the rule set file ``path``: (cases run, problem lines)."""
    ruleset, issues = check_rulesets([path])
    if ruleset is None:
        return 0, [str(i) for i in issues]
    folder = cases_dir(path)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return 0, [f"{path}: no cases (add {folder}/NAME.json; see rulesets/README.md)"]
    problems: list[str] = []
    covered: set[str] = set()
    for file in files:
        try:
            case = load_case(file)
        except CaseError as exc:
            problems.append(f"{file}: {exc}")
            continue
        unknown = sorted(case.expected - ruleset.labels)
        if unknown:
            problems.append(f"{file}: expected labels not produced by {path}: {', '.join(unknown)}")
            continue
        covered |= case.expected
        got = _run(ruleset, case)
        if got != case.expected:
            problems += _mismatch(ruleset, case, got)
    for label in sorted(ruleset.labels - covered):
        problems.append(f"{path}: label '{label}' has no case expecting it")
    return len(files), problems


def run_test_rules(paths: list[Path]) -> int:
    """``fiona test-rules``: run the cases of rule set files (folders: every file under them;
    none: ``rulesets/classify``). Prints failures and a summary; returns 1 on any problem."""
    targets = paths or [DEFAULT_RULESETS]
    files: list[Path] = []
    problems: list[str] = []
    for target in targets:
        if target.is_dir():
            in_folder = ruleset_files(target)
            if not in_folder:
                problems.append(f"{target}: no rule set files")
            files += in_folder
        elif target.is_file():
            files.append(target)
        else:
            problems.append(f"{target}: no such file or folder")
    for line in problems:
        print(line)
    total = 0
    for file in dict.fromkeys(files):
        count, failures = check_cases(file)
        total += count
        problems += failures
        print(f"{file}: {count} cases, {'ok' if not failures else 'FAILED'}")
        for line in failures:
            print(line)
    print(f"{len(files)} rule sets, {total} cases, {'FAILED' if problems else 'all passed'}")
    return 1 if problems else 0
