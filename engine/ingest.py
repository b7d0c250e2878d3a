"""``fiona ingest``: import files from folders through the same path as network receipt.

A CD or USB copy holds Part 10 files, sometimes raw datasets without the Part 10 header, a
DICOMDIR and viewer software. Part 10 files are archived byte for byte; raw datasets get a file
meta header first; DICOMDIR files are skipped (they index the media, they are not instances);
anything else that fails goes to quarantine with its reason, like bad input from the network.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset

from engine.store.archive import Archive, Status, StoreOutcome
from engine.store.index import Origin

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
ORIGIN = Origin(via="ingest")


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


def ingest_file(archive: Archive, path: Path) -> StoreOutcome:
    """Archive one file; a DICOMDIR is reported as skipped."""
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
    return archive.receive(data, ORIGIN)


def run_ingest(args: argparse.Namespace) -> int:
    from engine.service import load_site_or_exit, open_store, setup_logging

    site = load_site_or_exit(args)
    if site is None:
        return 2
    setup_logging(site.log_level)
    missing = [p for p in args.paths if not p.exists()]
    for p in missing:
        print(f"error: {p}: no such file or folder", file=sys.stderr)
    if missing:
        return 2
    files = list(iter_files(args.paths))
    store = open_store(site)
    counts: Counter[str] = Counter()
    problems: list[tuple[Path, StoreOutcome]] = []
    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=4) as pool,
        tqdm(total=len(files), unit="file", disable=args.no_progress, file=sys.stderr) as bar,
    ):
        for path, outcome in zip(
            files, pool.map(lambda p: ingest_file(store.archive, p), files), strict=True
        ):
            counts[outcome.action] += 1
            if outcome.action in ("quarantined", "rejected"):
                problems.append((path, outcome))
            bar.update(1)
    from engine.store.summary import write_pending_summaries

    write_pending_summaries(store.index, site.data_dir, 0.0)
    store.close()
    print(f"{len(files)} files: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
    for path, outcome in problems:
        print(f"  {path}: {outcome.action} ({outcome.reason}: {outcome.detail})")
    return 1 if problems else 0
