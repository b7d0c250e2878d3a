"""Checking a portal login: a local user's password here (argon2), anyone else's in the
directory when ``web.ldap`` is set (:mod:`engine.web.ldap`).

A name that is a local user's is never sent to the directory. A directory user's row is made
or refreshed with the role and grants its groups give at this login
(:meth:`engine.store.users.UserStore.record_ldap`); one whose groups give no role is refused as
a wrong password is, and its row (so its sessions) is deleted. API tokens stay local: this is
the portal's login only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.store.users import Source, User, UserError, UserStore, check_name
from engine.web.ldap import Directory, Member, Unavailable, grant_of

log = logging.getLogger(__name__)

__all__ = ["DirectoryDown", "LoggedIn", "Refused", "check_login"]


@dataclass(frozen=True)
class LoggedIn:
    """A login let in; ``regranted``: the directory gave the user a role or grants other than
    the ones its row held (or it had none: a first login)."""

    user: User
    regranted: bool = False


@dataclass(frozen=True)
class Refused:
    """A login refused. ``why`` is empty for a wrong name or password (audited as
    ``login_failed``), else the reason audited as ``login_refused`` (``no role``...), with
    ``user``: the name the directory let in."""

    why: str = ""
    user: str = ""


@dataclass(frozen=True)
class DirectoryDown:
    """The directory cannot be asked now; ``why`` is for the log (no name, no password)."""

    why: str


Outcome = LoggedIn | Refused | DirectoryDown


def check_login(users: UserStore, directory: Directory | None, name: str, password: str) -> Outcome:
    """Whether ``password`` lets ``name`` in: the local user's hash when ``name`` is a local
    user (or no directory is set), else the directory. An empty name or password is refused
    before either is asked."""
    if not name or not password:
        return Refused()
    known = users.get(name)
    if known is not None and known.disabled:
        users.check_password(name, password)  # the same time as any refusal: one hash
        return Refused("disabled", known.name)  # the directory is not asked
    if directory is None or (known is not None and known.source is Source.LOCAL):
        user = users.check_password(name, password)
        return Refused() if user is None else LoggedIn(user)
    # Directories compare names without regard to case: one row per person, lower case.
    name = name.lower()
    try:
        check_name(name)
    except UserError:
        return Refused()
    known = users.get(name)
    if known is not None and known.source is Source.LOCAL:
        return Refused()  # a local user's name in other case: never the directory's
    if known is not None and known.disabled:
        return Refused("disabled", known.name)
    answer = directory.authenticate(name, password)
    if isinstance(answer, Unavailable):
        log.warning("a portal login through the directory was not possible: %s", answer.why)
        return DirectoryDown(answer.why)
    if not isinstance(answer, Member):
        return Refused()
    grant = grant_of(answer.groups, directory.config.role_map)
    if grant is None:
        if users.forget_ldap(name):
            log.info("directory user %s lost its last role: its sessions ended", name)
        return Refused("no role", name)
    try:
        user = users.record_ldap(name, grant.role, projects=grant.projects, phi=grant.phi)
    except UserError:
        return Refused("the name is a local user's", name)
    before = None if known is None else (known.role, known.projects, known.phi)
    return LoggedIn(user, regranted=before != (user.role, user.projects, user.phi))
