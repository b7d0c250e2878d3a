"""The routes of ``/api/v1/retrievals``: the retrieval jobs ``fiona retrieve`` queues and
``fiona serve`` works, through the same functions (:mod:`engine.retrieve.jobs`).

A job belongs to its project (the one given when it was queued): coordinators see and queue
jobs of their projects, admins all. What a row asks for (accession number, patient ID, dates)
is under ``phi`` keys, shown only to users with the PHI grant (and audited).
"""

from __future__ import annotations

from typing import Any

from engine.retrieve.jobs import QueueError, cancel_job, job_rows, queue_list, requeue_job
from engine.retrieve.lists import ListError, parse_list
from engine.store.retrievals import RetrievalStore
from engine.web.auth import ApiError, Need, check_project
from engine.web.call import Call, Route

__all__ = ["RETRIEVE_ROUTES"]

#: Bytes of the largest list a POST may upload (MAX_ROWS lines fit easily).
_LIST_MAX = 8 * 2**20


def _visible(call: Call, job: dict[str, Any]) -> bool:
    return call.user.sees_all or (bool(job["project"]) and call.user.sees_project(job["project"]))


def _jobs(call: Call) -> list[dict[str, Any]]:
    return [j for j in RetrievalStore(call.index).jobs() if _visible(call, j)]


def _granted_job(call: Call) -> dict[str, Any]:
    """The job of the path, when the user's projects include it (404, 403)."""
    raw = call.params["job"]
    found = RetrievalStore(call.index).jobs(int(raw)) if raw.isdigit() else []
    if not found:
        raise ApiError(404, f"no retrieval job {raw}", "list them: GET /api/v1/retrievals")
    check_project(call.user, str(found[0]["project"]))
    return found[0]


def _job(call: Call) -> dict[str, Any]:
    found = _granted_job(call)
    return {**found, "rows_detail": job_rows(call.index, int(found["job"]), phi=True)}


def _cancel(call: Call) -> dict[str, Any]:
    job = int(_granted_job(call)["job"])
    return {"job": job, "cancelled": cancel_job(call.site, call.index, job, operator=call.who)}


def _retry(call: Call) -> dict[str, Any]:
    job = int(_granted_job(call)["job"])
    return {"job": job, "queued": requeue_job(call.site, call.index, job, operator=call.who)}


def _queue(call: Call) -> dict[str, Any]:
    if not call.upload:
        raise ApiError(400, "no list uploaded", "POST multipart/form-data with a field 'file'")
    if len(call.upload) > _LIST_MAX:
        raise ApiError(413, "the list is too large", "split it into lists of 10,000 rows or fewer")
    pacs, project = call.query.get("pacs", ""), call.query.get("project", "")
    name = call.query.get("name", "") or "upload.csv"
    if not project and not call.user.sees_all:
        raise ApiError(400, "project is required", "give ?project=P, one granted to you")
    if project:
        check_project(call.user, project)
    try:
        rows = parse_list(call.upload.decode("utf-8-sig"), name)
    except UnicodeDecodeError as exc:
        raise ApiError(422, "the list is not UTF-8 text", "save the CSV as UTF-8") from exc
    except ListError as exc:
        raise ApiError(422, "the list has problems", "; ".join(exc.problems[:20])) from exc
    rows_projects = {r.project for r in rows if r.project}
    for named in sorted(rows_projects):
        check_project(call.user, named)
    known = [p.name for p in call.projects(call.site)]
    try:
        job = queue_list(
            call.site, call.index, pacs, rows, name,
            project=project, known_projects=known, operator=call.who,
        )  # fmt: skip
    except QueueError as exc:
        raise ApiError(400, str(exc), "see GET /api/v1/status and the site config's pacs") from exc
    return {"job": job, "rows": len(rows), "pacs": pacs, "project": project}


#: The retrieval routes, in the order of the OpenAPI document.
RETRIEVE_ROUTES: tuple[Route, ...] = (
    Route("GET", "/retrievals", Need.READ, "Retrieval jobs and their rows by state", _jobs),
    Route(
        "GET",
        "/retrievals/{job}",
        Need.READ,
        "One retrieval job: each row's state, instances arrived/expected and reason",
        _job,
    ),
    Route(
        "POST",
        "/retrievals/{job}/cancel",
        Need.ACT,
        "Cancel a job's unfinished rows (fiona retrieve cancel JOB)",
        _cancel,
    ),
    Route(
        "POST",
        "/retrievals/{job}/retry",
        Need.ACT,
        "Queue a job's partial, failed and cancelled rows again (fiona retrieve retry JOB)",
        _retry,
    ),
    Route(
        "POST",
        "/retrievals",
        Need.ACT,
        "Queue a CSV list for a PACS (fiona retrieve NAME --list FILE.csv --project P)",
        _queue,
        query=("pacs", "project", "name"),
        upload=True,
    ),
)
