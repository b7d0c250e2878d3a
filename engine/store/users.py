"""The web API's users and API tokens, kept in the index (migrations 0010, 0012).

A user has a role (:class:`Role`), the projects it is granted and a ``phi`` grant (may see
patient names, IDs and birth dates). Passwords are stored as argon2id hashes (argon2-cffi); there
is no default password. A user from an LDAP directory (:class:`Source`) has no password here: its
row is made at its first portal login and its role and grants refreshed at each login
(:meth:`UserStore.record_ldap`); it gets no API tokens.

A user can be disabled (``disabled_at``): its row, grants and tokens stay, but no password,
token, session or directory login lets it in until it is enabled again.

An API token is ``<id>.<secret>``: the id (12 hex digits) is stored as it is to find the row,
the secret (32 random bytes, URL-safe base64) only as its SHA-256, so the token is shown once,
when it is made, and never again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from engine.store.db import IntegrityError
from engine.store.index import Index

__all__ = [
    "Role",
    "Source",
    "TokenInfo",
    "User",
    "UserError",
    "UserStore",
    "check_name",
    "check_password",
]

#: A user name: what a login form and an audit entry can carry safely.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN = re.compile(r"([0-9a-f]{12})\.([A-Za-z0-9_-]{40,})")
_HASHER = PasswordHasher()
#: Seconds: a token's ``last_used_at`` is brought up to date at most this often.
LAST_USED_RESOLUTION = 60.0


class Role(StrEnum):
    """What a user may do: ``admin`` everything; ``coordinator`` see and act on its projects;
    ``viewer`` read its projects (an admin or a viewer without projects: every project)."""

    ADMIN = "admin"
    COORDINATOR = "coordinator"
    VIEWER = "viewer"


class Source(StrEnum):
    """Where a user's password is checked: ``local`` here (argon2), ``ldap`` by the directory."""

    LOCAL = "local"
    LDAP = "ldap"


class UserError(ValueError):
    """A user command that cannot be done; the message says what to do instead."""


@dataclass(frozen=True)
class User:
    """One user of the web API (no password hash: it never leaves this module)."""

    name: str
    role: Role
    phi: bool
    projects: tuple[str, ...]
    created_at: float
    source: Source = Source.LOCAL
    #: When an admin disabled the user (seconds since the epoch, UTC); None: enabled.
    disabled_at: float | None = None

    @property
    def disabled(self) -> bool:
        """Whether no password, token or session lets the user in (``fiona user disable``)."""
        return self.disabled_at is not None

    def sees_project(self, project: str) -> bool:
        """Whether the user may see ``project``'s items: an admin every project, anyone else
        only the projects granted (a viewer with none granted: every project)."""
        if self.role is Role.ADMIN or (self.role is Role.VIEWER and not self.projects):
            return True
        return project in self.projects

    @property
    def sees_all(self) -> bool:
        """Whether no project filter applies to this user."""
        return self.role is Role.ADMIN or (self.role is Role.VIEWER and not self.projects)


