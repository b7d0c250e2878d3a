"""``anonymize``: de-identify the run's selected series; later steps export the copies.

Options (``schemas/steps/anonymize.schema.json``)::

    - step: anonymize
      profile: basic
      options: [retain_longitudinal_modified_dates]
      secret_file: secrets/neuro.key       # relative to the project file, mode 600
      # or the per-install secret fiona serve creates in the data folder:
      # secret_file: "{data_dir}/secrets/install.key"
      pseudonyms: {source: table, prefix: NEU}
      # or the research ID the project's REDCap holds for the subject (never invented):
      # pseudonyms: {source: redcap, field: research_id, key: {field: mrn, from: patient_id}}

Every selected file goes through :class:`engine.deid.export.Exporter` (burned-in gate,
de-identification, verification). The copies are written durably under
``<data>/work/<project>/run-<id>/<new study>/<new series>/<new SOP>.dcm`` and recorded in
``state["deidentified"]``. If any file is held, the whole study is held (quarantined with the
reasons counted, no values): nothing of a study leaves unless all of it passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigIssue, format_path
from engine.deid import Deidentifier, Pseudonym, load_profile, load_secret
from engine.deid.burned_in import BurnedInPolicy
from engine.deid.export import Exported, Exporter
from engine.deid.keys import PseudonymSource, secret_in_data_dir
from engine.deid.ocr import tesseract_problem
from engine.deid.pixels import load_pixel_rules, resolve_pixel_rulesets
from engine.pipeline.context import DEIDENTIFIED, RunContext
from engine.pipeline.outcome import Done, Outcome, Quarantined
from engine.pipeline.steps.base import JsonPath, Step
from engine.pipeline.steps.consent import require_redcap
from engine.pipeline.steps.research_ids import FixedPseudonym, ResearchIds
from engine.store.fsio import write_durable
from engine.store.pseudonyms import PseudonymTable

#: Profile options under which de-identified files keep dates (shifted or not).
_DATE_OPTIONS = ("retain_longitudinal",)


class TablePseudonyms:
    """The project's pseudonym table as the de-identifier's pseudonym source."""

    def __init__(self, table: PseudonymTable, preferred: str = "") -> None:
        self.table = table
        self.preferred = preferred
        # For the run (one study, mostly one patient): the table is asked once per patient,
        # not once per file; a pseudonym, once given, never changes.
        self._given: dict[str, str] = {}

    def pseudonym(self, patient_id: str, patient_name: str) -> Pseudonym:
        value = self._given.get(patient_id)
        if value is None:
            value = self._given[patient_id] = self.table.pseudonym_for(
                patient_id, preferred=self.preferred
            )
        return Pseudonym(value, value)


def _path(value: str, project_file: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_file.parent / path


def _profile_ref(options: Mapping[str, Any], project_file: Path) -> str:
    profile = str(options.get("profile", "basic"))
    return (
        profile if "/" not in profile and "." not in profile else str(_path(profile, project_file))
    )


def _check_secret(value: str, project_file: Path) -> None:
    """A secret file that can be used; ``{data_dir}/...`` only for its form, since the data
    folder is the site's (``fiona serve`` creates the install secret there at start)."""
    if secret_in_data_dir(value) is None:
        load_secret(_path(value, project_file))


def _check_burned_in(burned: dict[str, Any]) -> None:
    """The policy, and for a project that asks for OCR, Tesseract and its languages here."""
    policy = BurnedInPolicy.from_mapping(burned)
    if policy.ocr is not None:
        problem = tesseract_problem(policy.ocr.languages)
        if problem is not None:
            raise ValueError(f"ocr: {problem}")


