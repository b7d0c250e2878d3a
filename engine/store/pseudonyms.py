"""The pseudonym table: one stable pseudonym per (project, original Patient ID).

Pseudonyms are allocated in order with the project's prefix (``SUBJ0001``, ``SUBJ0002``...)
inside one index transaction, so two studies of one patient arriving together still get one
pseudonym, and a restart or a late series finds the same one. Reading the table back the other
way (re-identification) is only offered through :func:`reidentify`, which the CLI audits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.store.db import Connection
from engine.store.index import Index
from engine.store.leases import one_at_a_time


@dataclass(frozen=True)
class PseudonymTable:
    """Pseudonyms of one project: ``prefix`` then a zero-padded number of ``digits`` digits."""

    index: Index
    project: str
    prefix: str = "SUBJ"
    digits: int = 4

    def pseudonym_for(self, original: str, *, preferred: str = "") -> str:
        """The project's pseudonym of ``original``, allocated on first use.

        ``preferred`` (a research ID from a coupling list or REDCap) is used for a new entry
        when no other original holds it already.
        """
        # A pseudonym never changes once given: one that exists is read without taking the
        # index's write turn (the receiver's commits would wait on it, and it on them).
        with self.index.reading() as db:
            found = self._existing(db, original)
        if found is not None:
            return found
        with self.index.transaction() as db:
            # On PostgreSQL two nodes' transactions would both find nothing and both number
            # the same next pseudonym: the project's allocations take turns across the cluster.
            one_at_a_time(db, f"pseudonyms:{self.project}")
            found = self._existing(db, original)  # given meanwhile by another thread or node
            if found is not None:
                return found
            chosen = preferred if preferred and not self._taken(db, preferred) else ""
            if not chosen:
                count = db.execute(
                    "SELECT count(*) FROM pseudonyms WHERE project=?", (self.project,)
                ).fetchone()[0]
                n = int(count) + 1
                chosen = f"{self.prefix}{n:0{self.digits}d}"
                while self._taken(db, chosen):
                    n += 1
                    chosen = f"{self.prefix}{n:0{self.digits}d}"
            db.execute(
                "INSERT INTO pseudonyms(project, original, pseudonym, created_at) VALUES (?,?,?,?)",
                (self.project, original, chosen, time.time()),
            )
            return chosen

    def _existing(self, db: Connection, original: str) -> str | None:
        row = db.execute(
            "SELECT pseudonym FROM pseudonyms WHERE project=? AND original=?",
            (self.project, original),
        ).fetchone()
        return str(row[0]) if row else None

    def _taken(self, db: Connection, pseudonym: str) -> bool:
        row = db.execute(
            "SELECT 1 FROM pseudonyms WHERE project=? AND pseudonym=?", (self.project, pseudonym)
        ).fetchone()
        return row is not None


def reidentify(index: Index, project: str, pseudonym: str) -> str | None:
    """The original Patient ID behind ``pseudonym`` in ``project``, or None.

    Only for the audited admin command (``fiona reidentify``): callers must write the audit
    entry before showing the result.
    """
    with index.reading() as db:
        row = db.execute(
            "SELECT original FROM pseudonyms WHERE project=? AND pseudonym=?", (project, pseudonym)
        ).fetchone()
    return str(row[0]) if row else None
