"""``classify``: label every series of the run with rule sets.

Options (``schemas/steps/classify.schema.json``)::

    - step: classify
      rulesets: [mr, ct]     # names in rulesets/classify/, or files relative to the project file

No ``rulesets`` means every rule set in ``rulesets/classify/``. Each instance's header is read
(:func:`~engine.dicom.dataset.read_header_dataset`, the same as ``dcmread(path,
stop_before_pixels=True)``) and classified together with the series summary
fields (``summary.num_files``, ``calling_ae``, ``called_ae``, ``calling_ip``); the labels of a
series accumulate over its instances (:class:`~engine.rules.SeriesLabels`), so a series-level
rule holds only when it holds for every instance. The result goes to
``state["labels"] = {series_uid: [label, ...]}`` (sorted), replacing earlier labels of the same
series only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigError, ConfigIssue, did_you_mean
from engine.config.rulesets import classify_dir, is_name, resolve_ruleset, resolve_rulesets
from engine.dicom.dataset import read_header_dataset
from engine.pipeline.context import LABELS, RunContext, SeriesInput
from engine.pipeline.outcome import Done, Outcome
from engine.pipeline.steps.base import JsonPath, Step
from engine.rules import RuleInput, RuleSet, check_rulesets, ruleset_files

__all__ = ["ClassifyStep", "compiled_rulesets"]

_Stamp = tuple[tuple[str, int, int], ...]


@functools.lru_cache(maxsize=32)
def _compile(stamp: _Stamp) -> tuple[RuleSet | None, tuple[ConfigIssue, ...]]:
    ruleset, issues = check_rulesets([Path(p) for p, _, _ in stamp])
    return ruleset, tuple(issues)


def compiled_rulesets(paths: Sequence[Path]) -> tuple[RuleSet | None, list[ConfigIssue]]:
    """``check_rulesets(paths)``, remembered while the files stay unchanged (one project file is
    checked, then built; several projects share the default rule sets)."""
    stamp = []
    for path in paths:
        st = path.stat()
        stamp.append((str(path), st.st_mtime_ns, st.st_size))
    ruleset, issues = _compile(tuple(stamp))
    return ruleset, list(issues)


def _refs(options: Mapping[str, Any]) -> list[str]:
    return [str(r) for r in options.get("rulesets", [])]


class ClassifyStep(Step):
    """Labels each series of the run (see the module doc)."""

    name = "classify"
    gives_labels = True

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        paths = resolve_rulesets(_refs(options), project_file.parent)
        ruleset, issues = compiled_rulesets(paths)
        if ruleset is None:
            raise ConfigError(issues)
        self.ruleset: RuleSet = ruleset

    def run(self, ctx: RunContext) -> Outcome:
        found = ctx.state.get(LABELS)
        labels: dict[str, list[str]] = dict(found) if isinstance(found, dict) else {}
        for series in ctx.series:
            labels[series.series_uid] = self.series_labels(series)
        ctx.state[LABELS] = labels
        files = sum(len(s.files) for s in ctx.series)
        return Done(f"{len(ctx.series)} series ({files} files) labelled")

    def series_labels(self, series: SeriesInput) -> list[str]:
        """The sorted labels of one series, from the headers of all its files."""
        summary = {
            "num_files": series.n_instances,
            "calling_ae": series.calling_ae or None,  # empty (an ingest) counts as missing
            "called_ae": series.called_ae or None,
            "calling_ip": series.peer_ip or None,
        }
        acc = self.ruleset.series_labels()
        for path in series.files:
            dataset = read_header_dataset(path)
            acc.add(self.ruleset.classify(RuleInput(dataset, summary)))
        return sorted(acc.labels)

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        refs = _refs(options)
        issues: list[ConfigIssue] = []
        if not refs:
            folder = classify_dir()
            if not folder.is_dir() or not ruleset_files(folder):
                message = f"expected rule sets in {folder}, found none; name them here"
                return [cls.issue(file, (*base_path, "rulesets"), message)]
            return cls._compile_issues(refs, file, base_path)
        available = _available_names()
        for i, ref in enumerate(refs):
            path = resolve_ruleset(ref, file.parent)
            if path.is_file():
                continue
            if is_name(ref):
                message = f"unknown rule set '{ref}'"
                message += did_you_mean(ref, available)
                listed = ", ".join(available) or "none"
                message += f"; expected a name from {classify_dir()} ({listed}) or a file path"
            else:
                message = f"expected a rule set file, found no file at {path}"
            issues.append(cls.issue(file, (*base_path, "rulesets", i), message))
        return issues or cls._compile_issues(refs, file, base_path)

    @classmethod
    def _compile_issues(cls, refs: list[str], file: Path, base_path: JsonPath) -> list[ConfigIssue]:
        ruleset, issues = compiled_rulesets(resolve_rulesets(refs, file.parent))
        if ruleset is not None:
            return []
        files = sorted({str(i.file) for i in issues})
        message = (
            f"expected rule sets that compile, found {len(issues)} problem(s) in"
            f" {', '.join(files)} (listed under those files)"
        )
        return [*issues, cls.issue(file, (*base_path, "rulesets"), message)]

    @classmethod
    def produces_labels(cls, options: Mapping[str, Any], file: Path) -> frozenset[str] | None:
        try:
            ruleset, _ = compiled_rulesets(resolve_rulesets(_refs(options), file.parent))
        except OSError:
            return None
        return ruleset.labels if ruleset is not None else None


def _available_names() -> list[str]:
    """Names of the rule sets directly in ``rulesets/classify/``."""
    folder = classify_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in ruleset_files(folder) if p.parent == folder})
