"""The routes of ``/api/v1/users`` (admins only): the users, their grants and tokens, as
``fiona user`` manages them, through the same functions (:class:`engine.manage.users.UserAdmin`,
audited under the acting admin's name). No answer carries a password or a token's secret, but
the one that makes the token.

A JSON body's fields are strings: ``projects`` comma-separated (``"alpha,beta"``; empty: none),
``phi_grant`` ``"true"`` or ``"false"``.
"""

from __future__ import annotations

from typing import Any

from engine.manage.users import Conflict, Unknown, UserAdmin, user_json
from engine.store.audit import AuditLog
from engine.store.users import Role, User, UserError, UserStore
from engine.web.auth import ApiError, Need
from engine.web.call import Call, Route

__all__ = ["USER_ROUTES"]

_ROLES = ", ".join(r.value for r in Role)


def _admin(call: Call) -> UserAdmin:
    return UserAdmin(UserStore(call.index), AuditLog(call.site.data_dir), call.who)


def _target(call: Call) -> User:
    found = UserStore(call.index).get(call.params["name"])
    if found is None:
        raise ApiError(404, f"no user {call.params['name']!r}", "list them: GET /api/v1/users")
    return found


def _role(call: Call) -> Role | None:
    raw = call.body.get("role")
    if raw is None:
        return None
    try:
        return Role(raw.strip())
    except ValueError as exc:
        raise ApiError(400, f"no role {raw!r}", f"give one of: {_ROLES}") from exc


def _projects(call: Call) -> list[str] | None:
    raw = call.body.get("projects")
    return None if raw is None else [p.strip() for p in raw.split(",") if p.strip()]


def _phi(call: Call) -> bool | None:
    raw = call.body.get("phi_grant")
    if raw is None:
        return None
    if raw.strip().lower() not in ("true", "false"):
        raise ApiError(400, "phi_grant takes 'true' or 'false'", 'give e.g. "phi_grant": "false"')
    return raw.strip().lower() == "true"


def _doing(call: Call, action: Any) -> Any:
    """``action()``, with a change the users refuse as 409, an unknown user or token as 404,
    a bad name or password as 400 and an audit log that cannot be written as 503 (nothing
    changed then)."""
    try:
        return action()
    except UserError as exc:
        code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, Unknown) else 400
        raise ApiError(code, str(exc), "see GET /api/v1/users") from exc
    except OSError as exc:
        raise ApiError(
            503, "nothing changed: cannot write the audit log", "free disk space"
        ) from exc


def _list(call: Call) -> list[dict[str, Any]]:
    store = UserStore(call.index)
    return [user_json(store, u) for u in store.all()]


def _show(call: Call) -> dict[str, Any]:
    return user_json(UserStore(call.index), _target(call))


def _add(call: Call) -> dict[str, Any]:
    role = _role(call)
    if role is None:
        raise ApiError(400, "no role given", f"give one of: {_ROLES}")
    name, password = call.body.get("name", "").strip(), call.body.get("password", "")
    user = _doing(call, lambda: _admin(call).add(
        name, role, password, _projects(call) or (), bool(_phi(call)),
    ))  # fmt: skip
    return user_json(UserStore(call.index), user)


def _change(call: Call) -> dict[str, Any]:
    name = _target(call).name
    role, projects, phi = _role(call), _projects(call), _phi(call)
    if role is None and projects is None and phi is None:
        raise ApiError(400, "nothing to change", "give role, projects or phi_grant")
    user = _doing(
        call, lambda: _admin(call).change(name, role=role, projects=projects, phi=phi)
    )
    return user_json(UserStore(call.index), user)


def _password(call: Call) -> dict[str, Any]:
    name = _target(call).name
    _doing(call, lambda: _admin(call).reset_password(name, call.body.get("password", "")))
    return {"name": name, "done": True}


def _remove(call: Call) -> dict[str, Any]:
    name = _target(call).name
    _doing(call, lambda: _admin(call).remove(name))
    return {"name": name, "removed": True}


def _disable(call: Call) -> dict[str, Any]:
    name = _target(call).name
    return user_json(UserStore(call.index), _doing(call, lambda: _admin(call).disable(name)))


def _enable(call: Call) -> dict[str, Any]:
    name = _target(call).name
    return user_json(UserStore(call.index), _doing(call, lambda: _admin(call).enable(name)))


def _make_token(call: Call) -> dict[str, Any]:
    name = _target(call).name
    info, token = _doing(call, lambda: _admin(call).make_token(name, call.body.get("label", "")))
    return {"id": info.id, "user": name, "label": info.label, "token": token,
            "note": "shown once: store it now"}  # fmt: skip


def _revoke_token(call: Call) -> dict[str, Any]:
    name = _target(call).name
    info = _doing(call, lambda: _admin(call).revoke_token(call.params["token_id"], name))
    return {"id": info.id, "user": name, "revoked_at": info.revoked_at}


#: The routes of /api/v1/users, part of :data:`engine.web.api.ROUTES`.
USER_ROUTES: tuple[Route, ...] = (
    Route("GET", "/users", Need.ADMIN, "Users: role, projects, PHI grant, tokens (no secret)",
          _list),
    Route("POST", "/users", Need.ADMIN, "Add a user (audited)", _add,
          body=("name", "role", "projects", "phi_grant", "password")),
    Route("GET", "/users/{name}", Need.ADMIN, "A user and its tokens (no secret)", _show),
    Route("POST", "/users/{name}", Need.ADMIN,
          "Change a user's role, projects or PHI grant (audited)", _change,
          body=("role", "projects", "phi_grant")),
    Route("POST", "/users/{name}/password", Need.ADMIN, "Set a user's password (audited)",
          _password, body=("password",)),
    Route("POST", "/users/{name}/disable", Need.ADMIN,
          "Disable a user: its sessions end, its password and tokens no longer let it in"
          " (audited; never the last admin)", _disable),
    Route("POST", "/users/{name}/enable", Need.ADMIN, "Enable a disabled user (audited)",
          _enable),
    Route("POST", "/users/{name}/remove", Need.ADMIN,
          "Remove a user with its tokens (audited; never the last admin)", _remove),
    Route("POST", "/users/{name}/tokens", Need.ADMIN,
          "Make an API token; the answer is the only place its secret is shown (audited)",
          _make_token, body=("label",)),
    Route("POST", "/users/{name}/tokens/{token_id}/revoke", Need.ADMIN,
          "Revoke a token (audited)", _revoke_token),
)  # fmt: skip
