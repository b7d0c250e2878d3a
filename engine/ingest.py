"""``fiona ingest``: import files from folders through the same path as network receipt.

A CD or USB copy holds Part 10 files, sometimes raw datasets without the Part 10 header, a
DICOMDIR and viewer software. Part 10 files are archived byte for byte; raw datasets get a file
meta header first; DICOMDIR files are skipped (they index the media, they are not instances);
anything else that fails goes to quarantine with its reason, like bad input from the network.

Routing treats ingested instances like received ones: each is recorded with the AE titles the
operator gives (``--called-ae``, default our own AE title; ``--calling-ae``, default none) and
no peer address, so a project's ``routing.called_ae``/``calling_ae`` criteria apply. With
``--project`` the studies are given to that project whatever its criteria (see
:mod:`engine.route.assign`), with the ``--subject`` and ``--event`` a coupling list would give.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset

from engine.config.model import SiteConfig
from engine.dicom.header import HeaderError, parse_header
from engine.projects import load_projects
from engine.route.assign import assign_study
from engine.service import open_store, setup_logging
from engine.store.archive import Archive, Status, StoreOutcome
from engine.store.commands import load_site_or_exit
from engine.store.index import Index, Origin
from engine.store.summary import write_pending_summaries

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
ORIGIN = Origin(via="ingest")
#: An AE title: 1-16 printable ASCII characters, no backslash, not only spaces (PS3.5 6.2).
_AE_TITLE = re.compile(r"(?=.*[^ ])[\x20-\x5b\x5d-\x7e]{1,16}")


@dataclass
class Assignment:
    """``--project``: every study met is given to ``project`` before its first instance is
    archived (thread-safe: the ingest runs on several threads)."""

    index: Index
    project: str
    subject: str = ""
    event: str = ""
    studies: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, data: bytes) -> None:
        """Assign the study of ``data`` (Part 10 bytes) if it is new to this ingest; a file
        whose header cannot be read is left to the archive, which quarantines it."""
        try:
            study_uid = parse_header(data).study_uid
        except HeaderError:
            return
        with self._lock:
            if study_uid in self.studies:
                return
            assign_study(
                self.index, study_uid, self.project, subject=self.subject, event=self.event
            )
            self.studies.add(study_uid)


def iter_files(paths: list[Path]) -> Iterator[Path]:
    """Every regular file under ``paths`` (recursively, sorted, symlinks not followed)."""
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not child.is_symlink():
                    yield child


def as_part10(data: bytes) -> bytes | None:
    """Part 10 bytes for a raw dataset (no preamble/DICM), or None if it is not one."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        sop_class, sop_uid = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
        if not sop_class or not sop_uid:
            return None
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if ds.original_encoding[0]
            else pydicom.uid.ExplicitVRLittleEndian
        )
        ds.file_meta = meta
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    except Exception:
        return None


def ingest_file(
    archive: Archive,
    path: Path,
    origin: Origin = ORIGIN,
    assignment: Assignment | None = None,
) -> StoreOutcome:
    """Archive one file as coming from ``origin``; a DICOMDIR is reported as skipped."""
    size = path.stat().st_size
    if size > archive.max_instance_bytes:
        # Refused before reading: a huge file (a viewer's installer, a video) must not be loaded.
        detail = f"{size} bytes exceeds limits.max_instance_mb"
        return StoreOutcome("rejected", Status.OUT_OF_RESOURCES, "too_large", detail)
    data = path.read_bytes()
    if data[128:132] == b"DICM":
        if MEDIA_STORAGE_DIRECTORY.encode() in data[132:512]:
            return StoreOutcome("skipped", Status.SUCCESS, "dicomdir", "media directory")
    else:
        data = as_part10(data) or data
    if assignment is not None:
        try:
            assignment.before(data)
        except Exception as exc:  # the index is busy or broken: not archived unassigned
            log.error(
                "could not assign a study to project %s: %s", assignment.project, type(exc).__name__
            )
            detail = f"could not assign the study: {type(exc).__name__}"
            return StoreOutcome("rejected", Status.OUT_OF_RESOURCES, "out_of_resources", detail)
    return archive.receive(data, origin)


def _origin(args: argparse.Namespace, site: SiteConfig) -> Origin:
    """The origin recorded for every ingested instance: no peer address, the AE titles given."""
    called = site.ae_title if args.called_ae is None else args.called_ae
    return Origin("ingest", (args.calling_ae or "").strip(), called.strip(), "")


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the routing options (one message), or None."""
    if (args.subject or args.event) and not args.project:
        return "--subject and --event need --project (the project the studies are for)"
    for option, value in (("--called-ae", args.called_ae), ("--calling-ae", args.calling_ae)):
        if value is not None and not _AE_TITLE.fullmatch(value):
            return (
                f"{option}: expected an AE title (1-16 printable ASCII characters,"
                " no backslash, not only spaces)"
            )
    return None


def _check_project(site: SiteConfig, name: str) -> str | None:
    """Why ``--project name`` cannot take studies (one message), or None when it can."""
    projects, _issues = load_projects(site.projects_dir)
    found = next((p for p in projects if p.name == name), None)
    if found is None:
        return (
            f"--project {name}: no valid project of that name in {site.projects_dir}"
            f" (fiona validate {site.projects_dir} lists the projects and their errors)"
        )
    if not found.enabled:
        return f"--project {name}: the project is disabled (enabled: false in {found.source})"
    return None


def run_ingest(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    setup_logging(site.log_level)
    problem = _check_args(args) or (args.project and _check_project(site, args.project))
    if problem:
        print(f"fiona: {problem}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths if not p.exists()]
    for p in missing:
        print(f"error: {p}: no such file or folder", file=sys.stderr)
    if missing:
        return 2
    files = list(iter_files(args.paths))
    store = open_store(site)
    origin = _origin(args, site)
    assignment = None
    if args.project:
        assignment = Assignment(store.index, args.project, args.subject or "", args.event or "")
    counts: Counter[str] = Counter()
    problems: list[tuple[Path, StoreOutcome]] = []
    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=4) as pool,
        tqdm(total=len(files), unit="file", disable=args.no_progress, file=sys.stderr) as bar,
    ):
        for path, outcome in zip(
            files,
            pool.map(lambda p: ingest_file(store.archive, p, origin, assignment), files),
            strict=True,
        ):
            counts[outcome.action] += 1
            if outcome.action in ("quarantined", "rejected"):
                problems.append((path, outcome))
            bar.update(1)
    write_pending_summaries(store.index, site.data_dir, 0.0)
    store.close()
    print(f"{len(files)} files: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    if assignment is not None:
        n = len(assignment.studies)
        print(f"{n} {'study' if n == 1 else 'studies'} assigned to project {assignment.project}")
    for path, outcome in problems:
        print(f"  {path}: {outcome.action} ({outcome.reason}: {outcome.detail})")
    return 1 if problems else 0
