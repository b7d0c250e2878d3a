"""What an admin does to users, from ``fiona user`` or the portal's users page: add, change,
reset a password, disable and enable, remove, make and revoke API tokens. Each change writes
its audit entry (the acting operator and the user's name, never a password or a token's
secret) before it is made, so an audit log that cannot be written leaves everything as it was
(``OSError``).

The last enabled admin stays an admin: removing, disabling or demoting them is refused, so the
portal always has someone who can manage it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.store.audit import AuditLog
from engine.store.users import (
    Role,
    TokenInfo,
    User,
    UserError,
    UserStore,
    check_name,
    check_password,
)

__all__ = ["Conflict", "Unknown", "UserAdmin", "user_json"]


class Unknown(UserError):
    """No such user or token."""


class Conflict(UserError):
    """The change is refused by the users as they are: the name is taken, or it would leave
    no admin."""


def user_json(store: UserStore, user: User) -> dict[str, Any]:
    """A user as the users page and ``GET /api/v1/users`` show it: its grants and its tokens'
    ids and times (never a secret; times in seconds since the epoch). The grant is
    ``phi_grant``: the API strips every ``"phi"`` key from the answers of users without it."""
    return {
        "name": user.name,
        "role": user.role.value,
        "projects": list(user.projects),
        "phi_grant": user.phi,
        "source": str(getattr(user, "source", "") or "local"),
        "created_at": user.created_at,
        "disabled_at": user.disabled_at,
        "tokens": [_token_json(t) for t in store.tokens(user.name)],
    }


def _token_json(t: TokenInfo) -> dict[str, Any]:
    return {
        "id": t.id,
        "label": t.label,
        "created_at": t.created_at,
        "last_used_at": t.last_used_at,
        "revoked_at": t.revoked_at,
    }


@dataclass
class UserAdmin:
    """The user changes of one operator (``web:NAME`` or the OS account of a command)."""

    store: UserStore
    audit: AuditLog
    operator: str

    def existing(self, name: str) -> User:
        """The user ``name``; :class:`Unknown` when there is none."""
        user = self.store.get(name)
        if user is None:
            raise Unknown(f"no user {name!r} (fiona user list)")
        return user

    def _keep_an_admin(self, user: User, what: str) -> None:
        """UserError when ``user`` is the only enabled admin (``what`` would leave none)."""
        admins = [u for u in self.store.all() if u.role is Role.ADMIN and not u.disabled]
        if user.role is Role.ADMIN and not user.disabled and len(admins) <= 1:
            raise Conflict(
                f"user {user.name!r} is the last admin: cannot {what} them;"
                " make another admin first"
            )

    def add(
        self, name: str, role: Role | str, password: str, projects: Iterable[str] = (),
        phi: bool = False,
    ) -> User:  # fmt: skip
        """A new user (its password: at least 12 characters)."""
        check_name(name)
        check_password(password)
        role = Role(role)
        if self.store.get(name) is not None:
            raise Conflict(f"user {name!r} exists already (fiona user list)")
        granted = sorted(set(projects))
        self.audit.write(
            "user_add", operator=self.operator, user=name, role=role.value,
            phi_grant=phi, projects=granted,
        )  # fmt: skip
        return self.store.add(name, role, password, projects=granted, phi=phi)

    def change(
        self,
        name: str,
        *,
        role: Role | str | None = None,
        projects: Iterable[str] | None = None,
        phi: bool | None = None,
    ) -> User:
        """Change a user's role, projects or PHI grant (None: keep it)."""
        user = self.existing(name)
        role = None if role is None else Role(role)
        if role is not None and role is not Role.ADMIN:
            self._keep_an_admin(user, f"make {role.value}")
        granted = None if projects is None else sorted(set(projects))
        changes: dict[str, Any] = {"role": role.value if role else None, "phi_grant": phi,
                                   "projects": granted}  # fmt: skip
        self.audit.write(
            "user_change", operator=self.operator, user=name,
            **{k: v for k, v in changes.items() if v is not None},
        )  # fmt: skip
        return self.store.update(name, role=role, projects=granted, phi=phi)

    def reset_password(self, name: str, password: str) -> None:
        """Give a user a new password (at least 12 characters)."""
        self.existing(name)
        check_password(password)
        self.audit.write("user_password", operator=self.operator, user=name)
        self.store.set_password(name, password)

    def remove(self, name: str) -> None:
        """Delete a user with its tokens and sessions."""
        self._keep_an_admin(self.existing(name), "remove")
        self.audit.write("user_remove", operator=self.operator, user=name)
        self.store.remove(name)

    def disable(self, name: str) -> User:
        """Stop a user from logging in or using its tokens (its sessions end); its row,
        grants and tokens stay, for the record and for :meth:`enable`."""
        self._keep_an_admin(self.existing(name), "disable")
        self.audit.write("user_disable", operator=self.operator, user=name)
        return self.store.set_disabled(name, True)

    def enable(self, name: str) -> User:
        """Let a disabled user in again, with the grants and tokens it had."""
        self.existing(name)
        self.audit.write("user_enable", operator=self.operator, user=name)
        return self.store.set_disabled(name, False)

    def make_token(self, name: str, label: str = "") -> tuple[TokenInfo, str]:
        """A new API token for ``name``: its row and the token (to show once)."""
        self.existing(name)
        if len(label) > 64 or not label.isprintable():
            raise UserError("a token's label: at most 64 printable characters")
        info, token = self.store.make_token(name, label)
        try:
            self.audit.write("user_token", operator=self.operator, user=name, token_id=info.id)
        except OSError:
            self.store.revoke(info.id)  # never shown, never usable
            raise
        return info, token

    def revoke_token(self, token_id: str, name: str | None = None) -> TokenInfo:
        """Revoke a token by its id (of user ``name`` when given)."""
        token_id = token_id.split(".", 1)[0]
        found = [t for t in self.store.tokens(name) if t.id == token_id]
        if not found:
            whose = f" of user {name!r}" if name else ""
            raise Unknown(f"no token {token_id!r}{whose} (fiona user list shows them)")
        self.audit.write(
            "user_token_revoked", operator=self.operator, user=found[0].user, token_id=token_id
        )
        return self.store.revoke(token_id)
