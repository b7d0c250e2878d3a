"""Who is calling, and what they may do: bearer tokens, roles, project grants, PHI.

Every API error is an :class:`ApiError`, rendered as ``{"error": ..., "fix": ...}``: what went
wrong, and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from starlette.requests import Request

from engine.store.users import Role, User, UserStore

__all__ = ["ApiError", "Need", "authenticate", "check", "check_project", "strip_phi"]


@dataclass
class ApiError(Exception):
    """An HTTP error with a body that says what to fix."""

    status: int
    error: str
    fix: str

    def body(self) -> dict[str, str]:
        return {"error": self.error, "fix": self.fix}


class Need(Enum):
    """What a route needs of its caller: ``READ`` any user, ``ACT`` a coordinator or admin
    (changes state), ``ADMIN`` an admin."""

    READ = "read"
    ACT = "act"
    ADMIN = "admin"


UNAUTHENTICATED = ApiError(
    401,
    "no valid API token",
    "send 'Authorization: Bearer TOKEN' with a token made by 'fiona user token NAME'"
    " (a revoked token, or a disabled user's, no longer works)",
)


def authenticate(request: Request, users: UserStore) -> User:
    """The user whose bearer token the request carries; :data:`UNAUTHENTICATED` otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UNAUTHENTICATED
    user = users.authenticate(token)
    if user is None:
        raise UNAUTHENTICATED
    return user


def check(user: User, need: Need) -> None:
    """403 when the user's role does not allow what the route needs."""
    if need is Need.ADMIN and user.role is not Role.ADMIN:
        raise ApiError(403, "only an admin may do this", "ask an admin to do it")
    if need is Need.ACT and user.role is Role.VIEWER:
        raise ApiError(
            403,
            "a viewer may only read",
            "ask an admin or a coordinator of the project to do it",
        )


def check_project(user: User, project: str) -> None:
    """403 when the item's project (empty: the item belongs to no project) is not granted."""
    if user.sees_all or (project and user.sees_project(project)):
        return
    what = f"project {project!r}" if project else "items of no project"
    raise ApiError(
        403,
        f"{what} is not granted to user {user.name!r}",
        "ask an admin to grant the project (fiona user add NAME --project P)",
    )


def strip_phi(value: Any) -> Any:
    """``value`` without any ``"phi"`` key, at any depth (for users without the PHI grant)."""
    if isinstance(value, dict):
        return {k: strip_phi(v) for k, v in value.items() if k != "phi"}
    if isinstance(value, list):
        return [strip_phi(v) for v in value]
    return value


def holds_phi(value: Any) -> bool:
    """Whether ``value`` has a non-empty ``"phi"`` value at any depth."""
    if isinstance(value, dict):
        return any((k == "phi" and bool(v)) or holds_phi(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_phi(v) for v in value)
    return False
