"""A study's last export for a project, as a zip streamed to a coordinator (the web API's
``GET /api/v1/studies/{uid}/export?project=P&format=dicom|nifti|bids``).

What is downloaded is what the project's pipeline made and would deliver, read from the runs'
work folders (``<data>/work/<project>/run-<id>/``): the de-identified DICOM copies of the
``anonymize`` step (``format=dicom``; a study never de-identified has none: nothing identifying
is offered), or the files of a ``convert`` step of that format. Every finished run of the study
for the project counts (its first run and the follow-ups, later ones winning on a name), so the
zip matches what the destinations hold. Names inside the zip: ``<new study UID>/<new series
UID>/<SOP Instance UID>.dcm`` (dicom), ``<new study UID>/<convert step's names>`` (nifti),
``<project>-bids/<names in the dataset>`` (bids).

The zip is written while it is sent (members stored, zip64, data descriptors: nothing is built
in memory or on disk first). Runs whose work folder retention already removed make an
:class:`ExportError`.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.pipeline.context import DEIDENTIFIED
from engine.pipeline.steps.convert import CONVERTED
from engine.pipeline.store import RunState, RunStore
from engine.store.index import Index

__all__ = ["FORMATS", "ExportError", "ExportFile", "export_files", "zip_stream"]

#: The formats a study can be downloaded in.
FORMATS = ("dicom", "nifti", "bids")
#: Bytes read from a file at a time.
CHUNK = 1 << 20


class ExportError(Exception):
    """No export of the study in that format (the message says what to do; no PHI)."""


@dataclass(frozen=True)
class ExportFile:
    """One member of the zip: its name inside, and the file it is read from."""

    name: str
    path: Path


def export_files(
    index: Index, data_dir: Path, study_uid: str, project: str, fmt: str
) -> list[ExportFile]:
    """The files of the study's last export for ``project`` in ``fmt`` (see the module doc)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    runs = [
        r
        for r in RunStore(index).runs_for_study(study_uid)
        if r.project == project and r.state == RunState.DONE
    ]
    found: dict[str, Path] = {}
    for run in runs:
        state = run.step_state
        deidentified = state.get(DEIDENTIFIED)
        if not isinstance(deidentified, dict):
            continue
        export_uid = str(deidentified.get("study_uid", ""))
        if fmt == "dicom":
            for entry in deidentified.get("series", {}).values():
                for rel in entry.get("files", []):
                    name = f"{export_uid}/{entry['uid']}/{Path(str(rel)).name}"
                    found[name] = data_dir / str(rel)
            continue
        converted = state.get(CONVERTED)
        if not isinstance(converted, dict) or converted.get("format") != fmt:
            continue
        prefix = f"{project}-bids" if fmt == "bids" else export_uid
        for entry in converted.get("files", []):
            found[f"{prefix}/{entry['name']}"] = data_dir / str(entry["path"])
    if not found:
        needs = "an anonymize step" + ("" if fmt == "dicom" else f" and convert with format {fmt}")
        raise ExportError(
            f"project {project!r} has no finished {fmt} export of this study (the pipeline"
            f" needs {needs})"
        )
    missing = [name for name, path in found.items() if not path.is_file()]
    if missing:
        raise ExportError(
            f"{len(missing)} file(s) of the export are no longer in the work folder (retention"
            " removed them); run the study's pipeline again to export it"
        )
    return [ExportFile(name, found[name]) for name in sorted(found)]


class _Sink:
    """A write-only stream whose bytes are taken as they come (no tell: zipfile writes data
    descriptors)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None

    def take(self) -> Iterator[bytes]:
        chunks, self.chunks = self.chunks, []
        yield from chunks


def zip_stream(files: list[ExportFile]) -> Iterator[bytes]:
    """The zip of ``files``, chunk by chunk, as it is written."""
    sink = _Sink()
    when = time.localtime()[:6]
    stream: Any = sink  # write and flush: all zipfile needs of an unseekable stream
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for item in files:
            info = zipfile.ZipInfo(item.name, date_time=when)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member, item.path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    member.write(chunk)
                    yield from sink.take()
            yield from sink.take()
    yield from sink.take()
