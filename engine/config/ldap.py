"""The site's ``web.ldap`` section: portal logins checked against LDAP or Active Directory.

:func:`ldap_config` turns the section (schema defaults applied) into :class:`LdapConfig`;
:func:`ldap_issues` holds the cross-field checks the schema cannot express (run when the site
loads), and :func:`ldap_validate` those of ``fiona validate`` only: the service account's
password file (it can be read, only by its owner) and a password sent in clear.
"""

from __future__ import annotations

import re
import stat
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.config.files import ParsedFile, parse_file
from engine.config.issues import ConfigIssue, format_path
from engine.config.model import LdapConfig, LdapRoleRule, LdapSearch, SiteConfig

__all__ = [
    "dn_key",
    "ldap_config",
    "ldap_issues",
    "ldap_unknown_projects",
    "ldap_validate",
    "password_file_problem",
]

_WHERE = ("web", "ldap")


def _search(doc: Mapping[str, Any] | None) -> LdapSearch | None:
    return None if doc is None else LdapSearch(str(doc["base"]), str(doc["filter"]))


def ldap_config(doc: Mapping[str, Any] | None, base: Path | None) -> LdapConfig | None:
    """The ``web.ldap`` section as :class:`LdapConfig` (None when it is null); relative file
    paths are relative to ``base``, the site file's folder."""
    if doc is None:
        return None

    def path(value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return base / p if base is not None and not p.is_absolute() else p

    bind = doc["bind"]
    return LdapConfig(
        urls=tuple(str(doc["url"]).split()),
        role_map=tuple(
            LdapRoleRule(
                group=str(r["group"]),
                role=r["role"],
                projects=tuple(r["projects"]),
                phi=bool(r["phi"]),
            )
            for r in doc["role_map"]
        ),
        start_tls=bool(doc["start_tls"]),
        ca_file=path(doc["ca_file"]),
        timeout=float(doc["timeout_seconds"]),
        bind_dn=None if bind is None else str(bind["dn"]),
        bind_password_file=None if bind is None else path(bind["password_file"]),
        user_search=_search(doc["user_search"]),
        user_dn_template=doc["user_dn_template"],
        group_search=_search(doc["group_search"]),
    )


_ATTRIBUTE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*")


def _unescape(value: str) -> str:
    """An attribute value of a DN as text: ``\\XX`` hex pairs (UTF-8 bytes) and ``\\c``
    escapes undone."""
    out = bytearray()
    i = 0
    while i < len(value):
        pair = value[i + 1 : i + 3]
        if value[i] == "\\" and len(pair) == 2 and all(c in string.hexdigits for c in pair):
            out.append(int(pair, 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            out += value[i + 1].encode()
            i += 2
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8", errors="replace")


def dn_key(dn: str) -> str | None:
    """``dn`` as directories compare it (attribute types and values without regard to case,
    escapes undone, no spaces around separators: ``CN=Fiona Admins, OU=Groups`` is
    ``cn=fiona admins,ou=groups``), or None when it is not a DN. Spaces after commas, which
    RFC 4514 leaves out but people copying DNs from Active Directory tools write, are taken."""
    pieces, separators, start, i = [], [], 0, 0
    while i < len(dn):
        if dn[i] == "\\":
            i += 2
            continue
        if dn[i] in ",;+":
            pieces.append(dn[start:i])
            separators.append("+" if dn[i] == "+" else ",")
            start = i + 1
        i += 1
    pieces.append(dn[start:])
    key = ""
    for piece, separator in zip(pieces, ["", *separators], strict=True):
        attribute, equals, value = piece.partition("=")
        attribute = attribute.strip()
        value = re.sub(r"(?<!\\)\s+$", "", value.lstrip())
        if not equals or not _ATTRIBUTE_TYPE.fullmatch(attribute) or not value:
            return None
        # Escaped again, one way: a comma inside a value never reads as a separator.
        text = "".join(f"\\{c}" if c in ',+;"\\<>=' else c for c in _unescape(value).lower())
        key += f"{separator}{attribute.lower()}={text}"
    return key


def ldap_issues(ldap: LdapConfig | None, parsed: ParsedFile) -> list[ConfigIssue]:
    """Problems of the section the schema cannot see: the user's DN found both ways or
    neither, a role_map entry that gives nothing or names no DN, a CA file that is missing,
    StartTLS on an ldaps:// URL."""
    if ldap is None:
        return []
    issues: list[ConfigIssue] = []

    def issue(keys: tuple[str | int, ...], message: str) -> None:
        path = (*_WHERE, *keys)
        issues.append(ConfigIssue(parsed.file, parsed.line_of(path), format_path(path), message))

    if (ldap.user_search is None) == (ldap.user_dn_template is None):
        issue((), "give either user_search or user_dn_template (how to find the user's DN)")
    for i, rule in enumerate(ldap.role_map):
        if rule.role is None and not rule.phi:
            issue(("role_map", i), "this entry gives nothing: set its role, or phi: true")
        if dn_key(rule.group) is None:
            issue(("role_map", i, "group"), f"expected a group's DN, found {rule.group!r}")
    if ldap.ca_file is not None and not ldap.ca_file.is_file():
        issue(("ca_file",), f"no such file: {ldap.ca_file}")
    if ldap.start_tls and any(u.lower().startswith("ldaps://") for u in ldap.urls):
        issue(("start_tls",), "start_tls is for ldap:// URLs; an ldaps:// URL is TLS already")
    return issues


def password_file_problem(path: Path) -> str | None:
    """Why the service account's password file must not be used (it cannot be read, group or
    other users may read or write it, it is empty), or None. Never says what it holds."""
    try:
        mode = path.stat().st_mode
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    if mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH):
        return (
            f"{path} is readable or writable by other users (mode {stat.filemode(mode)});"
            f" run: chmod 600 {path}"
        )
    if not lines or not lines[0]:
        return f"{path} is empty: put the service account's password on its first line"
    return None


def _in_clear(url: str, start_tls: bool) -> bool:
    parts = urlsplit(url)
    loopback = (parts.hostname or "") in ("localhost", "127.0.0.1", "::1")
    return parts.scheme.lower() == "ldap" and not start_tls and not loopback


def ldap_validate(site: SiteConfig) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) of ``fiona validate`` for ``web.ldap``: an unusable service-account
    password file is an error (checked again at each login, so a fix needs no restart);
    passwords crossing the network in clear are a warning."""
    ldap, source = site.web.ldap, site.source
    if ldap is None or source is None:
        return [], []
    parsed = parse_file(source)
    errors, warnings = [], []
    if ldap.bind_password_file is not None:
        problem = password_file_problem(ldap.bind_password_file)
        if problem is not None:
            keys = (*_WHERE, "bind", "password_file")
            errors.append(ConfigIssue(source, parsed.line_of(keys), format_path(keys), problem))
    clear = [u for u in ldap.urls if _in_clear(u, ldap.start_tls)]
    if clear:
        message = (
            f"warning: {clear[0]} without start_tls: users' passwords cross the network in"
            " clear; use ldaps:// or set start_tls: true"
        )
        where = (*_WHERE, "url")
        warnings.append(ConfigIssue(source, parsed.line_of(where), format_path(where), message))
    return errors, warnings


def ldap_unknown_projects(site: SiteConfig, names: set[str]) -> list[ConfigIssue]:
    """Warnings of ``fiona validate``: a ``role_map`` entry naming a project that is not among
    ``names`` (the site's projects) gives its members nothing there (a typo, or a project still
    to come)."""
    ldap, source = site.web.ldap, site.source
    if ldap is None or source is None:
        return []
    parsed = parse_file(source)
    found = []
    for i, rule in enumerate(ldap.role_map):
        for project in rule.projects:
            if project not in names:
                where = (*_WHERE, "role_map", i, "projects")
                message = f"warning: no project {project!r} in {site.projects_dir}"
                line = parsed.line_of(where)
                found.append(ConfigIssue(source, line, format_path(where), message))
    return found
