"""``folder``: deliver studies into a local or mounted folder.

Options (``schemas/destinations/folder.schema.json``)::

    destinations:
      share:
        type: folder
        path: /mnt/research/incoming            # absolute, or relative to the project file
        study_layout: "{project}/{subject}/{study_uid}"
        layout: "{study_layout}/{series_uid}"

Files land at ``<path>/<layout>/<SOPInstanceUID>.dcm``, with ``MD5SUMS`` and ``manifest.json``
in the study folder (:mod:`engine.transfer.files`). Each file is copied to ``.<name>.part``
beside its final name, fsynced, renamed, and its folder fsynced before the instance is
confirmed, so a reader never sees half a file and a confirmed file survives a power cut. A file
already there is replaced by the same bytes (sending again is harmless). ``path`` itself must
exist: an unmounted share is a :class:`~engine.transfer.base.DeliveryError` (retried later),
never silently replaced by a folder on the local disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigIssue, format_path
from engine.store.fsio import ensure_dir, fsync_dir, write_durable
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
    FileEntry,
    Layout,
    Manifest,
    Placed,
    check_file_options,
    digest,
    part_name,
    why,
)

__all__ = ["FolderDestination", "existing_folder"]

#: Mode of delivered files before the umask: readers of the share decide through their umask.
FILE_MODE = 0o644


def existing_folder(path: Path, name: str) -> Path:
    """``path`` when it is a folder; DeliveryError otherwise (say, a share not mounted)."""
    if not path.is_dir():
        raise DeliveryError(f"destination {name}: the folder 'path' does not exist (not mounted?)")
    return path


def _copy(placed: Placed, target: Path) -> FileEntry:
    """Copy the instance's file to ``target`` by way of a temp name; durable on return."""
    ensure_dir(target.parent)
    tmp = target.parent / part_name(target.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        entry = digest(placed, lambda chunk: _write_all(fd, chunk))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return entry


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FolderDestination(Destination):
    """Copies each study below a folder (see the module doc)."""

    type = "folder"

    def __init__(self, name: str, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(name, options, project_file)
        self.root = resolve(project_file, str(options["path"]))
        self.layout = Layout.from_options(options)

    def send(self, batch: StudyBatch, already: frozenset[str], confirm: Confirm) -> None:
        plan = self.layout.plan(batch)
        plan.refuse(already, confirm)
        if not plan.files:
            return
        study = existing_folder(self.root, self.name) / plan.study
        entries = []
        try:
            for placed in plan.files:
                uid = placed.instance.sop_instance_uid
                if uid in already:
                    entries.append(digest(placed))
                    continue
                entries.append(_copy(placed, study / placed.path))
                confirm(InstanceResult(uid, True))
            self._write_manifest(study, batch, entries)
        except OSError as exc:
            raise DeliveryError(f"destination {self.name}: writing failed: {why(exc)}") from exc

    @staticmethod
    def _write_manifest(study: Path, batch: StudyBatch, entries: list[FileEntry]) -> None:
        """Merge ``entries`` into the study's manifest; manifest.json is written last."""
        try:
            data: bytes | None = (study / MANIFEST_JSON).read_bytes()
        except FileNotFoundError:
            data = None
        manifest = Manifest.read(data, batch).merged(entries)
        write_durable(study / MD5SUMS, manifest.md5sums(), mode=FILE_MODE)
        write_durable(study / MANIFEST_JSON, manifest.to_json(), mode=FILE_MODE)

    def verify(self, batch: StudyBatch) -> str | None:
        """The manifest lists the batch's files, and each file has the listed size."""
        plan = self.layout.plan(batch)
        study = self.root / plan.study
        try:
            manifest = Manifest.read((study / MANIFEST_JSON).read_bytes(), batch)
        except FileNotFoundError:
            return f"no {MANIFEST_JSON} in the study folder"
        except (OSError, DeliveryError) as exc:
            return why(exc)

        def size_at(path: str) -> int | None:
            try:
                return (study / path).stat().st_size
            except OSError:
                return None

        return manifest.problems(plan, size_at)

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The layouts; ``path`` must not be a file (a missing folder is checked at send)."""
        issues = check_file_options(options, file, base_path)
        root = resolve(file, str(options["path"]))
        if root.exists() and not root.is_dir():
            where = format_path((*base_path, "path"))
            message = f"expected a folder, found a file at {root}"
            issues.append(ConfigIssue(file, None, where, message))
        return issues
