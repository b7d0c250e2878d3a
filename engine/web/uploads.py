"""Multipart forms with a file, read with a bound on their size (Starlette bounds a form's
fields but spools its files to disk whatever their size): the API's ``POST /api/v1/explain``
and the portal's test-a-file page."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.types import Message

from engine.web.auth import ApiError

__all__ = ["bounded_form", "upload_of"]


def _too_big(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the upload is larger than {limit / 2**20:g} MiB",
        "upload one DICOM file (web.upload_max_mb in the site config sets the limit)",
    )


#: Bytes of a too large upload read and dropped before the 413 is sent: a client still
#: sending when the connection closes sees a reset instead of the answer.
DRAIN_MAX = 64 * 2**20


async def _refuse(request: Request, limit: int, read: int) -> ApiError:
    """The 413 of a too large upload, once the rest of it is read (up to :data:`DRAIN_MAX`)."""
    async for chunk in request.stream():
        read += len(chunk)
        if read > limit + DRAIN_MAX:
            break
    return _too_big(limit)


async def bounded_form(request: Request, limit: int, max_files: int = 1) -> FormData:
    """The request's multipart form when its body is at most ``limit`` bytes; 413 otherwise
    (nothing kept of it), 400 when it is no multipart form."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise await _refuse(request, limit, 0)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise await _refuse(request, limit, len(body))
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=max_files, max_fields=20)
    except Exception as exc:
        raise ApiError(
            400,
            "the body is not a multipart form",
            "POST a form with a field 'file' (curl -F file=@image.dcm)",
        ) from exc


async def upload_of(form: FormData) -> bytes:
    """The bytes of the form's ``file`` field; 400 when there is none or it is empty."""
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "no file uploaded", "choose a DICOM file to upload (field 'file')")
    data = await upload.read()
    if not data:
        raise ApiError(400, "the uploaded file is empty", "choose a DICOM file to upload")
    return data
