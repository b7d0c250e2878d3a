"""The routes of ``/api/v1``: each parses, calls the engine function its CLI command calls, and
returns JSON-ready data. :data:`ROUTES` is the one place that declares each route's method,
path, required role (:class:`Need`) and description (the OpenAPI document is built from it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.responses import StreamingResponse

from engine.manage.assign import AssignError, assign
from engine.manage.audit_cli import matcher
from engine.manage.explain_file import NotDicom, explain_upload
from engine.manage.export import FORMATS, ExportError, export_files, zip_stream
from engine.manage.overview import project_overview, study_detail
from engine.manage.quarantine_cli import item_details, item_facts
from engine.manage.release import Item, Releaser, find_items, get_item
from engine.manage.status import collect_status
from engine.store.audit import AuditLog, uid_token
from engine.store.studies import STUDY_STATES, StudyFilter, find_studies
from engine.transfer.cli import change_transfer, transfer_json
from engine.transfer.outbox import Outbox
from engine.web.api_retrieve import RETRIEVE_ROUTES
from engine.web.api_users import USER_ROUTES
from engine.web.auth import ApiError, Need, check_project
from engine.web.call import Call, Route

__all__ = ["QUARANTINE_PAGE", "ROUTES", "Call", "Route", "api_route"]

#: Quarantine items listed per request unless ``limit`` says otherwise (each with its facts).
QUARANTINE_PAGE = 100


# -- status and projects -----------------------------------------------------------------------


def _status(call: Call) -> dict[str, Any]:
    doc = collect_status(call.site, call.index)
    shown = call.visible()
    if shown is not None:
        doc["projects"] = {k: v for k, v in doc["projects"].items() if k in shown}
    return doc


def _projects(call: Call) -> list[dict[str, Any]]:
    counts = call.query.get("counts", "yes") != "no"
    found = project_overview(call.site, call.index, counts=counts)
    return [p for p in found if call.user.sees_project(p["name"])]


# -- quarantine --------------------------------------------------------------------------------


def _item(call: Call) -> Item:
    try:
        item = get_item(call.index, call.params["qid"])
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0]), "list the items: GET /api/v1/quarantine") from exc
    check_project(call.user, item.project)
    return item


def _quarantine_list(call: Call) -> list[dict[str, Any]]:
    state = call.query.get("state", "held")
    items = find_items(
        call.index,
        state=None if state == "all" else state,
        reason=call.query.get("reason"),
        project=call.query.get("project"),
        projects=call.visible(),
        limit=call.int_query("limit", QUARANTINE_PAGE, 1000),
        offset=call.int_query("offset", 0, 10**9),
    )
    return [{**i.as_json(), "facts": item_facts(call.index, call.site.data_dir, i)} for i in items]


def _quarantine_show(call: Call) -> dict[str, Any]:
    return item_details(call.index, call.site.data_dir, _item(call))


def _quarantine_change(action: str) -> Callable[[Call], dict[str, Any]]:
    def change(call: Call) -> dict[str, Any]:
        item = _item(call)
        releaser = Releaser(call.site, call.index, AuditLog(call.site.data_dir), call.who)
        try:
            outcome = releaser.release(item) if action == "release" else releaser.discard(item)
        except OSError as exc:
            raise ApiError(
                503, f"not {action}d: cannot write the audit log", "free disk space, try again"
            ) from exc
        if not outcome.done:
            raise ApiError(409, f"{item.qid}: not {action}d: {outcome.message}", "see the item")
        return {"qid": item.qid, "done": True, "message": outcome.message}

    return change


# -- transfers ---------------------------------------------------------------------------------


def _transfers(call: Call) -> list[dict[str, Any]]:
    outbox = Outbox(call.index, call.site.data_dir)
    states = call.query.getlist("state")
    found = outbox.find(
        states=states,
        project=call.query.get("project"),
        limit=call.int_query("limit", 50, 1000),
    )
    return [transfer_json(r) for r in found if call.user.sees_project(r.project)]


def _transfer_change(action: str) -> Callable[[Call], dict[str, Any]]:
    def change(call: Call) -> dict[str, Any]:
        raw = call.params["id"]
        outbox = Outbox(call.index, call.site.data_dir)
        record = outbox.get(int(raw)) if raw.isdigit() else None
        if record is None:
            raise ApiError(404, f"no transfer {raw}", "list them: GET /api/v1/transfers")
        check_project(call.user, record.project)
        audit = AuditLog(call.site.data_dir)
        try:
            record = change_transfer(outbox, audit, action, record.id, call.who)
        except ValueError as exc:
            raise ApiError(409, str(exc.args[0]), "see its state: GET /api/v1/transfers") from exc
        return transfer_json(record)

    return change


# -- audit, studies, explain -------------------------------------------------------------------


def _audit(call: Call) -> list[dict[str, Any]]:
    since = call.query.get("since")
    if since and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
        raise ApiError(400, "since takes a day, YYYY-MM-DD", "give e.g. since=2026-01-31")
    asked = matcher(
        study_uid=call.query.get("study_uid"),
        project=call.query.get("project"),
        events=call.query.getlist("event"),
        since=since,
    )
    shown = call.visible()

    def keep(e: dict[str, Any]) -> bool:
        if shown is not None and not (
            e.get("project") in shown or set(e.get("projects", ())) & set(shown)
        ):
            return False
        return asked(e)

    limit = call.int_query("limit", 500, 10_000)
    return AuditLog(call.site.data_dir).latest(limit, keep, since=since)


def _studies(call: Call) -> dict[str, Any]:
    limit = call.int_query("limit", 50, 500)
    offset = call.int_query("offset", 0, 10**9)
    q = call.query
    state = q.get("state") or None
    if state is not None and state not in STUDY_STATES:
        raise ApiError(400, f"unknown study state {state!r}", f"one of {', '.join(STUDY_STATES)}")
    f = StudyFilter(
        projects=call.visible(),
        project=q.get("project"),
        state=state,
        modality=q.get("modality"),
        date_from=(q.get("date_from") or "").replace("-", "") or None,
        date_to=(q.get("date_to") or "").replace("-", "") or None,
        text=q.get("text"),
        phi=call.user.phi,
    )
    total, rows = find_studies(call.index, f, limit=limit, offset=offset)
    return {"total": total, "limit": limit, "offset": offset, "studies": rows}


def _study(call: Call) -> dict[str, Any]:
    uid = call.params["study_uid"]
    found = study_detail(call.site, call.index, uid, call.projects(call.site), call.visible())
    if found is None:
        raise ApiError(404, f"no study {uid}", "find it: GET /api/v1/studies?text=...")
    shown = call.visible()
    if shown is not None and not set(found["projects"]) & set(shown):
        raise ApiError(
            403,
            "the study is not routed to a project granted to you",
            "ask an admin to grant the project",
        )
    return found


def _assign(call: Call) -> dict[str, Any]:
    uid = call.params["study_uid"]
    project = call.body.get("project", "")
    try:
        message = assign(
            call.site, call.index, call.projects(call.site), uid, project,
            subject=call.body.get("subject", ""), event=call.body.get("event", ""),
            operator=call.who,
        )  # fmt: skip
    except AssignError as exc:
        raise ApiError(404, str(exc), "see GET /api/v1/projects and GET /api/v1/studies") from exc
    except OSError as exc:
        raise ApiError(503, "not assigned: cannot write the audit log", "free disk space") from exc
    return {"study_uid": uid, "project": project, "message": message}


def _explain(call: Call) -> dict[str, Any]:
    if not call.upload:
        raise ApiError(400, "no file uploaded", "POST multipart/form-data with a field 'file'")
    q = call.query
    origin = (
        q.get("calling_ae", ""),
        q.get("called_ae", call.site.ae_title),
        q.get("calling_ip", ""),
    )
    # Only the projects granted: their steps name destinations others need not know.
    granted = [p for p in call.projects(call.site) if call.user.sees_project(p.name)]
    try:
        return explain_upload(
            call.site, call.upload, origin, granted,
            operator=call.who, user=call.user.name, phi=call.user.phi,
        )  # fmt: skip
    except NotDicom as exc:
        raise ApiError(
            422, "not a DICOM file fiona can read", "upload a DICOM file (Part 10, with a study"
            " and a series UID)",
        ) from exc  # fmt: skip
    except OSError as exc:
        raise ApiError(503, "not explained: cannot write the audit log", "free disk space") from exc


def _export(call: Call) -> StreamingResponse:
    """The study's last export for a project as a zip, streamed (audited)."""
    project, fmt = call.query.get("project", ""), call.query.get("format", "dicom")
    if not project:
        raise ApiError(400, "project is required", "give e.g. ?project=neuro&format=bids")
    if fmt not in FORMATS:
        raise ApiError(400, f"unknown format {fmt!r}", f"give one of {', '.join(FORMATS)}")
    check_project(call.user, project)
    study = call.params["study_uid"]
    try:
        files = export_files(call.index, call.site.data_dir, study, project, fmt)
    except ExportError as exc:
        raise ApiError(404, str(exc), "see GET /api/v1/studies/{study_uid} for its runs") from exc
    AuditLog(call.site.data_dir).write(
        "exported", operator=call.who, study=uid_token(study), project=project, format=fmt,
        files=len(files),
    )  # fmt: skip
    name = f"{project}_{uid_token(study)}_{fmt}.zip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(zip_stream(files), media_type="application/zip", headers=headers)


