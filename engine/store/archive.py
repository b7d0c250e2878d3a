"""The archive: the one code path by which an instance becomes durable, for network and ingest.

Layout under the data dir (FIONA's, with symlink views that are relative so the folder can move):

- ``archive/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``: the files as received;
- ``archive/<StudyUID>/<SeriesUID>.json``: the series summary (see :mod:`engine.store.summary`);
- ``raw/<StudyUID>`` -> ``archive/<StudyUID>``: the study/series view;
- ``participants/<PatientID>/<StudyDate>_<StudyTime>`` -> ``archive/<StudyUID>``;
- ``quarantine/``: see :mod:`engine.store.quarantine`.

Only UIDs checked by :func:`engine.dicom.uids.is_valid_uid` become path components; the Patient
ID is reduced to a safe name first (see :func:`safe_component`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from engine.config.model import DuplicatePolicy
from engine.dicom.header import HeaderError, InstanceHeader, parse_header
from engine.store.db import IndexUnavailable
from engine.store.fsio import ensure_dir, write_durable
from engine.store.index import Index, Origin
from engine.store.outage import OUTAGE
from engine.store.quarantine import Quarantine, Reason
from engine.store.uid_locks import UidLocks

log = logging.getLogger(__name__)


class Status(IntEnum):
    """DIMSE C-STORE status codes the receiver answers with (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one instance: ``action`` for summaries, ``status`` for the sender."""

    action: str  # stored | duplicate | replaced | kept_first | quarantined | rejected
    status: Status
    reason: str = ""
    detail: str = ""


_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]")


def safe_component(text: str, *, empty: str = "UNKNOWN") -> str:
    """A file-name-safe form of a free-text header value.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; when anything had to change, a short hash
    of the original is appended so two different values never share a folder.
    """
    cleaned = _SAFE_RE.sub("_", text.strip())[:48].lstrip(".")
    if not cleaned:
        cleaned = empty
    if cleaned != text:
        cleaned += "-" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:8]
    return cleaned


class Archive:
    """Files instances durably, indexes them, and keeps the views; quarantines what fails.

    ``receive`` returns only after the bytes are fsynced, renamed into place and committed to the
    index (or quarantined the same way); its ``status`` is what a C-STORE should answer.
    """

    def __init__(
        self,
        data_dir: Path,
        index: Index,
        *,
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST,
        min_free_disk_mb: int = 0,
        max_instance_mb: int = 4096,
    ) -> None:
        self.data_dir = data_dir
        self._root = str(data_dir)
        self.index = index
        self.quarantine = Quarantine(data_dir, index)
        self.duplicate_policy = DuplicatePolicy(duplicate_policy)
        self.min_free_bytes = min_free_disk_mb * 1024 * 1024
        self.max_instance_bytes = max_instance_mb * 1024 * 1024
        for sub in ("archive", "raw", "participants", "quarantine"):
            ensure_dir(data_dir / sub)
        # Two associations sending the same SOP Instance UID must not race, in this process
        # nor in another receiving into the same folder.
        self._uid_locks = UidLocks(data_dir / UID_LOCK_FILE)

    # -- public -----------------------------------------------------------------------------

    def receive(
        self, data: bytes, origin: Origin, expected: tuple[str, str] | None = None
    ) -> StoreOutcome:
        """File one Part 10 instance (preamble, meta, dataset) held in memory.

        ``expected``: for a C-STORE, the negotiated SOP Class UID (the presentation context's
        abstract syntax) and the command's Affected SOP Instance UID (0000,1000); a dataset
        whose (0008,0016) or (0008,0018) differs is quarantined and answered 0xA900.
        """
        try:
            self._check_resources(len(data))
        except _NoResources as exc:
            log.error("refused instance from %s: %s", origin.calling_ae or origin.via, exc)
            return StoreOutcome("rejected", Status.OUT_OF_RESOURCES, "out_of_resources", str(exc))
        try:
            header = parse_header(data)
            if expected is not None:
                _check_expected(header, expected)
        except HeaderError as exc:
            return self._quarantine(data, exc, origin)
        try:
            with self._uid_locks.hold(header.sop_instance_uid):
                return self._file(data, header, origin)
        except OSError as exc:
            log.error("could not store instance: %s", _os_error_text(exc))
            return StoreOutcome(
                "rejected", Status.OUT_OF_RESOURCES, "out_of_resources", _os_error_text(exc)
            )
        except IndexUnavailable as exc:  # not acknowledged (the file stays, see _file): try again
            OUTAGE.went_away(exc)
            return StoreOutcome(
                "rejected", Status.OUT_OF_RESOURCES, "index_unavailable", "index unavailable"
            )
        except Exception as exc:
            log.exception("could not index instance")
            return StoreOutcome(
                "rejected", Status.OUT_OF_RESOURCES, "out_of_resources", type(exc).__name__
            )

    def close(self) -> None:
        """Close the UID locks' file (the index is closed by its owner)."""
        self._uid_locks.close()

    def instance_path(self, header: InstanceHeader) -> Path:
        """Where an instance lives; the header's UIDs were validated by ``parse_header``."""
        return self.data_dir / _instance_rel(header)

    # -- internals --------------------------------------------------------------------------

    def _check_resources(self, size: int) -> None:
        if size > self.max_instance_bytes:
            raise _NoResources(f"instance of {size} bytes exceeds limits.max_instance_mb")
        if self.min_free_bytes:
            st = os.statvfs(self._root)
            if st.f_bavail * st.f_frsize - size < self.min_free_bytes:
                raise _NoResources("free disk space below limits.min_free_disk_mb")

    def _quarantine(self, data: bytes, exc: HeaderError, origin: Origin) -> StoreOutcome:
        reason = Reason(exc.code)
        status = (
            Status.CANNOT_UNDERSTAND if reason is Reason.UNPARSEABLE else Status.DATASET_MISMATCH
        )
        try:
            self.quarantine.put(data, reason, exc.detail, origin)  # logs the item's id
        except Exception as qexc:
            log.error("could not quarantine an instance: %s", type(qexc).__name__)
            return StoreOutcome("rejected", Status.OUT_OF_RESOURCES, "out_of_resources", str(qexc))
        return StoreOutcome("quarantined", status, reason.value, exc.detail)

    def _file(self, data: bytes, header: InstanceHeader, origin: Origin) -> StoreOutcome:
        existing = self.index.find_instance(header.sop_instance_uid)
        if existing is not None:
            if not (self.data_dir / existing.path).is_file():
                return self._refile(data, header, origin)
            return self._duplicate(data, header, origin, self.data_dir / existing.path)
        rel = _instance_rel(header)
        path = os.path.join(self._root, rel)  # a string: this is the per-instance hot path
        write_durable(path, data)
        try:
            added = self.index.add_instance(header, rel, len(data), origin)
        except IndexUnavailable:
            # The connection may have broken during the COMMIT, so the row may be there: the
            # file stays. When it is not, the sender's retry writes it again, or the start-up
            # sweep indexes it (engine.store.recovery): never a row without its file.
            raise
        except BaseException:
            # Not indexed means not acknowledged: remove the file so a retry starts clean.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        if added.duplicate:
            # Another receiver (a second fiona on the port) indexed this UID meanwhile: the
            # file at its path is the instance; ours is kept, the sender is answered Success.
            log.info("instance indexed meanwhile by another receiver: treated as a duplicate")
            return StoreOutcome("duplicate", Status.SUCCESS)
        if added.new_study:
            self._make_views(header)
        return StoreOutcome("stored", Status.SUCCESS)

    def _refile(self, data: bytes, header: InstanceHeader, origin: Origin) -> StoreOutcome:
        """An indexed instance whose file is gone (retention deleted its study): file it again,
        so a study sent again after deletion is on disk again, not answered and dropped."""
        write_durable(self.instance_path(header), data)
        self.index.replace_instance(header, _instance_rel(header), len(data), origin)
        self.index.mark_study_present(header.study_uid)
        self._make_views(header)
        log.info("instance filed again: its earlier copy had been deleted")
        return StoreOutcome("stored", Status.SUCCESS)

    def _duplicate(
        self, data: bytes, header: InstanceHeader, origin: Origin, existing: Path
    ) -> StoreOutcome:
        # Compared byte for byte on this rare path, so the common path needs no checksum.
        uid = header.sop_instance_uid
        if _same_bytes(existing, data):
            self.index.record_duplicate(uid, True, "ignored", origin)
            return StoreOutcome("duplicate", Status.SUCCESS)
        policy = self.duplicate_policy
        if policy is DuplicatePolicy.REPLACE:
            write_durable(self.instance_path(header), data)
            self.index.replace_instance(header, _instance_rel(header), len(data), origin)
            action = "replaced"
        elif policy is DuplicatePolicy.QUARANTINE:
            self.quarantine.put(
                data,
                Reason.DUPLICATE_CONFLICT,
                "SOP Instance UID already archived with different bytes",
                origin,
                sop_instance_uid=uid,
                study_uid=header.study_uid,
            )
            action = "quarantined"
        else:
            action = "kept_first"
        self.index.record_duplicate(uid, False, action, origin)
        log.warning("conflicting duplicate instance (policy %s): %s", policy.value, action)
        return StoreOutcome(action, Status.SUCCESS, Reason.DUPLICATE_CONFLICT.value)

    def _make_views(self, header: InstanceHeader) -> None:
        """Symlink views for a new study; a failure is logged, never fatal: the data is safe."""
        try:
            _symlink(
                self.data_dir / "raw" / header.study_uid, Path("..") / "archive" / header.study_uid
            )
            target = Path("../..") / "archive" / header.study_uid
            patient = safe_component(header.patient_id)
            when = safe_component(
                f"{header.study_date or 'nodate'}_{header.study_time.split('.')[0] or 'notime'}"
            )
            folder = self.data_dir / "participants" / patient
            ensure_dir(folder)
            link = folder / when
            n = 1
            while link.is_symlink() and os.readlink(link) != str(target):
                n += 1
                link = folder / f"{when}_{n}"
            _symlink(link, target)
        except OSError as exc:
            log.error("could not create the views of a study: %s", _os_error_text(exc))


#: The lock file (in the data folder) of :class:`engine.store.uid_locks.UidLocks`.
UID_LOCK_FILE = "archive.lock"


def _check_expected(header: InstanceHeader, expected: tuple[str, str]) -> None:
    """Raise :class:`HeaderError` when a C-STORE's dataset is not what was negotiated and
    announced (the UIDs themselves are not quoted: the detail stays free of header values)."""
    sop_class, sop_instance = expected
    if header.sop_class_uid != sop_class:
        raise HeaderError(
            "sop_class_mismatch",
            "SOP Class UID (0008,0016) differs from the presentation context's abstract syntax",
        )
    if header.sop_instance_uid != sop_instance:
        raise HeaderError(
            "sop_instance_mismatch",
            "SOP Instance UID (0008,0018) differs from the command's Affected SOP Instance UID",
        )


def _instance_rel(header: InstanceHeader) -> str:
    """``archive/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, relative to the data dir."""
    return f"archive/{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink():
        return
    ensure_dir(link.parent)
    with contextlib.suppress(FileExistsError):  # made meanwhile by another receiver process
        os.symlink(target, link)


def _os_error_text(exc: OSError) -> str:
    # strerror only: the filename may contain header values.
    return exc.strerror or type(exc).__name__


class _NoResources(Exception):
    pass
