"""The portal's pages: each calls the ``/api/v1`` route functions (:data:`engine.web.api.ROUTES`)
and names the template that shows their answer. :data:`PAGES` is the one place that declares
each page's method, path and required role; no page holds logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode

from starlette.datastructures import QueryParams

from engine.store.studies import STUDY_STATES
from engine.store.users import Role
from engine.web.api import QUARANTINE_PAGE, Call, api_route
from engine.web.auth import ApiError, Need

__all__ = ["PAGES", "Form", "Page", "Redirect", "View"]

#: A posted form: each field's values (checkboxes repeat a name).
Form = dict[str, list[str]]


@dataclass(frozen=True)
class View:
    """A template to render with its values (PHI under ``"phi"`` keys, as the API gives it)."""

    template: str
    title: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Redirect:
    """Go on to another page (after a POST)."""

    url: str


@dataclass(frozen=True)
class Page:
    """One page: ``GET``/``POST``, its path, who may open it, its handler; ``upload``: a POST
    of a multipart form with one file (``file``), bounded by ``web.upload_max_mb``."""

    method: str
    path: str
    need: Need
    handler: Callable[[Call, Form], View | Redirect | Any]  # Any: a streamed download
    upload: bool = False


def _api(
    call: Call,
    method: str,
    path: str,
    body: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    **params: str,
) -> Any:
    """What the API route ``method path`` answers this user (its project checks included);
    ``query``: its query parameters instead of the page's."""
    route = api_route(method, path)
    asked = call.query if query is None else QueryParams(query)
    return route.handler(
        Call(call.user, call.site, call.index, call.projects, params, asked, call.upload,
             body or {})
    )  # fmt: skip


def _field(form: Form, name: str) -> str:
    return (form.get(name) or [""])[0].strip()


def _acts(call: Call) -> bool:
    return call.user.role is not Role.VIEWER


#: The dashboard's hourly chart: pixels of the tallest bar, of one hour's slot, of its bars.
_CHART_HEIGHT, _SLOT, _BAR = 100, 20, 8


def _bars(hours: list[dict[str, Any]]) -> dict[str, Any]:
    """The last day's received and sent per hour as SVG bar geometry (pixels; drawn by the
    template with attributes and classes only: the CSP allows no inline style)."""
    top = max((max(h["received"], h["sent_instances"]) for h in hours), default=0) or 1
    bars = []
    for i, h in enumerate(hours):
        for j, key in enumerate(("received", "sent_instances")):
            height = round(_CHART_HEIGHT * h[key] / top)
            x = i * _SLOT + 2 + j * _BAR
            bars.append({"x": x, "y": _CHART_HEIGHT - height, "height": height, "kind": key,
                         "count": h[key], "hour": h["hour"]})  # fmt: skip
    width = len(hours) * _SLOT
    return {"bars": bars, "width": width, "height": _CHART_HEIGHT, "top": top, "bar": _BAR}


def _held(call: Call, groups: list[dict[str, Any]]) -> int:
    """Held quarantine items the user may see (as ``GET /quarantine`` lists them), counted from
    the status's groups by project and reason rather than listed one by one."""
    user = call.user
    return sum(
        g["items"]
        for g in groups
        if user.sees_all or (g["project"] and user.sees_project(g["project"]))
    )


def _dashboard(call: Call, form: Form) -> View:
    status = _api(call, "GET", "/status")
    values = {
        "status": status,
        "projects": _api(call, "GET", "/projects", query={"counts": "no"}),  # status has them
        "held": _held(call, status["attention"]["quarantine"]),
        "chart": _bars(status["last_day"]),
    }
    return View("dashboard.html", "Dashboard", values)


def _projects(call: Call, form: Form) -> View:
    return View("projects.html", "Projects", {"projects": _api(call, "GET", "/projects")})


