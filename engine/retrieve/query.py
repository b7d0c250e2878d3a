"""``fiona query``: Study Root C-FIND at study or series level, as rows for the operator.

A series-level query is hierarchical (PS3.4 C.4.1.2.1), as strict peers (dcmtk's dcmqrscp)
demand: the study-level query finds the studies, then one series-level query per study asks
for its series with the Study Instance UID (0020,000D) as the unique key of the level above.
Filters a peer does not match on at study level (Modalities in Study (0008,0061) on some) are
applied again to what comes back, so a loose peer never widens the answer.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset

from engine.net.scu import ScuAssociation

_DATE = re.compile(r"(\d{8})?(-)?(\d{8})?")
_ISO = re.compile(r"\d{4}-\d\d-\d\d")


class Level(StrEnum):
    """Query/Retrieve Level (0008,0052) of the answer rows."""

    STUDY = "study"
    SERIES = "series"


class BadFilter(ValueError):
    """A filter given on the command line cannot be used (the message says why; no PHI)."""


@dataclass(frozen=True)
class Filters:
    """What to match; empty means any. Text filters may hold DICOM wildcards ``*`` and ``?``
    (PS3.4 C.2.2.2.4); ``study_date`` is ``YYYYMMDD``, ``FROM-TO``, ``FROM-`` or ``-TO``."""

    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    modality: str = ""
    study_description: str = ""

    def checked(self) -> Filters:
        """The filters with the date range normalised (``2023-01-01`` forms accepted);
        raises :class:`BadFilter`."""
        return Filters(
            self.patient_id.strip(),
            self.accession.strip(),
            date_range(self.study_date),
            self.modality.strip().upper(),
            self.study_description.strip(),
        )


def date_range(text: str) -> str:
    """A DICOM date range for Study Date (0008,0020) from what an operator types:
    ``YYYYMMDD``, ``FROM-TO``, ``FROM-`` or ``-TO``; ISO dates (``2023-01-31``) alone or as
    ``FROM..TO`` (either end may be left off). Raises :class:`BadFilter`."""
    text = text.strip()
    if not text:
        return ""
    if ".." in text or _ISO.fullmatch(text):
        first, dots, last = text.partition("..")
        first, last = first.replace("-", ""), (last if dots else first).replace("-", "")
        text = first if first == last else f"{first}-{last}"
    m = _DATE.fullmatch(text)
    if m is None or not (m[1] or m[3]) or (m[1] and m[3] and not m[2]):
        raise BadFilter(
            "expected a study date YYYYMMDD or a range FROM-TO (either end may be left off),"
            f" found {text!r}"
        )
    for day in (m[1], m[3]):
        if day:
            try:
                dt.datetime.strptime(day, "%Y%m%d")
            except ValueError as exc:
                raise BadFilter(f"not a date: {day}") from exc
    if m[1] and m[3] and m[1] > m[3]:
        raise BadFilter(f"the date range ends before it starts: {text}")
    return text


#: Study-level return keys, in the order of the table (keyword, column heading).
STUDY_KEYS = (
    ("PatientID", "patient ID"),
    ("PatientName", "patient name"),
    ("PatientBirthDate", "birth date"),
    ("StudyDate", "date"),
    ("AccessionNumber", "accession"),
    ("ModalitiesInStudy", "modalities"),
    ("StudyDescription", "description"),
    ("NumberOfStudyRelatedSeries", "series"),
    ("NumberOfStudyRelatedInstances", "instances"),
    ("StudyInstanceUID", "study UID"),
)
SERIES_KEYS = (
    ("PatientID", "patient ID"),
    ("AccessionNumber", "accession"),
    ("SeriesNumber", "#"),
    ("Modality", "modality"),
    ("SeriesDescription", "description"),
    ("NumberOfSeriesRelatedInstances", "instances"),
    ("StudyInstanceUID", "study UID"),
    ("SeriesInstanceUID", "series UID"),
)
#: Keys of the PHI the operator sees in the table and that never goes to a log.
PATIENT_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"})


def study_identifier(filters: Filters) -> Dataset:
    """The study-level C-FIND identifier: the filters as matching keys, the rest as return
    keys (empty)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = ""
    ds.PatientID = filters.patient_id
    ds.PatientBirthDate = ""
    ds.StudyDate = filters.study_date
    ds.StudyTime = ""
    ds.AccessionNumber = filters.accession
    ds.ModalitiesInStudy = filters.modality
    ds.StudyDescription = filters.study_description
    ds.NumberOfStudyRelatedSeries = None
    ds.NumberOfStudyRelatedInstances = None
    ds.StudyInstanceUID = ""
    return ds


