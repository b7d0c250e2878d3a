"""The web portal's login sessions and login throttle, kept in the index (migration 0011).

A session id is 32 random bytes (URL-safe base64), sent to the browser as a cookie and stored
only as its SHA-256; each session has its own CSRF token. A session ends after ``idle`` seconds
without a request, or ``most`` seconds after the login, whichever comes first.

The throttle counts failed logins per key (``user:NAME`` and ``addr:IP``): from the
:data:`FREE_FAILURES`-th failure on, the key is locked for a delay that doubles with each
further failure (:data:`FIRST_LOCK` seconds, at most :data:`LONGEST_LOCK`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from engine.store.index import Index
from engine.store.users import User, UserStore

__all__ = [
    "FIRST_LOCK",
    "FREE_FAILURES",
    "LONGEST_LOCK",
    "SEEN_RESOLUTION",
    "Session",
    "SessionStore",
]

#: Failed logins of one key before it is locked.
FREE_FAILURES = 5
#: Seconds: the first lock; each further failure doubles it.
FIRST_LOCK = 30.0
#: Seconds: the longest lock.
LONGEST_LOCK = 900.0
#: Seconds: failures older than this are forgotten.
FORGET_AFTER = 3600.0
#: Seconds: a session's last use is written at most this often (the idle expiry may end up to
#: this much later than ``web.session_idle_minutes`` says).
SEEN_RESOLUTION = 15.0


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Session:
    """A live session: its user and the CSRF token its forms carry."""

    user: User
    csrf: str


class SessionStore:
    """Sessions and failed logins over the index's database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def start(self, name: str, now: float | None = None) -> tuple[str, str]:
        """A new session for user ``name``: (session id for the cookie, CSRF token)."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO web_sessions (id_hash, user, csrf, created_at, seen_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (_digest(session_id), name, csrf, now, now),
            )
        return session_id, csrf

    def find(
        self, session_id: str, idle: float, most: float, now: float | None = None
    ) -> Session | None:
        """The live session of ``session_id`` (its last use brought up to date, at most every
        :data:`SEEN_RESOLUTION` seconds), or None when there is none or it has expired
        (``idle``, ``most``: seconds; an expired one is deleted). Most page views only read:
        no write transaction to wait for or make the receiver wait."""
        if not session_id or len(session_id) > 128 or not session_id.isascii():
            return None
        now = time.time() if now is None else now
        key = _digest(session_id)
        with self.index.reading() as db:
            row = db.execute(
                "SELECT user, csrf, created_at, seen_at FROM web_sessions WHERE id_hash = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        if now - float(row[3]) > idle or now - float(row[2]) > most:
            with self.index.transaction() as db:
                db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (key,))
            return None
        if now - float(row[3]) >= SEEN_RESOLUTION:
            with self.index.transaction() as db:
                db.execute("UPDATE web_sessions SET seen_at = ? WHERE id_hash = ?", (now, key))
        user = UserStore(self.index).get(str(row[0]))
        return None if user is None or user.disabled else Session(user, str(row[1]))

    def purge(self, idle: float, most: float, now: float | None = None) -> int:
        """Delete the sessions expired (``idle``, ``most``: seconds, as :meth:`find`); how
        many (a session never used again would otherwise stay)."""
        now = time.time() if now is None else now
        with self.index.transaction() as db:
            return int(
                db.execute(
                    "DELETE FROM web_sessions WHERE seen_at < ? OR created_at < ?",
                    (now - idle, now - most),
                ).rowcount
            )

    def end(self, session_id: str) -> None:
        """Forget a session (logout)."""
        with self.index.transaction() as db:
            db.execute("DELETE FROM web_sessions WHERE id_hash = ?", (_digest(session_id),))

    # -- throttle ------------------------------------------------------------------------------

    def locked_for(self, keys: list[str], now: float | None = None) -> float:
        """Seconds until every one of ``keys`` may try to log in again (0: now)."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(keys))
        with self.index.reading() as db:
            row = db.execute(
                f"SELECT MAX(locked_until) FROM login_failures WHERE key IN ({marks})", keys
            ).fetchone()
        return max(0.0, float(row[0] or 0.0) - now)

    def failed(self, keys: list[str], now: float | None = None) -> int:
        """Count a failed login against each key; the most failures of any key."""
        now = time.time() if now is None else now
        most = 0
        with self.index.transaction() as db:
            for key in keys:
                row = db.execute(
                    "SELECT failures, last_at FROM login_failures WHERE key = ?", (key,)
                ).fetchone()
                n = 1 if row is None or now - float(row[1]) > FORGET_AFTER else int(row[0]) + 1
                lock = 0.0
                if n >= FREE_FAILURES:
                    lock = now + min(LONGEST_LOCK, FIRST_LOCK * 2 ** (n - FREE_FAILURES))
                db.execute(
                    "INSERT INTO login_failures (key, failures, last_at, locked_until)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                    " failures=excluded.failures, last_at=excluded.last_at,"
                    " locked_until=excluded.locked_until",
                    (key, n, now, lock),
                )
                most = max(most, n)
        return most

    def succeeded(self, keys: list[str]) -> None:
        """Forget the failures of ``keys`` after a good login."""
        with self.index.transaction() as db:
            db.executemany("DELETE FROM login_failures WHERE key = ?", [(k,) for k in keys])
