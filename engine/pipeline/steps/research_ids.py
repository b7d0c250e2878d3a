"""Research IDs from REDCap as the pseudonyms of the ``anonymize`` step.

``pseudonyms: {source: redcap, field: research_id, key: {field: mrn, from: patient_id}}``: the
subject's record is found by its key (as the consent step finds it) and the value of ``field``
replaces Patient ID (0010,0020) and Patient's Name (0010,0010). fiona never invents one: no
record, an empty field or records that disagree hold the study as ``no_pseudonym``. The look-up
is made once per run (cached) before any file is de-identified, so REDCap is never called from
inside the de-identifier, and an outage is a Retry of the step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.deid.keys import Pseudonym
from engine.pipeline.context import RunContext
from engine.pipeline.outcome import Quarantined, Retry
from engine.pipeline.steps.consent import ask_redcap, first_files
from engine.redcap.settings import RecordKey, settings_for_file
from engine.store.quarantine import Reason

__all__ = ["FixedPseudonym", "ResearchIds"]

#: Patient ID (0010,0020) is LO: at most 64 characters.
_MAX_LENGTH = 64
#: Runs whose research ID is kept in memory (a run is de-identified once; retries reuse it).
_CACHED_RUNS = 512


@dataclass(frozen=True)
class FixedPseudonym:
    """A pseudonym source that gives one run's research ID to every file of the run."""

    value: str

    def pseudonym(self, patient_id: str, patient_name: str) -> Pseudonym:
        return Pseudonym(self.value, self.value)


class ResearchIds:
    """Looks up a run's research ID in the project's REDCap (see the module doc)."""

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        self.field = str(options["field"])
        self.key = RecordKey.from_options(options["key"])
        self.project_file = project_file
        self._cache: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()

    def source_for(self, ctx: RunContext) -> FixedPseudonym | Quarantined | Retry:
        """The run's pseudonym source, or why there is none yet (held, or REDCap down)."""
        with self._lock:
            hit = self._cache.get((ctx.project, ctx.run_id))
        if hit is not None:
            return FixedPseudonym(hit)
        found = self._look_up(ctx)
        if isinstance(found, str):
            with self._lock:
                self._cache[(ctx.project, ctx.run_id)] = found
                while len(self._cache) > _CACHED_RUNS:
                    self._cache.popitem(last=False)
            return FixedPseudonym(found)
        return found

    def _look_up(self, ctx: RunContext) -> str | Quarantined | Retry:
        value = self.key.value(ctx.subject, first_files(ctx))
        if not value:
            return self._held(f"the study has no {self.key.describe()}")
        settings = settings_for_file(self.project_file)
        if settings is None:  # fiona validate refuses this; the file changed since
            raise LookupError("the project file has no 'redcap' section")
        found = ask_redcap(settings, lambda c: c.find(self.key.field, [value], [self.field]))
        if isinstance(found, Retry):
            return found
        ids = {row.get(self.field, "").strip() for row in found.get(value, [])} - {""}
        if not ids:
            return self._held(
                f"no research ID in REDCap field {self.field} for the {self.key.describe()}"
            )
        if len(ids) > 1:
            return self._held(f"{len(ids)} different research IDs in REDCap field {self.field}")
        research_id = ids.pop()
        if len(research_id) > _MAX_LENGTH:
            return self._held(f"the research ID in REDCap field {self.field} is over 64 characters")
        return research_id

    @staticmethod
    def _held(detail: str) -> Quarantined:
        return Quarantined(Reason.NO_PSEUDONYM.value, detail)