def series_identifier(study_uid: str, modality: str) -> Dataset:
    """The series-level identifier for one study (its UID the unique key of the level
    above)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.SeriesNumber = None
    ds.Modality = modality
    ds.SeriesDescription = ""
    ds.NumberOfSeriesRelatedInstances = None
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def matches(pattern: str, value: str) -> bool:
    """DICOM wildcard matching, case-sensitive as PS3.4 C.2.2.2.4 (``*``, ``?``)."""
    if not pattern:
        return True
    glob = pattern.replace("[", "[[]")
    return fnmatch.fnmatchcase(value, glob)


def _study_row(ds: Dataset) -> dict[str, str]:
    return {key: _text(ds, key) for key, _ in STUDY_KEYS}


def _keep_study(row: dict[str, str], filters: Filters) -> bool:
    """Filters checked again on a study row, where the peer answered the key: a peer that
    ignores Modalities in Study would otherwise return every study."""
    modalities = row.get("ModalitiesInStudy", "")
    if filters.modality and modalities:
        wanted = filters.modality
        if not any(matches(wanted, m) for m in modalities.split("\\")):
            return False
    return True


def find_studies(assoc: ScuAssociation, filters: Filters) -> list[dict[str, str]] | str:
    """Study rows matching ``filters`` (keyword -> text), or why the peer gave none."""
    found = assoc.find(study_identifier(filters))
    if isinstance(found, str):
        return found
    rows = [_study_row(ds) for ds in found]
    kept = [row for row in rows if row["StudyInstanceUID"] and _keep_study(row, filters)]
    if not filters.modality or all(row["ModalitiesInStudy"] for row in kept):
        return kept
    # The peer does not answer Modalities in Study, so it may not have matched on it either:
    # a study is kept when one of its series has the modality.
    out = []
    for row in kept:
        if not row["ModalitiesInStudy"]:
            series = find_series(assoc, [row], filters)
            if isinstance(series, str):
                return series
            if not series:
                continue
            row["ModalitiesInStudy"] = "\\".join(sorted({s["Modality"] for s in series}))
        out.append(row)
    return out


def find_series(
    assoc: ScuAssociation, studies: Sequence[dict[str, str]], filters: Filters
) -> list[dict[str, str]] | str:
    """Series rows of ``studies`` (modality filtered), each with its study's patient ID and
    accession number; or why the peer gave none."""
    rows: list[dict[str, str]] = []
    for study in studies:
        found = assoc.find(series_identifier(study["StudyInstanceUID"], filters.modality))
        if isinstance(found, str):
            return found
        for ds in found:
            row = {key: _text(ds, key) for key, _ in SERIES_KEYS}
            row["PatientID"] = study["PatientID"]
            row["AccessionNumber"] = study["AccessionNumber"]
            row["StudyInstanceUID"] = study["StudyInstanceUID"]
            if row["SeriesInstanceUID"] and matches(filters.modality, row["Modality"]):
                rows.append(row)
    rows.sort(key=lambda r: (r["StudyInstanceUID"], _number(r["SeriesNumber"])))
    return rows


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1 << 30


def query(assoc: ScuAssociation, filters: Filters, level: Level) -> list[dict[str, str]] | str:
    """What ``fiona query`` prints: study or series rows, or why there are none."""
    studies = find_studies(assoc, filters)
    if isinstance(studies, str) or level is Level.STUDY:
        return studies
    return find_series(assoc, studies, filters)
