"""The portal's pages: each calls the ``/api/v1`` route functions (:data:`engine.web.api.ROUTES`)
and names the template that shows their answer. :data:`PAGES` is the one place that declares
each page's method, path and required role; no page holds logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

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
    """One page: ``GET``/``POST``, its path, who may open it, its handler."""

    method: str
    path: str
    need: Need
    handler: Callable[[Call, Form], View | Redirect]


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
    return View("studies.html", "Studies", values)


def _study(call: Call, form: Form) -> View:
    study = _api(call, "GET", "/studies/{study_uid}", study_uid=call.params["study_uid"])
    return View("study.html", f"Study {study['token']}", {"study": study})


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


#: Every page of the portal (login and logout are the session's, in :mod:`engine.web.portal`).
PAGES: tuple[Page, ...] = (
    Page("GET", "/", Need.READ, _dashboard),
    Page("GET", "/projects", Need.READ, _projects),
    Page("GET", "/quarantine", Need.READ, _quarantine),
    Page("POST", "/quarantine/confirm", Need.ACT, _quarantine_confirm),
    Page("POST", "/quarantine/act", Need.ACT, _quarantine_act),
    Page("GET", "/studies", Need.READ, _studies),
    Page("GET", "/studies/{study_uid}", Need.READ, _study),
    Page("GET", "/studies/{study_uid}/assign", Need.ADMIN, _assign_form),
    Page("POST", "/studies/{study_uid}/assign", Need.ADMIN, _assign),
    Page("GET", "/transfers", Need.READ, _transfers),
    Page("POST", "/transfers/{id}/retry", Need.ACT, _transfer_change("retry")),
    Page("POST", "/transfers/{id}/cancel", Need.ACT, _transfer_change("cancel")),
    Page("GET", "/audit", Need.READ, _audit),
)
