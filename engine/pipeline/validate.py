"""Check a project's ``pipeline`` section, and build its steps.

Checks run in layers and collect every problem (:class:`~engine.config.loader.ConfigIssue`,
``file:line path: message``, what was expected and what was found):

1. each item names a known step type (else: the known ones, and a "did you mean");
2. its options against the step's schema fragment ``schemas/steps/<step>.schema.json`` (every
   error, with its JSON path: ``pipeline[2].to``);
3. the step's own :meth:`~engine.pipeline.steps.base.Step.check` (files exist, rules compile),
   on the options with the fragment's defaults applied;
4. across steps: labels a step reads (``select``) must come from a ``classify`` step before it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.config.files import ParsedFile
from engine.config.issues import (
    ConfigError,
    ConfigIssue,
    LineOf,
    did_you_mean,
    format_path,
    found_value,
    issue_order,
)
from engine.config.model import ProjectConfig
from engine.config.schema import (
    apply_defaults,
    load_schema,
    locate_issues,
    schema_dir,
    schema_issues,
)
from engine.config.sections import ProjectSection
from engine.pipeline.steps import STEPS, JsonPath, Step

__all__ = ["SECTION", "build_pipeline", "check_pipeline", "step_options", "step_schema"]


class _AnyLabel:
    """A labelling step whose labels are unknown (it has problems of its own)."""


_ANY = _AnyLabel()


def step_schema(name: str) -> dict[str, Any]:
    """The options schema of step type ``name`` (``schemas/steps/<name>.schema.json``)."""
    return load_schema(name, schema_dir() / "steps")


def step_options(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a (valid) step item with its schema fragment's defaults applied."""
    schema = step_schema(str(item["step"]))
    options = copy.deepcopy(dict(item))
    apply_defaults(schema, options, schema)
    return options


_close = did_you_mean


class _Checker:
    """Collects the issues of one pipeline."""

    def __init__(self, file: Path, line_of: LineOf | None) -> None:
        self.file = file
        self.line_of = line_of
        self.issues: list[ConfigIssue] = []

    def add(self, path: JsonPath, message: str) -> None:
        line = self.line_of(path) if self.line_of is not None else None
        self.issues.append(ConfigIssue(self.file, line, format_path(path), message))

    def step(
        self, item: object, where: JsonPath
    ) -> tuple[type[Step], dict[str, Any] | None] | None:
        """(step class, defaulted options) of an item; options None when its own check found
        problems; None when the item is not even a known step with valid options."""
        if not isinstance(item, Mapping):
            self.add(where, f"expected object, {found_value(item)}")
            return None
        name = item.get("step")
        if name is None:
            self.add(where, "missing required key 'step'")
            return None
        if not isinstance(name, str):
            self.add((*where, "step"), f"expected string, {found_value(name)}")
            return None
        cls = STEPS.get(name)
        if cls is None:
            known = sorted(STEPS)
            message = (
                f"unknown step '{name}'{_close(name, known)}; expected one of {', '.join(known)}"
            )
            self.add((*where, "step"), message)
            return None
        found = schema_issues(item, step_schema(name), self.file, self.line_of, where)
        if found:
            self.issues += sorted(found, key=issue_order)
            return None
        options = step_options(item)
        own = cls.check(options, self.file, where)
        if own:
            self.issues += locate_issues(own, options, where, self.file, self.line_of)
            return cls, None
        return cls, options

    def before(
        self, cls: type[Step], options: Mapping[str, Any], where: JsonPath, seen: set[str]
    ) -> None:
        """Step types the step needs before it (``convert`` after ``anonymize``)."""
        for name, why in cls.needs_before(options).items():
            if name not in seen:
                self.add(
                    (*where, "step"),
                    f"'{cls.name}' {why}, so expected"
                    f" {'an' if name[0] in 'aeiou' else 'a'} {name} step before it, found none",
                )

    def labels(
        self, cls: type[Step], options: Mapping[str, Any], where: JsonPath, known: object
    ) -> None:
        """Labels the step reads must be given by a labelling step before it."""
        used = cls.uses_labels(options)
        if not used or known is _ANY:
            return
        if not isinstance(known, frozenset):
            self.add(
                where,
                f"'{cls.name}' reads series labels, so expected a classify step before it,"
                " found none",
            )
            return
        choices = sorted(known)
        for sub, label in used:
            if label in known:
                continue
            hint = _close(label, choices) or f"; they give {', '.join(choices) or 'none'}"
            message = f"expected a label given by the classify step(s) before, found '{label}'"
            self.add((*where, *sub), message + hint)


def check_pipeline(
    pipeline: Sequence[object],
    file: Path,
    base: JsonPath = ("pipeline",),
    line_of: LineOf | None = None,
) -> list[ConfigIssue]:
    """Every problem of the ``pipeline`` list found at JSON path ``base`` of ``file``.

    ``line_of`` maps a JSON path to its line in ``file`` (``LineLoader``'s lines); None leaves
    lines out. Issues of a rule set file a step names are reported against that file.
    """
    checker = _Checker(file, line_of)
    known: object = None  # None: no labelling step yet; _ANY: unknown labels; else frozenset
    seen: set[str] = set()  # step types before the current one
    for i, item in enumerate(pipeline):
        where = (*base, i)
        found = checker.step(item, where)
        if found is None:
            continue
        cls, options = found
        seen.add(cls.name)
        if options is None:
            if cls.gives_labels:
                known = _ANY  # its labels are unknown: do not report every label as unknown
            continue
        checker.labels(cls, options, where, known)
        checker.before(cls, options, where, seen)
        produced = cls.produces_labels(options, file)
        if produced is not None and known is not _ANY:
            known = produced | (known if isinstance(known, frozenset) else frozenset())
    return checker.issues


def build_pipeline(pipeline: Sequence[object], project_file: Path) -> list[Step]:
    """The compiled steps of a project's ``pipeline`` list; raises
    :class:`~engine.config.loader.ConfigError` with every problem when it does not check."""
    issues = check_pipeline(pipeline, project_file)
    if issues:
        raise ConfigError(issues)
    steps: list[Step] = []
    for item in pipeline:
        assert isinstance(item, Mapping)  # checked above
        options = step_options(item)
        steps.append(STEPS[str(options["step"])](options, project_file))
    return steps


def _check_section(project: ProjectConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    pipeline = project.raw.get("pipeline", [])
    items = pipeline if isinstance(pipeline, list) else []
    return check_pipeline(items, project.source, ("pipeline",), parsed.line_of)


#: The ``pipeline`` section of a project file, registered by :mod:`engine.projects`.
SECTION = ProjectSection("pipeline", "steps/<step>.schema.json", _check_section)
