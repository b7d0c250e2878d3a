"""``consent``: go on only when REDCap says the study's subject consented.

Options (``schemas/steps/consent.schema.json``)::

    - step: consent
      key: {field: mrn, from: patient_id}     # or accession_number, or subject (coupling list)
      consent_field: consent
      accepted: ["1"]

The project's ``redcap:`` section says how to reach REDCap. The subject's record is found by its
key field (one filtered export, then the record's rows); the step is Done when a row of the
record holds an accepted value in ``consent_field``, and leaves the record ID in
``state["redcap"]["record"]`` for later steps. No record, or no accepted value: the study is held
as ``no_consent`` (the ``consent-recheck`` job releases it once consent is given). REDCap
unavailable: Retry with a growing pause, never a hold and never an exception (the runner turns
repeated exceptions into ``step_failed``; an outage must not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from engine.config.issues import ConfigIssue
from engine.pipeline.context import RunContext
from engine.pipeline.outcome import Done, Outcome, Quarantined, Retry
from engine.pipeline.steps.base import JsonPath, Step
from engine.redcap.client import RedcapClient, RedcapUnavailable
from engine.redcap.settings import RecordKey, RedcapSettings, connection, settings_for_file
from engine.store.quarantine import Reason

__all__ = ["REDCAP", "ConsentStep", "ask_redcap", "consenting_record", "first_files"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: ``RunContext.state`` key of what REDCap said: ``{"record": <record ID>, ...}``.
REDCAP = "redcap"


def ask_redcap(settings: RedcapSettings, call: Callable[[RedcapClient], T]) -> T | Retry:
    """``call`` on the project's REDCap client, or a Retry when REDCap is unavailable.

    The pause doubles with each unavailable try in a row on that REDCap (shared by every study
    waiting on it) up to the configured maximum. Refusals (bad token, unknown field) raise:
    they are configuration errors for an operator, reported by the runner.
    """
    conn = connection(settings.config)
    try:
        result = call(conn.client())
    except RedcapUnavailable as exc:
        after = settings.backoff(conn.failed())
        log.warning("%s; the study waits %g s", exc, after)
        return Retry("redcap_unavailable", after)
    conn.succeeded()
    return result


def consenting_record(
    rows: Sequence[Mapping[str, str]], id_field: str, consent_field: str, accepted: Sequence[str]
) -> str | None:
    """The ID of the first record with an accepted value in ``consent_field`` in any of its
    rows (events, repeat instances), or None."""
    for row in rows:
        if row.get(consent_field, "").strip() in accepted:
            return row.get(id_field, "")
    return None


def first_files(ctx: RunContext) -> list[Path]:
    """The first archived file of the run's first series (header values are per study)."""
    return [s.files[0] for s in ctx.series if s.files][:1]


def require_redcap(
    file: Path, base_path: JsonPath, what: str
) -> tuple[RedcapSettings | None, list[ConfigIssue]]:
    """The project's REDCap settings, or an issue saying ``what`` needs a ``redcap`` section."""
    settings = settings_for_file(file)
    if settings is not None:
        return settings, []
    message = f"{what} needs the project's 'redcap' section (url, token_file); found none"
    return None, [Step.issue(file, base_path, message)]


class ConsentStep(Step):
    """Checks the subject's consent in REDCap (see the module doc)."""

    name = "consent"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        self.key = RecordKey.from_options(options["key"])
        self.consent_field = str(options["consent_field"])
        self.accepted = tuple(str(v) for v in options.get("accepted", ["1"]))

    def settings(self) -> RedcapSettings:
        """The project's REDCap settings, re-read when the project file changes."""
        found = settings_for_file(self.project_file)
        if found is None:  # fiona validate refuses this; the file changed since
            raise LookupError("the project file has no 'redcap' section")
        return found

    def run(self, ctx: RunContext) -> Outcome:
        value = self.key.value(ctx.subject, first_files(ctx))
        if not value:
            return Quarantined(Reason.NO_CONSENT.value, f"the study has no {self.key.describe()}")
        settings = self.settings()
        found = ask_redcap(
            settings,
            lambda c: (c.id_field(), c.find(self.key.field, [value], [self.consent_field])),
        )
        if isinstance(found, Retry):
            return found
        id_field, records = found
        rows = records.get(value, [])
        if not rows:
            return Quarantined(
                Reason.NO_CONSENT.value,
                f"no REDCap record matches the study's {self.key.describe()}",
            )
        record = consenting_record(rows, id_field, self.consent_field, self.accepted)
        if record is None:
            accepted = ", ".join(self.accepted)
            return Quarantined(
                Reason.NO_CONSENT.value,
                f"REDCap field {self.consent_field} holds none of the accepted values ({accepted})",
            )
        state = ctx.state.get(REDCAP)
        ctx.state[REDCAP] = {**(state if isinstance(state, dict) else {}), "record": record}
        return Done(f"consent found in REDCap field {self.consent_field}")

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The project must have a ``redcap`` section."""
        return require_redcap(file, base_path, "a consent step")[1]
