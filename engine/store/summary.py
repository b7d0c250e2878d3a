"""Series summaries: the small JSON FIONA keeps beside each series, built from the index.

The summary aggregates over every instance of the series (not only the first): a field whose
value is the same everywhere is a scalar, one that varies is the list of its distinct values in
order of appearance, and slice positions are reduced to their range. It is written once a series
has been quiet for a moment, and again whenever a later instance arrives.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.store.db import IndexUnavailable
from engine.store.fsio import write_durable
from engine.store.index import Index

log = logging.getLogger(__name__)

#: Attributes summarised as a range (min, max) rather than a list of every value.
_RANGED = ("SliceLocation",)
#: Attributes that vary per instance by design and are summarised by first and last value.
_FIRST_LAST = ("ImagePositionPatient",)


def _distinct(values: list[Any]) -> Any:
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen[0] if len(seen) == 1 else seen


def aggregate(series: dict[str, Any]) -> dict[str, Any]:
    """The summary document for the index rows returned by ``Index.series_for_summary``."""
    instances = series["instances"]
    attrs: dict[str, list[Any]] = {}
    for inst in instances:
        for key, value in inst["attrs"].items():
            attrs.setdefault(key, []).append(value)
    summary: dict[str, Any] = {
        "PatientID": series["patient_id"],
        "PatientName": series["patient_name"],
        "PatientBirthDate": series["birth_date"],
        "PatientSex": series["sex"],
        "StudyInstanceUID": series["study_uid"],
        "SeriesInstanceUID": series["series_uid"],
        "AccessionNumber": series["accession_number"],
        "StudyDate": series["study_date"],
        "StudyTime": series["study_time"],
        "StudyDescription": series["study_description"],
        "SeriesDescription": series["series_description"],
        "SeriesNumber": series["series_number"],
        "Modality": series["modality"],
        "ClassifyType": series.get("labels", []),
        "NumFiles": len(instances),
        "SOPClassUID": _distinct([i["sop_class_uid"] for i in instances]),
        "TransferSyntaxUID": _distinct([i["transfer_syntax"] for i in instances]),
        "TotalBytes": sum(int(i["size"]) for i in instances),
        "InstanceNumberRange": _range([i["instance_number"] for i in instances]),
        "CallingAETitle": _distinct([i["calling_ae"] for i in instances]),
        "CalledAETitle": _distinct([i["called_ae"] for i in instances]),
        "PeerIP": _distinct([i["peer_ip"] for i in instances]),
        "FirstReceived": _iso(series["first_received_at"]),
        "LastReceived": _iso(series["last_received_at"]),
    }
    for key, values in sorted(attrs.items()):
        if key in _RANGED:
            summary[f"{key}Range"] = _range(values)
        elif key in _FIRST_LAST:
            summary[f"{key}First"], summary[f"{key}Last"] = values[0], values[-1]
        else:
            summary[key] = _distinct(values)
    return summary


def _range(values: list[Any]) -> list[Any] | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return [min(numbers), max(numbers)] if numbers else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def summary_path(data_dir: Path, study_uid: str, series_uid: str) -> Path:
    """``archive/<StudyUID>/<SeriesUID>.json`` (UIDs come from the index, validated on receipt)."""
    return data_dir / "archive" / study_uid / f"{series_uid}.json"


def write_summary(index: Index, data_dir: Path, series_uid: str) -> Path:
    """Write (or rewrite) one series' summary; return its path."""
    written_at = time.time()
    series = index.series_for_summary(series_uid)
    path = summary_path(data_dir, series["study_uid"], series_uid)
    write_durable(path, json.dumps(aggregate(series), indent=2, sort_keys=False).encode())
    index.mark_summary_written(series_uid, written_at)
    return path


def write_pending_summaries(index: Index, data_dir: Path, quiet_seconds: float = 2.0) -> int:
    """Write the summaries of every series quiet for ``quiet_seconds`` that changed; count them."""
    n = 0
    for series_uid in index.series_needing_summary(quiet_seconds):
        try:
            write_summary(index, data_dir, series_uid)
            n += 1
        except IndexUnavailable:
            raise
        except Exception:
            log.exception("could not write a series summary")
    return n