#: Every route of /api/v1, in the order of the OpenAPI document.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/status", Need.READ, "Health, counts, outbox (fiona status --json)", _status),
    Route(
        "GET",
        "/projects",
        Need.READ,
        "Projects: enabled, validation errors, counts (counts=no: without)",
        _projects,
        query=("counts",),
    ),
    Route(
        "GET",
        "/quarantine",
        Need.READ,
        "Quarantine items with their context, oldest first, paginated",
        _quarantine_list,
        query=("state", "reason", "project", "limit", "offset"),
    ),
    Route(
        "GET",
        "/quarantine/{qid}",
        Need.READ,
        "One item: sidecar, runs, transfers",
        _quarantine_show,
    ),
    Route(
        "POST",
        "/quarantine/{qid}/release",
        Need.ACT,
        "Release a held item (audited)",
        _quarantine_change("release"),
    ),
    Route(
        "POST",
        "/quarantine/{qid}/discard",
        Need.ACT,
        "Discard a held item (audited)",
        _quarantine_change("discard"),
    ),
    Route(
        "GET",
        "/transfers",
        Need.READ,
        "Transfers, newest first",
        _transfers,
        query=("state", "project", "limit"),
    ),
    Route(
        "POST",
        "/transfers/{id}/retry",
        Need.ACT,
        "Queue a transfer again (audited)",
        _transfer_change("retry"),
    ),
    Route(
        "POST",
        "/transfers/{id}/cancel",
        Need.ACT,
        "Stop a transfer (audited)",
        _transfer_change("cancel"),
    ),
    Route(
        "GET",
        "/audit",
        Need.READ,
        "Audit entries, oldest first",
        _audit,
        query=("study_uid", "project", "event", "since", "limit"),
    ),
    Route(
        "GET",
        "/studies",
        Need.READ,
        "Studies, newest first, filtered and paginated",
        _studies,
        query=("project", "state", "modality", "date_from", "date_to", "text", "limit", "offset"),
    ),
    Route(
        "GET",
        "/studies/{study_uid}",
        Need.READ,
        "A study: series, labels, routes, runs, transfers, audit, explanation",
        _study,
    ),
    Route(
        "GET",
        "/studies/{study_uid}/export",
        Need.READ,
        "Download a project's de-identified study (dicom) or its NIfTI/BIDS as a zip (audited)",
        _export,
        query=("project", "format"),
    ),
    Route(
        "POST",
        "/studies/{study_uid}/assign",
        Need.ADMIN,
        "Assign a study to a project, subject and event; it is then routed there (audited)",
        _assign,
        body=("project", "subject", "event"),
    ),
    Route(
        "POST",
        "/explain",
        Need.READ,
        "Upload a DICOM file: which projects claim it and why, its labels, the steps (audited)",
        _explain,
        query=("calling_ae", "called_ae", "calling_ip"),
        upload=True,
    ),
    *USER_ROUTES,
    *RETRIEVE_ROUTES,
)


def api_route(method: str, path: str) -> Route:
    """The route of :data:`ROUTES` answering ``method path`` (the portal's pages call them)."""
    for route in ROUTES:
        if (route.method, route.path) == (method, path):
            return route
    raise KeyError(f"no API route {method} {path}")
