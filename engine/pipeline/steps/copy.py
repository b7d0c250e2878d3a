"""``copy``: copy the selected series of the run to a folder.

Options (``schemas/steps/copy.schema.json``)::

    - step: copy
      to: /srv/research/example     # absolute, or relative to the data folder

Layout: ``<to>/<StudyInstanceUID>/<SeriesInstanceUID>/<file name>`` (the archive's file names,
``<SOPInstanceUID>.dcm``) and ``<to>/<StudyInstanceUID>/labels.json`` mapping each copied series
UID to its labels; a follow-up run adds its series to that file (entries of other series stay).

Each series is copied into a hidden folder beside its target (``.tmp-<SeriesInstanceUID>``),
fsynced, and renamed into place; a series already there is swapped out the same way
(``.old-<SeriesInstanceUID>``, removed after). A re-run after a crash first removes those
leftovers, skips series whose copy is already complete (same names, sizes and modification
times as the archive), and so ends with the same folders and no duplicates.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigIssue
from engine.dicom.uids import is_valid_uid
from engine.pipeline.context import RunContext, SeriesInput
from engine.pipeline.outcome import Done, Outcome, Quarantined
from engine.pipeline.steps.base import JsonPath, Step
from engine.store.fsio import ensure_dir, fsync_dir, write_durable
from engine.store.quarantine import Reason

__all__ = ["LABELS_FILE", "CopyStep"]

#: The file beside the copied series mapping series UID -> labels.
LABELS_FILE = "labels.json"
#: Folders of the data dir a copy must not write into (the archive and its views).
_RESERVED = ("archive", "raw", "participants", "quarantine")


def _signature(folder: Path) -> dict[str, tuple[int, int]] | None:
    """File name -> (size, mtime in ns) of ``folder``'s files; None when it is not a folder."""
    if not folder.is_dir():
        return None
    out = {}
    for entry in os.scandir(folder):
        st = entry.stat(follow_symlinks=False)
        out[entry.name] = (st.st_size, st.st_mtime_ns)
    return out


def _copy_file(src: Path, dst: Path) -> None:
    """Copy bytes and modification time, then fsync the copy."""
    shutil.copyfile(src, dst)
    st = src.stat()
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class CopyStep(Step):
    """Copies the selected series (see the module doc)."""

    name = "copy"

    def __init__(self, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(options, project_file)
        self.to = Path(str(options["to"])).expanduser()

    def target(self, data_dir: Path) -> Path:
        """The folder series are copied to (``to``, relative to ``data_dir`` unless absolute)."""
        return self.to if self.to.is_absolute() else data_dir / self.to

    def run(self, ctx: RunContext) -> Outcome:
        pairs = ctx.exported_series()
        series = [exported for _, exported in pairs]
        if not series:
            return Done("no series to copy")
        study_uid = ctx.export_study_uid()
        bad = [s for s in series if not is_valid_uid(s.series_uid)]
        if not is_valid_uid(study_uid) or bad:
            what = "the study UID" if not is_valid_uid(study_uid) else f"{len(bad)} series UID(s)"
            return Quarantined(Reason.INVALID_UID.value, f"{what} cannot name a folder")
        root = self.target(ctx.data_dir) / study_uid
        ensure_dir(root)
        copied = sum(self._copy_series(s, root / s.series_uid) for s in series)
        labels_file = root / LABELS_FILE
        labels = self._read_labels(labels_file)
        if labels is None:
            return Quarantined(
                Reason.COPY_CONFLICT.value, f"{LABELS_FILE} in the target is not a JSON object"
            )
        labels.update({new.series_uid: ctx.labels_of(old.series_uid) for old, new in pairs})
        text = json.dumps(labels, indent=2, sort_keys=True) + "\n"
        write_durable(labels_file, text.encode())
        return Done(f"{len(series)} series copied ({copied} files written)")

    def _copy_series(self, series: SeriesInput, target: Path) -> int:
        """Make ``target`` hold exactly the series' files; the number of files written."""
        parent = target.parent
        tmp = parent / f".tmp-{series.series_uid}"
        old = parent / f".old-{series.series_uid}"
        for leftover in (tmp, old):  # of a copy interrupted by a crash
            _remove(leftover)
        wanted = {}
        for f in series.files:
            st = f.stat()
            wanted[f.name] = (st.st_size, st.st_mtime_ns)
        if _signature(target) == wanted:
            return 0
        tmp.mkdir()
        for f in series.files:
            _copy_file(f, tmp / f.name)
        fsync_dir(tmp)
        if target.exists() or target.is_symlink():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(parent)
        _remove(old)
        return len(series.files)

    @staticmethod
    def _read_labels(path: Path) -> dict[str, Any] | None:
        """The labels file's mapping ({} when there is none; None when it is not a mapping)."""
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            return None
        return found if isinstance(found, dict) else None

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        to = Path(str(options["to"])).expanduser()
        where = (*base_path, "to")
        if to.is_absolute():
            if to.exists() and not to.is_dir():
                return [cls.issue(file, where, f"expected a folder, found a file at {to}")]
            return []
        parts = to.parts
        if not parts or parts == (".",):
            return [cls.issue(file, where, "expected a folder below the data folder, found '.'")]
        if parts[0] in _RESERVED or ".." in parts:
            message = (
                "expected a folder inside the data folder but outside its"
                f" {', '.join(_RESERVED[:-1])} and {_RESERVED[-1]} folders (or an absolute path),"
                f" found '{options['to']}'"
            )
            return [cls.issue(file, where, message)]
        return []
