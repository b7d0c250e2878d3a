"""What the file destinations (``folder``, ``zip``, ``sftp``) share: the layout and the manifest.

Layout. Two options place a study below the destination's root:

- ``study_layout`` (default ``{project}/{subject}/{study_uid}``): the study folder. It may use
  only study-level fields ({project}, {subject}, {event}, {study_uid}) and must use
  {study_uid}, so two studies never share a folder or a manifest.
- ``layout`` (default ``{study_layout}/{series_uid}``): the folder of each series. It must start
  with the study folder, written as ``{study_layout}`` or spelled out, so every file of the
  study lies below the study folder; ``{study_layout}`` alone puts the files in the study folder.

Each file is ``<series folder>/<SOPInstanceUID>.dcm``. A converted file (NIfTI, a sidecar) has
its own name from the convert step, below the study folder; a BIDS file below the dataset folder
instead (``dataset_layout``, default ``{project}-bids``, only {project}), whose manifest lists
every file of the dataset delivered there (study, subject and event left empty). A field value
that is not one safe path component (:func:`~engine.transfer.base.render_layout`) never reaches
a file system: the instances concerned are confirmed with ``ok`` False and the reason (the
outbox retries, then holds the study), and the others are delivered.

Manifest. The study folder holds ``MD5SUMS`` (``md5sum -c MD5SUMS`` checks it in that folder)
and ``manifest.json``: project, study UID, subject pseudonym, event and, per file, its path
below the study folder, size, MD5 and SHA-256, with totals. No other header value is in it.
Checksums are those of the local files, computed from the very bytes that are sent. A later
transfer of the same study (a follow-up, or a retry) reads the manifest back, adds or replaces
its own files, and rewrites it whole; the manifest is written after the study's files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.config.issues import ConfigIssue, format_path
from engine.transfer.base import (
    DeliveryError,
    InstanceResult,
    JsonPath,
    LayoutError,
    OutgoingInstance,
    StudyBatch,
    check_layout,
    render_layout,
)

__all__ = [
    "DEFAULT_SERIES_LAYOUT",
    "DEFAULT_STUDY_LAYOUT",
    "MANIFEST_JSON",
    "MD5SUMS",
    "FileEntry",
    "Layout",
    "Manifest",
    "Placed",
    "Plan",
    "check_file_options",
    "digest",
    "part_name",
    "why",
]

DEFAULT_STUDY_LAYOUT = "{project}/{subject}/{study_uid}"
DEFAULT_SERIES_LAYOUT = "{study_layout}/{series_uid}"
#: The folder of a project's BIDS dataset below a destination's root (``dataset_layout``).
DEFAULT_DATASET_LAYOUT = "{project}-bids"
#: Fields the dataset folder may use: the same for every study of the project.
DATASET_FIELDS = ("project",)
#: One part of a converted file's name (letters, digits, '.', '_', '-'; never '.' or '..').
_NAME_PART = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: Fields the study folder may use: the same for every instance of a study.
STUDY_FIELDS = ("project", "subject", "event", "study_uid")
MANIFEST_JSON = "manifest.json"
MD5SUMS = "MD5SUMS"
#: ``format`` of manifest.json; a reader refuses others rather than merge into them.
MANIFEST_FORMAT = "fiona-manifest/1"
#: Bytes read from a source file at a time.
CHUNK = 1 << 20

_FIELD = re.compile(r"\{([a-z_]+)\}")
#: A stand-in instance to render the study folder with (it uses no instance-level field).
_STUDY_ONLY = OutgoingInstance("", "", "", "", Path(), 0)


def why(exc: BaseException) -> str:
    """An error's reason without the file name an OSError carries (it is built from UIDs)."""
    if isinstance(exc, OSError) and (exc.strerror or exc.filename is not None):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


def part_name(name: str) -> str:
    """The temporary name a file is written under before it is renamed to ``name``."""
    return f".{name}.part"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Placed:
    """One instance with its path below the study folder (``<series folder>/<uid>.dcm``)."""

    instance: OutgoingInstance
    path: PurePosixPath


@dataclass(frozen=True)
class Plan:
    """Where a batch goes: the study folder below the root (a BIDS batch: the dataset
    folder), each placed instance, and the instances refused with the reason (a layout field
    that is not a safe path component). ``archive`` names the batch's zip archive."""

    study: PurePosixPath
    files: tuple[Placed, ...]
    refused: tuple[tuple[OutgoingInstance, str], ...]
    archive: PurePosixPath

    def refuse(self, already: frozenset[str], confirm: Callable[[InstanceResult], None]) -> None:
        """Confirm each refused instance not yet confirmed with ``ok`` False."""
        for instance, reason in self.refused:
            if instance.sop_instance_uid not in already:
                confirm(InstanceResult(instance.sop_instance_uid, False, detail=reason))


