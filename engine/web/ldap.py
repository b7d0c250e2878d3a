"""Portal logins checked against an LDAP directory or Active Directory (``web.ldap``), with
ldap3 (pure Python, no C library to build).

:meth:`Directory.authenticate` finds the user's DN (a search as the service account, or the
DN template), binds as that DN with the password typed (the directory checks it; fiona never
sees a hash), then reads the user's groups (a group search, or its ``memberOf``). The name typed
goes into a filter only escaped as RFC 4515 says, and into a DN only escaped as RFC 4514 says;
an empty password is refused before anything is sent (to LDAP, a bind with a DN and no
password is an *unauthenticated* bind, which many servers answer with success). Nothing here
logs or returns the password.

:func:`grant_of` maps the groups to a role, projects and the phi grant with ``role_map``.
"""

from __future__ import annotations

import contextlib
import math
import re
import ssl
from dataclasses import dataclass
from typing import Any

from ldap3 import ANONYMOUS, BASE, NO_ATTRIBUTES, NONE, SIMPLE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException

from engine.config.ldap import dn_key, password_file_problem
from engine.config.model import LdapConfig, LdapRoleRule, LdapSearch
from engine.store.users import Role

__all__ = [
    "Directory",
    "Grant",
    "Member",
    "Rejected",
    "Unavailable",
    "escape_dn_value",
    "escape_filter_value",
    "grant_of",
    "same_dn",
]

#: Result codes of a bind that mean the server, not the password, is the problem.
_SERVER_TROUBLE = {51: "busy", 52: "unavailable", 80: "other"}
#: Result codes of a search that are not errors (4: more entries than asked for).
_SEARCH_OK = {0, 4}
_PLACEHOLDER = re.compile(r"\{(username|user_dn)\}")


def escape_filter_value(value: str) -> str:
    """``value`` safe inside an LDAP filter (RFC 4515 section 3): ``*``, ``(``, ``)``, ``\\``
    and NUL as ``\\2a``, ``\\28``, ``\\29``, ``\\5c``, ``\\00``."""
    special = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}
    return "".join(special.get(c, c) for c in value)


