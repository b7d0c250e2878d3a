"""Coupling lists: studies assigned to a project explicitly, as FIONA's coupling lists do.

A CSV file with a header row. Key columns: ``AccessionNumber`` (0008,0050) and/or
``StudyInstanceUID`` (0020,000D), at least one; optional ``subject`` and ``event`` columns give
the research subject and event the study is for. Coordinators edit the file while the service
runs, so :meth:`CouplingList.current` re-reads it when its modification time changes.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

KEY_COLUMNS = ("AccessionNumber", "StudyInstanceUID")
OPTIONAL_COLUMNS = ("subject", "event")


class CouplingError(ValueError):
    """The coupling list cannot be used; the message says what to fix (never a cell value)."""


@dataclass(frozen=True)
class Coupling:
    """The research subject and event a coupled study is for (either may be empty)."""

    subject: str = ""
    event: str = ""


@dataclass
class CouplingList:
    """One coupling list file, indexed by accession number and by study UID."""

    path: Path
    mtime_ns: int = 0
    by_accession: dict[str, Coupling] = field(default_factory=dict)
    by_study_uid: dict[str, Coupling] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CouplingList:
        """Read ``path``; raise :class:`CouplingError` if it is missing or malformed."""
        try:
            stat = path.stat()
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError as exc:
            raise CouplingError(f"coupling list {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise CouplingError(f"coupling list {path} cannot be read ({exc})") from exc
        found = cls(path, stat.st_mtime_ns)
        found._parse(text)
        return found

    def _parse(self, text: str) -> None:
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in reader.fieldnames or []]
        keys = [c for c in columns if c in KEY_COLUMNS]
        if not keys:
            raise CouplingError(
                f"coupling list {self.path}: expected a header row with "
                f"{' and/or '.join(KEY_COLUMNS)}, found columns: {', '.join(columns) or 'none'}"
            )
        unknown = [c for c in columns if c not in KEY_COLUMNS + OPTIONAL_COLUMNS]
        if unknown:
            raise CouplingError(
                f"coupling list {self.path}: unknown column(s) {', '.join(unknown)} "
                f"(expected {', '.join(KEY_COLUMNS + OPTIONAL_COLUMNS)})"
            )
        for row in reader:
            cells = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            coupling = Coupling(cells.get("subject", ""), cells.get("event", ""))
            if cells.get("AccessionNumber"):
                self.by_accession[cells["AccessionNumber"]] = coupling
            if cells.get("StudyInstanceUID"):
                self.by_study_uid[cells["StudyInstanceUID"]] = coupling

    def current(self) -> CouplingList:
        """This list, or a fresh read if the file changed; the old list if the new one is bad."""
        try:
            if self.path.stat().st_mtime_ns == self.mtime_ns:
                return self
            return CouplingList.load(self.path)
        except (OSError, CouplingError):
            return self

    def lookup(self, accession_number: str, study_uid: str) -> Coupling | None:
        """The coupling of a study, by study UID first, then by accession number."""
        if study_uid in self.by_study_uid:
            return self.by_study_uid[study_uid]
        if accession_number and accession_number in self.by_accession:
            return self.by_accession[accession_number]
        return None
