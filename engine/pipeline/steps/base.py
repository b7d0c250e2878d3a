"""The base class of pipeline steps.

A step type is one module in this package: a :class:`Step` subclass with a ``name``, a JSON
Schema fragment ``schemas/steps/<name>.schema.json`` for its options, and an entry in
``STEPS`` (``steps/__init__.py``). The pipeline validator checks a step's options against the
fragment (shape), applies the fragment's defaults, then calls :meth:`Step.check` (meaning: files
exist, rules compile). The engine builds each step once per project with the defaulted options
and calls :meth:`Step.run` for every run; ``run`` returns an outcome, never None, and raises
only on unexpected failures (the runner retries those with backoff).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from engine.config.issues import ConfigIssue, format_path
from engine.config.schema import schema_dir
from engine.pipeline.context import RunContext
from engine.pipeline.outcome import Outcome

__all__ = ["JsonPath", "Step", "step_schema_file"]

JsonPath = tuple[str | int, ...]


def step_schema_file(name: str) -> Path:
    """``schemas/steps/<name>.schema.json``: the options of step type ``name``."""
    return schema_dir() / "steps" / f"{name}.schema.json"


class Step(ABC):
    """One step of a project's pipeline, compiled once from its options.

    ``options`` is the step's mapping from the project file (the ``step`` key included) with the
    schema fragment's defaults applied; ``project_file`` is the project file, which relative
    paths in the options are relative to (unless the step says otherwise).
    """

    #: The step type, as written after ``step:`` in a project file.
    name: ClassVar[str]
    #: Whether the step gives series labels (see :meth:`produces_labels`).
    gives_labels: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        self.options: dict[str, Any] = dict(options)
        self.project_file = project_file

    @abstractmethod
    def run(self, ctx: RunContext) -> Outcome:
        """Do the step for one run; ``ctx.state`` changes are kept only when it returns Done."""

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """Problems the schema cannot see (a missing file, a rule set that does not compile).

        ``options`` passed the schema and carry its defaults; ``base_path`` is the JSON path of
        the step in ``file`` (``("pipeline", 0)``). Issues name paths below it; their lines are
        filled in by the validator.
        """
        return []

    @classmethod
    def produces_labels(cls, options: Mapping[str, Any], file: Path) -> frozenset[str] | None:
        """The series labels this step can give (None: it gives none), for valid options. Lets
        the validator check the labels later steps ask for."""
        return None

    @classmethod
    def needs_before(cls, options: Mapping[str, Any]) -> dict[str, str]:
        """Step types that must come before this one, each with why (``convert``: an
        ``anonymize`` step, since it "runs only on de-identified series")."""
        return {}

    @classmethod
    def uses_labels(cls, options: Mapping[str, Any]) -> list[tuple[JsonPath, str]]:
        """The labels this step reads, each with its path below the step (``("labels", 0)``)."""
        return []

    @classmethod
    def schema_file(cls) -> Path:
        """This step's options schema."""
        return step_schema_file(cls.name)

    @staticmethod
    def issue(file: Path, path: JsonPath, message: str) -> ConfigIssue:
        """A ConfigIssue at ``path`` (its line is filled in by the validator)."""
        return ConfigIssue(file, None, format_path(path), message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