@dataclass(frozen=True)
class Layout:
    """The ``study_layout`` and ``layout`` options (see the module doc); constructing one
    validates them (ValueError naming the option)."""

    study: str
    series: str
    dataset: str = DEFAULT_DATASET_LAYOUT

    def __post_init__(self) -> None:
        problem = _layout_problem(self.study, self.series) or _dataset_problem(self.dataset)
        if problem:
            raise ValueError(f"{problem[0]}: {problem[1]}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Layout:
        study = str(options.get("study_layout", DEFAULT_STUDY_LAYOUT))
        series = str(options.get("layout", DEFAULT_SERIES_LAYOUT))
        dataset = str(options.get("dataset_layout", DEFAULT_DATASET_LAYOUT))
        return cls(study, _expand(series, study), dataset)

    def study_folder(self, batch: StudyBatch) -> PurePosixPath:
        """The study folder below the root (LayoutError when a value is unsafe)."""
        return render_layout(self.study, batch, _STUDY_ONLY)

    def plan(self, batch: StudyBatch) -> Plan:
        """Render every instance's path; unsafe values refuse instances, never raise."""
        try:
            if batch.dataset:
                study = render_layout(self.dataset, batch, _STUDY_ONLY)
            else:
                study = self.study_folder(batch)
        except LayoutError as exc:
            reason = f"layout: {exc}"
            held = tuple((i, reason) for i in batch.instances)
            return Plan(PurePosixPath(), (), held, PurePosixPath())
        files: list[Placed] = []
        refused: list[tuple[OutgoingInstance, str]] = []
        for instance in batch.instances:
            if instance.name:
                try:
                    files.append(Placed(instance, _file_name(instance.name)))
                except LayoutError as exc:
                    refused.append((instance, f"layout: {exc}"))
                continue
            try:
                folder = render_layout(self.series, batch, instance)
                name = render_layout("{sop_instance_uid}.dcm", batch, instance)
            except LayoutError as exc:
                refused.append((instance, f"layout: {exc}"))
                continue
            files.append(Placed(instance, folder.relative_to(study) / name))
        archive = study / batch.study_uid if batch.dataset else study
        return Plan(study, tuple(files), tuple(refused), archive)


def _file_name(name: str) -> PurePosixPath:
    """A converted file's relative path, each part one safe name (LayoutError otherwise)."""
    parts = name.split("/")
    if any(p in (".", "..") or not _NAME_PART.match(p) for p in parts):
        raise LayoutError("a converted file's name is not a safe relative path")
    return PurePosixPath(name)


def _dataset_problem(dataset: str) -> tuple[str, str] | None:
    """(option, message) when the ``dataset_layout`` template is not valid."""
    problem = check_layout(dataset)
    if problem:
        return ("dataset_layout", problem)
    fields = set(_FIELD.findall(dataset))
    if not fields <= set(DATASET_FIELDS):
        wrong = ", ".join(sorted(f"{{{f}}}" for f in fields - set(DATASET_FIELDS)))
        return ("dataset_layout", f"may use only {{project}} (it holds every study), found {wrong}")
    return None


def _expand(series: str, study: str) -> str:
    return series.replace("{study_layout}", study)


def _layout_problem(study: str, series: str) -> tuple[str, str] | None:
    """(option, message) of the first problem of the two templates (``series`` expanded)."""
    problem = check_layout(study)
    if problem:
        return ("study_layout", problem)
    fields = set(_FIELD.findall(study))
    if not fields <= set(STUDY_FIELDS):
        wrong = ", ".join(sorted(f"{{{f}}}" for f in fields - set(STUDY_FIELDS)))
        allowed = ", ".join(f"{{{f}}}" for f in STUDY_FIELDS)
        return ("study_layout", f"may use only {allowed} (it holds every series), found {wrong}")
    if "study_uid" not in fields:
        return ("study_layout", "expected {study_uid} in it, so studies never share a folder")
    problem = check_layout(series)
    if problem:
        return ("layout", problem)
    if series != study and not series.startswith(study + "/"):
        first = f"'{{study_layout}}/...' or '{study}/...'"
        return ("layout", f"expected the study folder first ({first}), found '{series}'")
    return None


def check_file_options(
    options: Mapping[str, Any], file: Path, base_path: JsonPath
) -> list[ConfigIssue]:
    """Issues of the layout options every file destination has."""
    study = str(options.get("study_layout", DEFAULT_STUDY_LAYOUT))
    series = _expand(str(options.get("layout", DEFAULT_SERIES_LAYOUT)), study)
    dataset = str(options.get("dataset_layout", DEFAULT_DATASET_LAYOUT))
    problem = _layout_problem(study, series) or _dataset_problem(dataset)
    if problem is None:
        return []
    return [ConfigIssue(file, None, format_path((*base_path, problem[0])), problem[1])]


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest: its path below the study folder, size (bytes) and digests."""

    path: str
    size: int
    md5: str
    sha256: str


def digest(placed: Placed, write: Callable[[bytes], object] | None = None) -> FileEntry:
    """Read the instance's local file once, handing each chunk to ``write`` (the upload or
    copy), and return its entry: the checksums are of exactly the bytes written."""
    md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
    with placed.instance.path.open("rb") as src:
        while chunk := src.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
            if write is not None:
                write(chunk)
    return FileEntry(str(placed.path), size, md5.hexdigest(), sha256.hexdigest())


@dataclass(frozen=True)
class Manifest:
    """The files of one study at a destination (``manifest.json`` and ``MD5SUMS``)."""

    project: str
    study_uid: str
    subject: str
    event: str
    files: tuple[FileEntry, ...] = ()

    @classmethod
    def of(cls, batch: StudyBatch, entries: Iterable[FileEntry] = ()) -> Manifest:
        """The manifest of the batch's study folder; of a BIDS batch, the dataset's (study,
        subject and event empty: it lists the files of every study)."""
        if batch.dataset:
            return cls(batch.project, "", "", "", tuple(entries))
        return cls(batch.project, batch.study_uid, batch.subject, batch.event, tuple(entries))

    def merged(self, entries: Iterable[FileEntry]) -> Manifest:
        """This manifest with ``entries`` added (an entry for the same path is replaced)."""
        by_path = {e.path: e for e in self.files}
        by_path.update({e.path: e for e in entries})
        files = tuple(by_path[p] for p in sorted(by_path))
        return Manifest(self.project, self.study_uid, self.subject, self.event, files)

    def to_json(self) -> bytes:
        files = sorted(self.files, key=lambda e: e.path)
        doc = {
            "format": MANIFEST_FORMAT,
            "project": self.project,
            "study_uid": self.study_uid,
            "subject": self.subject,
            "event": self.event,
            "file_count": len(files),
            "total_bytes": sum(e.size for e in files),
            "files": [vars(e) for e in files],
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def md5sums(self) -> bytes:
        """``md5sum`` output for the files: ``<md5>  <path>`` per line, sorted by path."""
        lines = (f"{e.md5}  {e.path}\n" for e in sorted(self.files, key=lambda e: e.path))
        return "".join(lines).encode()

    @classmethod
    def read(cls, data: bytes | None, batch: StudyBatch) -> Manifest:
        """The manifest in ``data`` (an empty one of ``batch`` when None); DeliveryError when
        it is not a fiona manifest of this study, rather than lose what it lists."""
        if data is None:
            return cls.of(batch)
        try:
            doc = json.loads(data)
            owner = "" if batch.dataset else batch.study_uid
            if doc.get("format") != MANIFEST_FORMAT or doc.get("study_uid") != owner:
                raise ValueError("another format or study")
            files = [
                FileEntry(str(f["path"]), int(f["size"]), str(f["md5"]), str(f["sha256"]))
                for f in doc["files"]
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DeliveryError(
                f"the {MANIFEST_JSON} in the study folder is not a fiona manifest of this study;"
                " move it away to deliver again"
            ) from exc
        return cls.of(batch, files)

    def problems(self, plan: Plan, size_at: Callable[[str], int | None]) -> str | None:
        """Why the destination does not hold ``plan``'s files as listed (None when it does).

        ``size_at`` gives the size of a file at the destination by its path below the study
        folder (None when missing). Only the batch's files are checked: files of earlier
        transfers may have been taken away by their readers since.
        """
        listed = {e.path: e for e in self.files}
        unlisted = [p for p in plan.files if str(p.path) not in listed]
        wrong = [
            p
            for p in plan.files
            if str(p.path) in listed and size_at(str(p.path)) != listed[str(p.path)].size
        ]
        if not unlisted and not wrong:
            return None
        parts = [f"{len(unlisted)} file(s) not in {MANIFEST_JSON}"] if unlisted else []
        parts += [f"{len(wrong)} file(s) missing or of another size"] if wrong else []
        return "; ".join(parts)