class AnonymizeStep(Step):
    """De-identifies the selected series (see the module doc)."""

    name = "anonymize"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        self.profile = load_profile(
            _profile_ref(options, project_file),
            list(options.get("options", [])),
            dict(options.get("overrides", {})),
        )
        # A secret in the data folder is read at the first run, which knows the folder.
        self.in_data_dir = secret_in_data_dir(str(options["secret_file"]))
        self.secret = (
            b""
            if self.in_data_dir is not None
            else load_secret(_path(str(options["secret_file"]), project_file))
        )
        burned = dict(options.get("burned_in", {}))
        self.policy = BurnedInPolicy.from_mapping(burned)
        refs = list(self.policy.pixel_rulesets)
        paths = resolve_pixel_rulesets(refs, project_file.parent) if refs else []
        self.pixel_rules = load_pixel_rules(paths) if paths else None
        self.pseudonyms = dict(options.get("pseudonyms", {}))
        self.research_ids = (
            ResearchIds(self.pseudonyms, project_file)
            if self.pseudonyms.get("source") == "redcap"
            else None
        )
        self.verify_allow = tuple(options.get("verify_allow", []))

    def _exporter(self, ctx: RunContext, source: PseudonymSource | None = None) -> Exporter:
        """The run's exporter; ``source`` (REDCap's research ID) wins over the table."""
        table_source = self.pseudonyms.get("source", "table") == "table"
        if source is None and table_source and ctx.index is not None:
            table = PseudonymTable(
                ctx.index,
                ctx.project,
                prefix=str(self.pseudonyms.get("prefix", "SUBJ")),
                digits=int(self.pseudonyms.get("digits", 4)),
            )
            source = TablePseudonyms(table, preferred=ctx.subject)
        if not self.secret and self.in_data_dir is not None:
            self.secret = load_secret(ctx.data_dir / self.in_data_dir)
        deid = Deidentifier(self.profile, self.secret, source, ctx.project)
        return Exporter(deid, self.policy, self.pixel_rules, allow_kinds=self.verify_allow)

    def run(self, ctx: RunContext) -> Outcome:
        source: PseudonymSource | None = None
        if self.research_ids is not None:  # before any file: an outage or a hold stops here
            lookup = self.research_ids.source_for(ctx)
            if not isinstance(lookup, FixedPseudonym):
                return lookup
            source = lookup
        exporter = self._exporter(ctx, source)
        work = ctx.data_dir / "work" / ctx.project / f"run-{ctx.run_id}"
        found = ctx.state.get(DEIDENTIFIED)
        done: dict[str, Any] = dict(found) if isinstance(found, dict) else {"series": {}}
        held: Counter[str] = Counter()
        total = 0
        for series in ctx.selected_series():
            files: list[str] = []
            new_series = ""
            for path in series.files:
                total += 1
                result = exporter.export(path.read_bytes(), subject=ctx.subject, event=ctx.event)
                if not isinstance(result, Exported):
                    held[f"{result.reason}: {result.detail}"] += 1
                    continue
                target = (
                    work / result.study_uid / result.series_uid / f"{result.sop_instance_uid}.dcm"
                )
                write_durable(target, result.data)
                files.append(str(target.relative_to(ctx.data_dir)))
                done["study_uid"], new_series = result.study_uid, result.series_uid
            if files:
                done["series"][series.series_uid] = {"uid": new_series, "files": files}
        if held:
            first = next(iter(held)).split(":", 1)[0]
            summary = "; ".join(f"{n} x {why}" for why, n in held.most_common(3))
            return Quarantined(first, f"{sum(held.values())} of {total} files held: {summary}")
        if "study_uid" not in done:
            return Done("no series to de-identify")
        # What later steps' gates allow (a converter checks its sidecars the same way).
        done["allow_kinds"] = sorted(exporter.allow_kinds)
        done["keeps_dates"] = any(o.startswith(_DATE_OPTIONS) for o in self.profile.options)
        ctx.state[DEIDENTIFIED] = done
        return Done(f"{total} files de-identified")

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The profile, its options and overrides, the secret file and the burned-in policy."""
        issues = []
        for key, attempt in (
            (
                "options",
                lambda: load_profile(
                    _profile_ref(options, file),
                    list(options.get("options", [])),
                    dict(options.get("overrides", {})),
                ),
            ),
            ("secret_file", lambda: _check_secret(str(options["secret_file"]), file)),
            ("burned_in", lambda: _check_burned_in(dict(options.get("burned_in", {})))),
        ):
            try:
                attempt()
            except (ValueError, OSError) as exc:
                issues.append(ConfigIssue(file, None, format_path((*base_path, key)), str(exc)))
        pseudonyms = dict(options.get("pseudonyms", {}))
        if pseudonyms.get("source") == "redcap":
            where = (*base_path, "pseudonyms")
            missing = [k for k in ("field", "key") if k not in pseudonyms]
            if missing:
                found = " and ".join(f"'{k}'" for k in missing)
                message = f"source redcap needs 'field' and 'key'; {found} missing"
                issues.append(cls.issue(file, where, message))
            issues += require_redcap(file, (*where, "source"), "pseudonyms from redcap")[1]
        return issues