def _quarantine(call: Call, form: Form) -> View:
    items = _api(call, "GET", "/quarantine")
    state = call.query.get("state", "held")
    limit = call.int_query("limit", QUARANTINE_PAGE, 1000)
    offset = call.int_query("offset", 0, 10**9)
    more = dict(call.query) | {"offset": str(offset + limit)}
    values = {"items": items, "state": state, "can_act": _acts(call), "offset": offset,
              "next_query": urlencode(more) if len(items) == limit else ""}  # fmt: skip
    return View("quarantine.html", "Quarantine", values)


def _chosen(call: Call, form: Form) -> tuple[str, list[dict[str, Any]]]:
    action = (form.get("action") or [""])[0]
    if action not in ("release", "discard"):
        raise ApiError(400, "no action chosen", "press Release or Discard on the quarantine page")
    qids = form.get("qid") or []
    if not qids:
        raise ApiError(400, "no item selected", "tick the items to change on the quarantine page")
    return action, [_api(call, "GET", "/quarantine/{qid}", qid=q) for q in qids]


def _quarantine_confirm(call: Call, form: Form) -> View:
    action, details = _chosen(call, form)
    return View("confirm.html", f"Confirm: {action}", {"action": action, "items": details})


def _quarantine_act(call: Call, form: Form) -> View:
    action, details = _chosen(call, form)
    if form.get("confirm") != ["yes"]:
        raise ApiError(400, "not confirmed", "confirm on the page that lists the items")
    outcomes = []
    for d in details:
        qid = d["qid"]
        try:
            done = _api(call, "POST", f"/quarantine/{{qid}}/{action}", qid=qid)
            outcomes.append(f"{qid}: {action}d. {done['message']}")
        except ApiError as exc:
            outcomes.append(f"{qid}: {exc.error}")
    return View("result.html", f"Quarantine: {action}", {"outcomes": outcomes,
                                                           "back": "/quarantine"})  # fmt: skip


def _studies(call: Call, form: Form) -> View:
    found = _api(call, "GET", "/studies")
    more = dict(call.query) | {"offset": str(found["offset"] + found["limit"])}
    values = {"found": found, "q": dict(call.query), "next_query": urlencode(more)}
    return View("studies.html", "Studies", {**values, "states": STUDY_STATES})


def _study(call: Call, form: Form) -> View:
    study = _api(call, "GET", "/studies/{study_uid}", study_uid=call.params["study_uid"])
    return View("study.html", f"Study {study['token']}", {"study": study})


def _study_export(call: Call, form: Form) -> Any:
    """The study's last export for ``?project=&format=`` as a zip (the API's download)."""
    return _api(call, "GET", "/studies/{study_uid}/export", study_uid=call.params["study_uid"])


def _assign_form(call: Call, form: Form) -> View:
    uid = call.params["study_uid"]
    study = _api(call, "GET", "/studies/{study_uid}", study_uid=uid)
    names = [p["name"] for p in _api(call, "GET", "/projects") if p["enabled"]]
    values = {"uid": uid, "study": study, "projects": names}
    return View("assign.html", "Assign", values)


def _assign(call: Call, form: Form) -> View:
    uid = call.params["study_uid"]
    body = {k: _field(form, k) for k in ("project", "subject", "event")}
    done = _api(call, "POST", "/studies/{study_uid}/assign", body, study_uid=uid)
    back = f"/studies/{uid}"
    return View("result.html", "Assigned", {"outcomes": [done["message"]], "back": back})


def _transfers(call: Call, form: Form) -> View:
    found = _api(call, "GET", "/transfers")
    return View("transfers.html", "Transfers", {"transfers": found, "can_act": _acts(call)})


def _transfer_change(action: str) -> Callable[[Call, Form], Redirect]:
    def change(call: Call, form: Form) -> Redirect:
        _api(call, "POST", f"/transfers/{{id}}/{action}", id=call.params["id"])
        return Redirect("/transfers")

    return change


def _audit(call: Call, form: Form) -> View:
    entries = _api(call, "GET", "/audit")
    return View("audit.html", "Audit log", {"entries": entries, "q": dict(call.query)})


def _explain_form(call: Call, form: Form) -> View:
    return View("explain.html", "Test a file", {"origin": {}})


