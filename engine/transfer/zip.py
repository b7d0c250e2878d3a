"""``zip``: deliver each transfer as one zip archive in a folder.

Options (``schemas/destinations/zip.schema.json``)::

    destinations:
      outbox:
        type: zip
        path: /mnt/research/archives            # absolute, or relative to the project file
        study_layout: "{project}/{subject}/{study_uid}"
        layout: "{study_layout}/{series_uid}"

The archive of a study is ``<path>/<study folder with '/' as '_'>.zip``
(``proj_SUBJ0001_1.2.3.zip``); a follow-up transfer gets its own archive,
``..._followup<N>.zip``; a BIDS transfer's archive is named after the dataset folder and the
study (``proj-bids_<StudyInstanceUID>.zip``), its files below the dataset folder. Inside, files
sit at their layout paths (unzipping in one place gives the tree a ``folder`` destination
would), with ``MD5SUMS`` and ``manifest.json`` in the study folder listing that archive's files
only. Members are stored, not deflated: DICOM pixel data is mostly already compressed or noise-
like and gains little, while deflate costs much CPU; zip64 is used where a member or the archive
needs it.

An archive is written whole, as ``.<name>.part``, fsynced and renamed, and only then are its
instances confirmed. It holds every instance of the transfer, confirmed or not, so a retry
after a crash between the rename and the last confirmation replaces it with the same content;
a transfer whose instances are all confirmed writes nothing (its archive may have been
collected already).
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from engine.config.issues import ConfigIssue
from engine.store.fsio import fsync_dir
from engine.transfer.base import (
    Confirm,
    DeliveryError,
    Destination,
    InstanceResult,
    JsonPath,
    StudyBatch,
    resolve,
)
from engine.transfer.files import (
    MANIFEST_JSON,
    MD5SUMS,
    Layout,
    Manifest,
    Plan,
    digest,
    part_name,
    why,
)
from engine.transfer.folder import FolderDestination, existing_folder

__all__ = ["ZipDestination", "archive_name"]

#: Unix mode recorded for members (``unzip`` applies it): readable by all, like a copy.
_MEMBER_MODE = 0o644 << 16


def archive_name(study: PurePosixPath, follow_up: int) -> str:
    """``<study folder with '/' as '_'>[_followup<N>].zip``."""
    stem = str(study).replace("/", "_")
    return f"{stem}_followup{follow_up}.zip" if follow_up else f"{stem}.zip"


def _member(name: str, when: tuple[int, int, int, int, int, int], size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=when)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = _MEMBER_MODE
    # Known up front, so zipfile writes zip64 headers exactly for members that need them.
    info.file_size = size
    return info


def _write_archive(out: Path, plan: Plan, batch: StudyBatch) -> None:
    """The archive of ``plan`` at ``out``: every file, then MD5SUMS and manifest.json."""
    when = time.localtime()[:6]
    entries = []
    with out.open("wb") as raw:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for placed in plan.files:
                size = placed.instance.path.stat().st_size
                member = _member(str(plan.study / placed.path), when, size)
                with archive.open(member, "w") as dst:
                    entries.append(digest(placed, dst.write))
            manifest = Manifest.of(batch, entries)
            for name, data in ((MD5SUMS, manifest.md5sums()), (MANIFEST_JSON, manifest.to_json())):
                archive.writestr(_member(str(plan.study / name), when, len(data)), data)
        raw.flush()
        os.fsync(raw.fileno())


class ZipDestination(Destination):
    """Writes one zip archive per transfer (see the module doc)."""

    type = "zip"

    def __init__(self, name: str, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(name, options, project_file)
        self.root = resolve(project_file, str(options["path"]))
        self.layout = Layout.from_options(options)

    def send(self, batch: StudyBatch, already: frozenset[str], confirm: Confirm) -> None:
        plan = self.layout.plan(batch)
        plan.refuse(already, confirm)
        pending = [p for p in plan.files if p.instance.sop_instance_uid not in already]
        if not pending:
            return
        folder = existing_folder(self.root, self.name)
        target = folder / archive_name(plan.archive, batch.follow_up)
        tmp = folder / part_name(target.name)
        try:
            _write_archive(tmp, plan, batch)
            os.replace(tmp, target)
            fsync_dir(folder)
        except OSError as exc:
            raise DeliveryError(f"destination {self.name}: writing failed: {why(exc)}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        for placed in pending:
            confirm(InstanceResult(placed.instance.sop_instance_uid, True))

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The layouts; ``path`` must not be a file."""
        return FolderDestination.check(options, file, base_path)
