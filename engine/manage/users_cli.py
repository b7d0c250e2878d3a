"""``fiona user add|list|set|password|token|revoke-token|disable|enable|remove``: the web's
users, on the server.

The first admin is made here (``fiona user add NAME --role admin``); there is no default
password. A password is read from ``--password-file`` (its first line) or asked twice on a
terminal. A token is printed once, when it is made; the index keeps only its hash. Every change
writes an audit entry naming the user (and the OS account that ran the command), never a
password or a token.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path

from engine.config.model import SiteConfig
from engine.manage.users import UserAdmin
from engine.store.audit import AuditLog, operator
from engine.store.commands import run_with_index
from engine.store.index import Index
from engine.store.users import Source, User, UserError, UserStore

__all__ = ["run_user"]


def _password(args: argparse.Namespace) -> str | None:
    """The new password: the first line of ``--password-file``, or typed twice on a terminal;
    None (after a message) when neither is possible or the two differ."""
    if args.password_file is not None:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"fiona: cannot read the password file: {exc}", file=sys.stderr)
            return None
        return lines[0] if lines else ""
    if not sys.stdin.isatty():
        print(
            "fiona: no terminal to ask for the password: give --password-file FILE",
            file=sys.stderr,
        )
        return None
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        print("fiona: the two passwords differ; nothing done", file=sys.stderr)
        return None
    return first


def _add(admin: UserAdmin, args: argparse.Namespace) -> int:
    if admin.store.get(args.name) is not None:
        print(f"fiona: user {args.name!r} exists already (fiona user list)", file=sys.stderr)
        return 1
    password = _password(args)
    if password is None:
        return 1
    user = admin.add(args.name, args.role, password, args.project or (), bool(args.phi))
    print(f"user {user.name}: {_describe(user)}")
    return 0


def _describe(user: User) -> str:
    where = ", ".join(user.projects) if user.projects else "every project"
    if user.role == "coordinator" and not user.projects:
        where = "no project yet"
    source = ", from the directory (LDAP)" if user.source is Source.LDAP else ""
    off = f"; DISABLED since {_when(user.disabled_at)}" if user.disabled else ""
    return f"{user.role.value}, {where}{', sees PHI' if user.phi else ''}{source}{off}"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _list(store: UserStore) -> int:
    users = store.all()
    if not users:
        print("no users (the first admin: fiona user add NAME --role admin)")
        return 0
    for user in users:
        print(f"{user.name:<20} {_describe(user)}")
        for t in store.tokens(user.name):
            state = f"revoked {_when(t.revoked_at)}" if t.revoked_at else "active"
            print(
                f"  token {t.id}  {t.label or '-':<16.16} made {_when(t.created_at)}"
                f"  last used {_when(t.last_used_at)}  {state}"
            )
    return 0


def _token(admin: UserAdmin, args: argparse.Namespace) -> int:
    info, token = admin.make_token(args.name, args.label or "")
    print(token)
    print(
        f"token {info.id} for {args.name}: shown once, store it now"
        f" (revoke: fiona user revoke-token {info.id})",
        file=sys.stderr,
    )
    return 0


def _revoke(admin: UserAdmin, args: argparse.Namespace) -> int:
    info = admin.revoke_token(args.token_id)
    print(f"token {info.id} of {info.user}: revoked")
    return 0


def _set(admin: UserAdmin, args: argparse.Namespace) -> int:
    projects = [] if args.no_projects else args.project
    if args.role is None and projects is None and args.phi is None:
        print("fiona: nothing to change: give --role, --project, --no-projects or --phi",
              file=sys.stderr)  # fmt: skip
        return 1
    user = admin.change(args.name, role=args.role, projects=projects, phi=args.phi)
    print(f"user {user.name}: {_describe(user)}")
    return 0


def _set_password(admin: UserAdmin, args: argparse.Namespace) -> int:
    admin.existing(args.name)
    password = _password(args)
    if password is None:
        return 1
    admin.reset_password(args.name, password)
    print(f"user {args.name}: new password set")
    return 0


def _disable(admin: UserAdmin, args: argparse.Namespace) -> int:
    user = admin.disable(args.name)
    print(
        f"user {user.name}: disabled (its sessions ended; its password and tokens no longer let"
        f" it in; fiona user enable {user.name} lets it in again)"
    )
    return 0


def _enable(admin: UserAdmin, args: argparse.Namespace) -> int:
    user = admin.enable(args.name)
    print(f"user {user.name}: enabled ({_describe(user)})")
    return 0


def _remove(admin: UserAdmin, args: argparse.Namespace) -> int:
    admin.remove(args.name)
    print(f"user {args.name}: removed, with its tokens")
    return 0


def run_user(args: argparse.Namespace) -> int:
    def command(site: SiteConfig, index: Index) -> int:
        store = UserStore(index)
        admin = UserAdmin(store, AuditLog(site.data_dir), operator())
        try:
            if args.action == "list":
                return _list(store)
            if args.action == "add":
                return _add(admin, args)
            if args.action == "token":
                return _token(admin, args)
            if args.action == "revoke-token":
                return _revoke(admin, args)
            if args.action == "set":
                return _set(admin, args)
            if args.action == "password":
                return _set_password(admin, args)
            if args.action == "disable":
                return _disable(admin, args)
            if args.action == "enable":
                return _enable(admin, args)
            return _remove(admin, args)
        except UserError as exc:
            print(f"fiona: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the audit log could not be written: nothing was done
            print(
                f"fiona: nothing done: cannot write the audit log: {exc.strerror}", file=sys.stderr
            )
            return 1

    return run_with_index(args, command, read_only=args.action == "list")