def _explain(call: Call, form: Form) -> View:
    origin = {k: _field(form, k) for k in ("calling_ae", "called_ae", "calling_ip")}
    asked = replace(call, query=QueryParams({k: v for k, v in origin.items() if v}))
    found = _api(asked, "POST", "/explain")
    return View("explain.html", "Test a file", {"found": found, "origin": origin})


# -- retrievals ---------------------------------------------------------------------------------


def _retrievals(call: Call, form: Form) -> View:
    granted = [p.name for p in call.projects(call.site) if call.user.sees_project(p.name)]
    values = {
        "jobs": _api(call, "GET", "/retrievals"),
        "pacs": [p.name for p in call.site.pacs],
        "projects": granted,
        "can_act": _acts(call),
    }
    return View("retrievals.html", "Retrievals", values)


def _retrieval(call: Call, form: Form) -> View:
    job = _api(call, "GET", "/retrievals/{job}", job=call.params["job"])
    values = {"job": job, "can_act": _acts(call)}
    return View("retrieval.html", f"Retrieval job {job['job']}", values)


def _retrieval_change(action: str) -> Callable[[Call, Form], Redirect]:
    def change(call: Call, form: Form) -> Redirect:
        _api(call, "POST", f"/retrievals/{{job}}/{action}", job=call.params["job"])
        return Redirect(f"/retrievals/{call.params['job']}")

    return change


def _retrieval_queue(call: Call, form: Form) -> Redirect:
    fields = {k: _field(form, k) for k in ("pacs", "project")}
    asked = replace(call, query=QueryParams({k: v for k, v in fields.items() if v}))
    queued = _api(asked, "POST", "/retrievals")
    return Redirect(f"/retrievals/{queued['job']}")


# -- users (admins) ------------------------------------------------------------------------------


def _users(call: Call, form: Form) -> View:
    values = {"users": _api(call, "GET", "/users"), "roles": [r.value for r in Role]}
    return View("users.html", "Users", values)


def _new_password(form: Form) -> str:
    password = (form.get("password") or [""])[0]
    if password != (form.get("password2") or [""])[0]:
        raise ApiError(400, "the two passwords differ", "type the same password twice")
    return password


def _grants(form: Form) -> dict[str, str]:
    """The role, projects and PHI grant of a user form (an unticked box sends nothing)."""
    projects = [p.strip() for p in form.get("project") or [] if p.strip()]
    projects += [p.strip() for p in _field(form, "more_projects").split(",") if p.strip()]
    return {
        "role": _field(form, "role"),
        "projects": ",".join(projects),
        "phi_grant": "true" if _field(form, "phi_grant") == "true" else "false",
    }


def _user_done(name: str, outcome: str) -> View:
    back = f"/users/{quote(name)}"
    return View("result.html", f"User {name}", {"outcomes": [outcome], "back": back})


def _user_add(call: Call, form: Form) -> View:
    body = {"name": _field(form, "name"), "password": _new_password(form), **_grants(form)}
    made = _api(call, "POST", "/users", body)
    return _user_done(made["name"], f"user {made['name']} added ({made['role']})")


def _user(call: Call, form: Form) -> View:
    user = _api(call, "GET", "/users/{name}", name=call.params["name"])
    known = [p["name"] for p in _api(call, "GET", "/projects")]
    values = {"u": user, "roles": [r.value for r in Role],
              "projects": sorted(set(known) | set(user["projects"]))}  # fmt: skip
    return View("user.html", f"User {user['name']}", values)


def _user_change(call: Call, form: Form) -> View:
    done = _api(call, "POST", "/users/{name}", _grants(form), name=call.params["name"])
    shown = ", ".join(done["projects"]) or "no project"
    grant = "PHI grant" if done["phi_grant"] else "no PHI grant"
    return _user_done(done["name"], f"user {done['name']}: {done['role']}, {shown}, {grant}")


def _user_password(call: Call, form: Form) -> View:
    name = call.params["name"]
    _api(call, "POST", "/users/{name}/password", {"password": _new_password(form)}, name=name)
    return _user_done(name, f"user {name}: new password set")


