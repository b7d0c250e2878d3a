"""Retrieval lists: the CSV a coordinator gives ``fiona retrieve NAME --list FILE.csv``.

One row per line after a header. Columns (names case-insensitive, order free): ``accession``,
``study_uid``, ``patient_id`` with ``study_date`` (a range, ``FROM-TO``), and optionally
``project``, ``subject``, ``event`` (who the retrieved studies go to, as a coupling-list entry)
and ``modality``, ``series_description`` (which series to fetch; wildcards ``*`` ``?``).
Every problem is reported as ``FILE:LINE column: message``; a list with any is not queued.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from engine.retrieve.query import BadFilter, date_range
from engine.store.retrievals import RowSpec

#: Accepted header names -> the RowSpec field.
COLUMNS = {
    "accession": "accession",
    "accession_number": "accession",
    "accessionnumber": "accession",
    "study_uid": "study_uid",
    "studyinstanceuid": "study_uid",
    "patient_id": "patient_id",
    "patientid": "patient_id",
    "study_date": "study_date",
    "studydate": "study_date",
    "project": "project",
    "subject": "subject",
    "event": "event",
    "modality": "modality",
    "series_description": "series_description",
    "seriesdescription": "series_description",
}
MAX_ROWS = 100_000


class ListError(ValueError):
    """The list cannot be queued; ``problems`` are ``FILE:LINE column: message`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def read_list(path: Path) -> list[RowSpec]:
    """The rows of the list at ``path``; raises :class:`ListError` with every problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ListError([f"{path}: cannot read the list ({exc})"]) from exc
    return parse_list(text, path)


def parse_list(text: str, path: Path | str) -> list[RowSpec]:
    """The rows of a list's CSV ``text``; messages name ``path`` (the file, or the name of an
    uploaded one); raises :class:`ListError` with every problem."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise ListError([f"{path}:1: expected a header line naming the columns"])
    problems: list[str] = []
    fields = []
    for name in header:
        key = name.strip().lower().replace(" ", "_")
        if key not in COLUMNS:
            problems.append(
                f"{path}:1 {name.strip()!r}: unknown column; expected some of accession,"
                " study_uid, patient_id, study_date, project, subject, event, modality,"
                " series_description"
            )
        fields.append(COLUMNS.get(key, ""))
    if problems:
        raise ListError(problems)
    rows: list[RowSpec] = []
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        row = {f: v.strip() for f, v in zip(fields, values, strict=False) if f}
        problems += _row_problems(path, line, row)
        if not problems:  # the date checked by _row_problems
            row["study_date"] = date_range(row.get("study_date", ""))
            row["modality"] = row.get("modality", "").upper()
            rows.append(RowSpec(line=line, **row))
        if len(rows) > MAX_ROWS:
            raise ListError([f"{path}: more than {MAX_ROWS} rows; split the list"])
    if not rows and not problems:
        problems.append(f"{path}: no rows after the header")
    if problems:
        raise ListError(problems)
    return rows


def _row_problems(path: Path | str, line: int, row: dict[str, str]) -> list[str]:
    out = []
    if not (row.get("accession") or row.get("study_uid") or row.get("patient_id")):
        out.append(f"{path}:{line}: expected an accession, a study_uid or a patient_id")
    by_patient = not (row.get("accession") or row.get("study_uid"))
    if row.get("patient_id") and by_patient and not row.get("study_date"):
        out.append(
            f"{path}:{line} study_date: a patient_id needs a study_date range (FROM-TO),"
            " or the PACS is asked for every study of the patient"
        )
    try:
        date_range(row.get("study_date", ""))
    except BadFilter as exc:
        out.append(f"{path}:{line} study_date: {exc}")
    return out