@dataclass(frozen=True)
class TokenInfo:
    """An API token's row (never its secret); times in seconds since the epoch (UTC)."""

    id: str
    user: str
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def check_name(name: str) -> str:
    """``name`` when it is a valid user name, else :class:`UserError`."""
    if not _NAME.fullmatch(name):
        raise UserError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-',"
            " starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    """``password`` when it is long enough for a new user (12 characters), else
    :class:`UserError`."""
    if len(password) < 12:
        raise UserError("the password is too short: use at least 12 characters")
    return password


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class UserStore:
    """Users and tokens over the index's database."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # -- users ---------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        role: Role | str,
        password: str,
        *,
        projects: Iterable[str] = (),
        phi: bool = False,
    ) -> User:
        """Create a user; :class:`UserError` when the name is taken or the password too short
        (at least 12 characters)."""
        check_name(name)
        check_password(password)
        role = Role(role)
        granted = tuple(sorted(set(projects)))
        now = time.time()
        try:
            with self.index.transaction() as db:
                db.execute(
                    "INSERT INTO users (name, role, phi, password_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, role.value, int(phi), _HASHER.hash(password), now),
                )
                db.executemany(
                    "INSERT INTO user_projects (user, project) VALUES (?, ?)",
                    [(name, p) for p in granted],
                )
        except IntegrityError as exc:
            raise UserError(f"user {name!r} exists already (fiona user list)") from exc
        return User(name, role, phi, granted, now)

    def record_ldap(
        self, name: str, role: Role | str, *, projects: Iterable[str] = (), phi: bool = False
    ) -> User:
        """Make or refresh the row of a user the directory has just let in, with the role and
        grants its groups give now; :class:`UserError` when ``name`` is a local user's."""
        check_name(name)
        role = Role(role)
        granted = tuple(sorted(set(projects)))
        now = time.time()
        with self.index.transaction() as db:
            row = db.execute(
                "SELECT source, disabled_at FROM users WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[0] != Source.LDAP.value:
                raise UserError(f"{name!r} is a local user: the directory cannot log it in")
            if row is not None and row[1] is not None:
                raise UserError(f"{name!r} is disabled here (fiona user enable {name})")
            if row is None:
                db.execute(
                    "INSERT INTO users (name, role, phi, password_hash, created_at, source)"
                    " VALUES (?, ?, ?, '', ?, ?)",
                    (name, role.value, int(phi), now, Source.LDAP.value),
                )
            else:
                db.execute(
                    "UPDATE users SET role = ?, phi = ? WHERE name = ?",
                    (role.value, int(phi), name),
                )
                db.execute("DELETE FROM user_projects WHERE user = ?", (name,))
            db.executemany(
                "INSERT INTO user_projects (user, project) VALUES (?, ?)",
                [(name, p) for p in granted],
            )
        return self.get(name) or User(name, role, phi, granted, now, Source.LDAP)

    def forget_ldap(self, name: str) -> bool:
        """Delete the row of directory user ``name`` (and so its sessions) when its groups no
        longer give it a role; whether there was one (a local user is never deleted here)."""
        with self.index.transaction() as db:
            gone = db.execute(
                "DELETE FROM users WHERE name = ? AND source = ?", (name, Source.LDAP.value)
            ).rowcount
        return bool(gone)

    def get(self, name: str) -> User | None:
        with self.index.reading() as db:
            row = db.execute(
                "SELECT name, role, phi, created_at, source, disabled_at FROM users"
                " WHERE name = ?",
                (name,),
            ).fetchone()
            if row is None:
                return None
            projects = [
                r[0]
                for r in db.execute(
                    "SELECT project FROM user_projects WHERE user = ? ORDER BY project", (name,)
                )
            ]
        return User(
            str(row[0]), Role(row[1]), bool(row[2]), tuple(projects), float(row[3]),
            Source(row[4]), None if row[5] is None else float(row[5]),
        )  # fmt: skip

    def all(self) -> list[User]:
        with self.index.reading() as db:
            names = [str(r[0]) for r in db.execute("SELECT name FROM users ORDER BY name")]
        return [u for u in (self.get(n) for n in names) if u is not None]

    def update(
        self,
        name: str,
        *,
        role: Role | str | None = None,
        projects: Iterable[str] | None = None,
        phi: bool | None = None,
    ) -> User:
        """Change a user's role, granted projects (all replaced) or ``phi`` grant (None: keep
        it); :class:`UserError` when there is no such user."""
        with self.index.transaction() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
                raise UserError(f"no user {name!r} (fiona user list)")
            if role is not None:
                db.execute("UPDATE users SET role = ? WHERE name = ?", (Role(role).value, name))
            if phi is not None:
                db.execute("UPDATE users SET phi = ? WHERE name = ?", (int(phi), name))
            if projects is not None:
                db.execute("DELETE FROM user_projects WHERE user = ?", (name,))
                db.executemany(
                    "INSERT INTO user_projects (user, project) VALUES (?, ?)",
                    [(name, p) for p in sorted(set(projects))],
                )
        found = self.get(name)
        assert found is not None
        return found

    def set_password(self, name: str, password: str) -> None:
        """Replace a local user's password (at least 12 characters); :class:`UserError` when
        there is no such user, it is a directory user, or the password is too short."""
        check_password(password)
        digest = _HASHER.hash(password)
        with self.index.transaction() as db:
            changed = db.execute(
                "UPDATE users SET password_hash = ? WHERE name = ? AND source = ?",
                (digest, name, Source.LOCAL.value),
            ).rowcount
        if not changed:
            if self.get(name) is not None:
                raise UserError(
                    f"{name!r} logs in through the directory (LDAP): change the password there"
                )
            raise UserError(f"no user {name!r} (fiona user list)")

    def set_disabled(self, name: str, disabled: bool) -> User:
        """Disable a user (its web sessions end at once; its tokens and password stop letting
        it in) or enable it again; :class:`UserError` when there is no such user. Disabling a
        disabled user keeps the first time."""
        with self.index.transaction() as db:
            if disabled:
                changed = db.execute(
                    "UPDATE users SET disabled_at = coalesce(disabled_at, ?) WHERE name = ?",
                    (time.time(), name),
                ).rowcount
                db.execute("DELETE FROM web_sessions WHERE user = ?", (name,))
            else:
                changed = db.execute(
                    "UPDATE users SET disabled_at = NULL WHERE name = ?", (name,)
                ).rowcount
        found = self.get(name) if changed else None
        if found is None:
            raise UserError(f"no user {name!r} (fiona user list)")
        return found

    def remove(self, name: str) -> None:
        """Delete a user and its tokens; :class:`UserError` when there is none."""
        with self.index.transaction() as db:
            gone = db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount
        if not gone:
            raise UserError(f"no user {name!r} (fiona user list)")

    def check_password(self, name: str, password: str) -> User | None:
        """The local user when ``password`` is theirs, else None (an unknown user or one of the
        directory costs one hash too, so the answer's time does not tell which names exist)."""
        with self.index.reading() as db:
            row = db.execute(
                "SELECT password_hash FROM users WHERE name = ? AND source = ?",
                (name, Source.LOCAL.value),
            ).fetchone()
        stored = str(row[0]) if row else _HASHER.hash(secrets.token_hex(8))
        try:
            _HASHER.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        user = self.get(name) if row else None
        return None if user is None or user.disabled else user

    # -- tokens --------------------------------------------------------------------------------

    def make_token(self, name: str, label: str = "") -> tuple[TokenInfo, str]:
        """A new token for ``name``: its row and the token itself (shown once, never stored);
        only a local user gets one (a directory user's access ends with its groups)."""
        user = self.get(name)
        if user is None:
            raise UserError(f"no user {name!r} (fiona user list)")
        if user.source is not Source.LOCAL:
            raise UserError(
                f"{name!r} logs in through the directory (LDAP): API tokens are for local users"
                " (fiona user add NAME --role ...)"
            )
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO api_tokens (id, user, label, secret_hash, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_id, name, label, _digest(secret), now),
            )
        return TokenInfo(token_id, name, label, now, None, None), f"{token_id}.{secret}"

    def tokens(self, name: str | None = None) -> list[TokenInfo]:
        sql = "SELECT id, user, label, created_at, last_used_at, revoked_at FROM api_tokens"
        args: tuple[str, ...] = ()
        if name is not None:
            sql += " WHERE user = ?"
            args = (name,)
        with self.index.reading() as db:
            rows = db.execute(sql + " ORDER BY created_at", args).fetchall()
        return [TokenInfo(*r) for r in rows]

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token by its id (a whole token is cut to its id); :class:`UserError` when
        there is no such token."""
        token_id = token_id.split(".", 1)[0]
        with self.index.transaction() as db:
            db.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (time.time(), token_id),
            )
            row = db.execute(
                "SELECT id, user, label, created_at, last_used_at, revoked_at FROM api_tokens"
                " WHERE id = ?",
                (token_id,),
            ).fetchone()
        if row is None:
            raise UserError(f"no token {token_id!r} (fiona user list shows the tokens' ids)")
        return TokenInfo(*row)

    def authenticate(self, token: str) -> User | None:
        """The user a token belongs to, when it is well-formed, known and not revoked."""
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            return None
        token_id, secret = match.groups()
        with self.index.reading() as db:
            row = db.execute(
                "SELECT user, secret_hash, last_used_at FROM api_tokens"
                " WHERE id = ? AND revoked_at IS NULL",
                (token_id,),
            ).fetchone()
        if row is None or not hmac.compare_digest(str(row[1]), _digest(secret)):
            return None
        user = self.get(str(row[0]))
        if user is None or user.disabled:
            return None
        now = time.time()
        if row[2] is None or now - float(row[2]) >= LAST_USED_RESOLUTION:
            # At most one write a minute per token: a poller must not load the receiver's index.
            with self.index.transaction() as db:
                db.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, token_id))
        return user