def _user_access(action: str) -> Callable[[Call, Form], View]:
    """``disable`` or ``enable`` the user of the page."""

    def change(call: Call, form: Form) -> View:
        name = call.params["name"]
        _api(call, "POST", f"/users/{{name}}/{action}", name=name)
        said = {"disable": "disabled: its sessions ended, its password and tokens no longer"
                " let it in", "enable": "enabled again"}[action]  # fmt: skip
        return _user_done(name, f"user {name}: {said}")

    return change


def _user_remove(call: Call, form: Form) -> View:
    name = call.params["name"]
    if form.get("confirm") != ["yes"]:
        raise ApiError(400, "not confirmed", "tick the box saying you mean to remove the user")
    _api(call, "POST", "/users/{name}/remove", name=name)
    outcome = f"user {name}: removed, with its tokens"
    return View("result.html", "User removed", {"outcomes": [outcome], "back": "/users"})


def _token_make(call: Call, form: Form) -> View:
    name = call.params["name"]
    made = _api(call, "POST", "/users/{name}/tokens", {"label": _field(form, "label")}, name=name)
    return View("token.html", f"New token for {name}", {"made": made})


def _token_revoke(call: Call, form: Form) -> View:
    name, token_id = call.params["name"], call.params["token_id"]
    _api(call, "POST", "/users/{name}/tokens/{token_id}/revoke", name=name, token_id=token_id)
    return _user_done(name, f"token {token_id} of {name}: revoked")


#: Every page of the portal (login and logout are the session's, in :mod:`engine.web.portal`).
PAGES: tuple[Page, ...] = (
    Page("GET", "/", Need.READ, _dashboard),
    Page("GET", "/projects", Need.READ, _projects),
    Page("GET", "/quarantine", Need.READ, _quarantine),
    Page("POST", "/quarantine/confirm", Need.ACT, _quarantine_confirm),
    Page("POST", "/quarantine/act", Need.ACT, _quarantine_act),
    Page("GET", "/studies", Need.READ, _studies),
    Page("GET", "/studies/{study_uid}", Need.READ, _study),
    Page("GET", "/studies/{study_uid}/export", Need.READ, _study_export),
    Page("GET", "/studies/{study_uid}/assign", Need.ADMIN, _assign_form),
    Page("POST", "/studies/{study_uid}/assign", Need.ADMIN, _assign),
    Page("GET", "/transfers", Need.READ, _transfers),
    Page("POST", "/transfers/{id}/retry", Need.ACT, _transfer_change("retry")),
    Page("POST", "/transfers/{id}/cancel", Need.ACT, _transfer_change("cancel")),
    Page("GET", "/audit", Need.READ, _audit),
    Page("GET", "/explain", Need.READ, _explain_form),
    Page("POST", "/explain", Need.READ, _explain, upload=True),
    Page("GET", "/retrievals", Need.READ, _retrievals),
    Page("POST", "/retrievals", Need.ACT, _retrieval_queue, upload=True),
    Page("GET", "/retrievals/{job}", Need.READ, _retrieval),
    Page("POST", "/retrievals/{job}/cancel", Need.ACT, _retrieval_change("cancel")),
    Page("POST", "/retrievals/{job}/retry", Need.ACT, _retrieval_change("retry")),
    Page("GET", "/users", Need.ADMIN, _users),
    Page("POST", "/users", Need.ADMIN, _user_add),
    Page("GET", "/users/{name}", Need.ADMIN, _user),
    Page("POST", "/users/{name}", Need.ADMIN, _user_change),
    Page("POST", "/users/{name}/password", Need.ADMIN, _user_password),
    Page("POST", "/users/{name}/disable", Need.ADMIN, _user_access("disable")),
    Page("POST", "/users/{name}/enable", Need.ADMIN, _user_access("enable")),
    Page("POST", "/users/{name}/remove", Need.ADMIN, _user_remove),
    Page("POST", "/users/{name}/tokens", Need.ADMIN, _token_make),
    Page("POST", "/users/{name}/tokens/{token_id}/revoke", Need.ADMIN, _token_revoke),
)