def escape_dn_value(value: str) -> str:
    """``value`` safe as an attribute value of a DN (RFC 4514 section 2.4): ``"+,;<>\\=`` and
    NUL escaped, and a leading ``#`` or space and a trailing space."""
    out = "".join("\\00" if c == "\0" else f"\\{c}" if c in '"+,;<>\\=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def _fill(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{username}`` and ``{user_dn}`` replaced, in one pass (a value
    holding a placeholder's text is not replaced again)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _normal_dn(dn: str) -> str:
    """``dn`` compared as directories do (:func:`engine.config.ldap.dn_key`)."""
    key = dn_key(dn)
    return dn.strip().lower() if key is None else key


def same_dn(a: str, b: str) -> bool:
    """Whether two DNs name the same entry (``CN=Fiona Admins, OU=Groups`` is
    ``cn=fiona admins,ou=groups``)."""
    return _normal_dn(a) == _normal_dn(b)


@dataclass(frozen=True)
class Member:
    """The directory let the user in: its DN and the DNs of its groups."""

    dn: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Rejected:
    """The directory did not let the user in (wrong password, no such user, ...); ``why`` is
    for the log and holds no password."""

    why: str


@dataclass(frozen=True)
class Unavailable:
    """The directory cannot be asked now (down, timed out, TLS failed, the service account
    refused); ``why`` is for the log."""

    why: str


Answer = Member | Rejected | Unavailable


@dataclass(frozen=True)
class Grant:
    """What a directory user's groups give: a role, its projects, the phi grant."""

    role: Role
    projects: tuple[str, ...]
    phi: bool


_RANK = {Role.ADMIN: 3, Role.COORDINATOR: 2, Role.VIEWER: 1}


def grant_of(groups: tuple[str, ...], role_map: tuple[LdapRoleRule, ...]) -> Grant | None:
    """The highest role the user's groups give (admin, coordinator, viewer), with the
    projects of the entries that give it (a viewer entry without projects: every project),
    and the phi grant when any of its groups gives it; None when no group gives a role."""
    normal = {_normal_dn(g) for g in groups}
    matched = [r for r in role_map if _normal_dn(r.group) in normal]
    roles = [Role(r.role) for r in matched if r.role is not None]
    if not roles:
        return None
    role = max(roles, key=_RANK.__getitem__)
    giving = [r for r in matched if r.role == role.value]
    everything = role is Role.VIEWER and any(not r.projects for r in giving)
    projects = () if everything else tuple(sorted({p for r in giving for p in r.projects}))
    return Grant(role, projects, any(r.phi for r in matched))


class _Down(Exception):
    """The directory cannot be asked (carries the reason for :class:`Unavailable`)."""


class Directory:
    """The site's directory, as ``web.ldap`` describes it."""

    def __init__(self, config: LdapConfig) -> None:
        self.config = config

    def _servers(self) -> list[Server]:
        """The servers to try, in order; made for each login (ldap3's keep state, and a CA file
        that went missing is then a login that fails, not a service that does not start)."""
        config = self.config
        tls = Tls(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(config.ca_file) if config.ca_file is not None else None,
        )
        return [
            Server(url, connect_timeout=config.timeout, tls=tls, get_info=NONE)
            for url in config.urls
        ]

    def authenticate(self, name: str, password: str) -> Answer:
        """Whether ``password`` is the password of directory user ``name``, and its groups."""
        if not name or not password:
            return Rejected("empty user name or password")  # never sent: see the module doc
        opened: list[Connection] = []
        try:
            return self._authenticate(name, password, opened)
        except _Down as exc:
            return Unavailable(str(exc))
        except Exception as exc:  # ldap3 also raises OSError, ssl and struct errors
            return Unavailable(f"{type(exc).__name__}: {exc}")
        finally:
            for conn in opened:
                with contextlib.suppress(Exception):
                    conn.unbind()

    def _authenticate(self, name: str, password: str, opened: list[Connection]) -> Answer:
        config = self.config
        service: Connection | None = None
        if config.user_search is not None or config.bind_dn is not None:
            service = self._service(opened)
        if config.user_search is not None:
            assert service is not None
            found = self._find_user(service, config.user_search, name)
            if isinstance(found, Rejected):
                return found
            dn = found
        else:
            assert config.user_dn_template is not None
            dn = _fill(config.user_dn_template, {"username": escape_dn_value(name), "user_dn": ""})
        user = self._bind(dn, password, opened)
        if user is None:
            return Rejected("the directory refused the password (or the user)")
        groups = self._groups(service or user, name, dn)
        return Member(dn, groups)

    def _service(self, opened: list[Connection]) -> Connection:
        """A connection bound as the service account (anonymous without ``bind``)."""
        config = self.config
        password = None
        if config.bind_dn is not None and config.bind_password_file is not None:
            problem = password_file_problem(config.bind_password_file)
            if problem is not None:
                raise _Down(f"web.ldap.bind.password_file: {problem}")
            password = config.bind_password_file.read_text(encoding="utf-8").splitlines()[0]
        conn = self._bind(config.bind_dn, password, opened)
        if conn is None:
            raise _Down(f"the directory refused the service account {config.bind_dn!r}")
        return conn

    def _bind(
        self, dn: str | None, password: str | None, opened: list[Connection]
    ) -> Connection | None:
        """A connection bound as ``dn`` (None: anonymously) to the first server that answers;
        None when the directory refuses the password; :class:`_Down` when no server answers."""
        last = "no server"
        for server in self._servers():
            conn = Connection(
                server,
                user=dn,
                password=password,
                authentication=SIMPLE if dn is not None else ANONYMOUS,
                receive_timeout=math.ceil(self.config.timeout),  # whole seconds (SO_RCVTIMEO)
                auto_referrals=False,
                read_only=True,
                raise_exceptions=False,
            )
            try:
                conn.open()
                if self.config.start_tls and not server.ssl:
                    conn.start_tls()
            except LDAPException as exc:
                last = f"{server.name}: {type(exc).__name__}: {exc}"
                continue
            opened.append(conn)
            if conn.bind():
                return conn
            code = int(conn.result.get("result", -1)) if conn.result else -1
            if code in _SERVER_TROUBLE:
                last = f"{server.name}: bind answered {conn.result.get('description')}"
                continue
            return None
        raise _Down(f"no directory server reachable ({last})")

    def _search(
        self, conn: Connection, base: str, filt: str, scope: Any, attrs: Any, limit: int = 0
    ) -> list[dict[str, Any]]:
        """The entries found (referrals left out; at most ``limit``, 0: no limit);
        :class:`_Down` when the search fails."""
        conn.search(base, filt, search_scope=scope, attributes=attrs, size_limit=limit)
        code = int(conn.result.get("result", -1)) if conn.result else -1
        if code not in _SEARCH_OK and code != 32:  # 32: no such object (an empty answer)
            raise _Down(f"search under {base!r} answered {conn.result.get('description')}")
        return [r for r in conn.response or [] if r.get("type") == "searchResEntry"]

    def _find_user(self, conn: Connection, search: LdapSearch, name: str) -> str | Rejected:
        filt = _fill(search.filter, {"username": escape_filter_value(name), "user_dn": ""})
        entries = self._search(conn, search.base, filt, SUBTREE, NO_ATTRIBUTES, limit=2)
        if len(entries) != 1:
            return Rejected("no such user" if not entries else "several entries match the name")
        return str(entries[0]["dn"])

    def _groups(self, conn: Connection, name: str, dn: str) -> tuple[str, ...]:
        """The DNs of the user's groups: the group search's entries, or ``memberOf``."""
        search = self.config.group_search
        if search is not None:
            values = {"username": escape_filter_value(name), "user_dn": escape_filter_value(dn)}
            filt = _fill(search.filter, values)
            entries = self._search(conn, search.base, filt, SUBTREE, NO_ATTRIBUTES)
            return tuple(str(e["dn"]) for e in entries)
        entries = self._search(conn, dn, "(objectClass=*)", BASE, ["memberOf"])
        if not entries:
            return ()
        found = entries[0].get("attributes", {}).get("memberOf", [])
        return tuple(str(g) for g in ([found] if isinstance(found, str) else found))
