"""``select``: keep the series of the run that have (or lack) some labels.

Options (``schemas/steps/select.schema.json``)::

    - step: select
      labels: [t1, flair]               # keep series with any of these (empty: every series)
      exclude_labels: [localizer]       # ... and none of these
      if_empty: quarantine              # or done (default)

Labels are those ``classify`` wrote to ``state["labels"]``. The kept series UIDs go to
``state["selected"]`` in the run's series order; a second ``select`` narrows the first one's
selection. When nothing is kept, ``if_empty: done`` finishes the step (later steps see an empty
selection) and ``if_empty: quarantine`` holds the study with reason ``nothing_selected``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.pipeline.context import SELECTED, RunContext
from engine.pipeline.outcome import Done, Outcome, Quarantined
from engine.pipeline.steps.base import JsonPath, Step
from engine.store.quarantine import Reason

__all__ = ["SelectStep"]


def _names(values: object) -> frozenset[str]:
    return frozenset(str(v) for v in values) if isinstance(values, list) else frozenset()


class SelectStep(Step):
    """Keeps series by label (see the module doc)."""

    name = "select"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        self.labels = _names(options.get("labels", []))
        self.exclude = _names(options.get("exclude_labels", []))
        self.quarantine_if_empty = options.get("if_empty", "done") == "quarantine"

    def keeps(self, labels: frozenset[str]) -> bool:
        """Whether a series with ``labels`` is kept."""
        if labels & self.exclude:
            return False
        return not self.labels or bool(labels & self.labels)

    def run(self, ctx: RunContext) -> Outcome:
        candidates = ctx.selected_series()
        kept = [
            s.series_uid for s in candidates if self.keeps(frozenset(ctx.labels_of(s.series_uid)))
        ]
        ctx.state[SELECTED] = kept
        if kept or not self.quarantine_if_empty:
            return Done(f"{len(kept)} of {len(candidates)} series selected")
        return Quarantined(Reason.NOTHING_SELECTED.value, self._nothing(len(candidates)))

    def _nothing(self, n_series: int) -> str:
        wanted = ", ".join(sorted(self.labels)) if self.labels else "any label"
        text = f"none of {n_series} series has {wanted}"
        if self.exclude:
            text += f" without {', '.join(sorted(self.exclude))}"
        return text

    @classmethod
    def uses_labels(cls, options: Mapping[str, Any]) -> list[tuple[JsonPath, str]]:
        found: list[tuple[JsonPath, str]] = []
        for key in ("labels", "exclude_labels"):
            values = options.get(key, [])
            if isinstance(values, list):
                found += [((key, i), str(v)) for i, v in enumerate(values)]
        return found
