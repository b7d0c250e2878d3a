"""The web application and its server: Starlette on uvicorn, in a thread of ``fiona serve``.

Besides ``/api/v1`` it serves the portal (:mod:`engine.web.portal`; its dashboard at ``/``
took the place of the old status page) and, without a login (counts, times and project names
only, no PHI), ``GET /status.json`` and ``GET /metrics``. Every answer carries
``Cache-Control: no-store`` and headers that keep it out of frames and sniffing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as StarletteRoute

from engine.config.model import ProjectConfig, SiteConfig
from engine.manage.attention import projects_signature
from engine.manage.metrics import render
from engine.manage.status import collect_status, index_away_status
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.index import Index, IndexUnusable, SqliteIndex, open_index
from engine.store.users import UserStore
from engine.web.api import ROUTES, Call, Route
from engine.web.auth import ApiError, authenticate, check, holds_phi, strip_phi
from engine.web.openapi import openapi_document
from engine.web.portal import portal_routes
from engine.web.uploads import bounded_form, upload_of

log = logging.getLogger(__name__)

__all__ = [
    "WebServer",
    "build_app",
    "cached_projects",
    "listen",
    "start_for_site",
    "status_routes",
]

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def _json(body: Any, status: int = 200) -> Response:
    text = json.dumps(body, sort_keys=True, default=str)
    return Response(text, status, headers=_HEADERS, media_type="application/json")


def _endpoint(
    route: Route,
    site: SiteConfig,
    index: Index,
    projects: Callable[[SiteConfig], list[ProjectConfig]],
) -> Callable[[Request], Any]:
    users = UserStore(index)

    async def endpoint(request: Request) -> Response:
        try:
            user = await run_in_threadpool(authenticate, request, users)
            check(user, route.need)
            call = Call(
                user, site, index, projects, dict(request.path_params), request.query_params
            )
            if route.upload:
                limit = int(site.web.upload_max_mb * 2**20)
                call.upload = await upload_of(await bounded_form(request, limit))
            if route.body:
                call.body = await _json_body(request, route.body)
            body = await run_in_threadpool(route.handler, call)
            if isinstance(body, Response):  # a download (a zip): de-identified data only
                return body
            body = await run_in_threadpool(_shown, call, route, body)
        except ApiError as exc:
            return _json(exc.body(), exc.status)
        return _json(body)

    return endpoint


def _shown(call: Call, route: Route, body: Any) -> Any:
    """The body as the user may see it: without PHI for users without the grant; with it, an
    audit entry naming the user (and the study's token) is written first."""
    if not call.user.phi:
        return strip_phi(body)
    if holds_phi(body):
        uid = call.params.get("study_uid")
        AuditLog(call.site.data_dir).write(
            "phi_viewed",
            operator=call.who,
            user=call.user.name,
            route=f"{route.method} /api/v1{route.path}",
            study=uid_token(uid) if uid else "",
        )
    return body


async def _json_body(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
    """The route's string ``fields`` of a JSON object body (others are ignored)."""
    try:
        doc = await request.json()
    except ValueError as exc:
        raise ApiError(400, "the body is not JSON", "send a JSON object") from exc
    if not isinstance(doc, dict) or not all(isinstance(doc.get(f, ""), str) for f in fields):
        raise ApiError(400, "the body is not an object of strings", f"fields: {', '.join(fields)}")
    return {f: str(doc[f]) for f in fields if f in doc}


def status_routes(site: SiteConfig, index: Index) -> list[StarletteRoute]:
    """``GET /status.json`` (``fiona status --json``) and ``GET /metrics`` (Prometheus text or
    OpenMetrics, as the scraper's ``Accept`` asks), without a login: counts, times and project
    names only."""

    def status_json(request: Request) -> Response:
        try:
            return _json(collect_status(site, index))
        except IndexUnavailable as exc:  # monitoring gets the health verdict, not an error
            return _json(index_away_status(site, f"{index.location}: {exc}"), 503)

    def metrics(request: Request) -> Response:
        body, content_type = render(site, index, request.headers.get("accept", ""))
        return Response(body, headers={**_HEADERS, "Content-Type": content_type})

    return [StarletteRoute("/status.json", status_json), StarletteRoute("/metrics", metrics)]


def build_app(
    site: SiteConfig,
    index: Index,
    projects: Callable[[SiteConfig], list[ProjectConfig]],
) -> Starlette:
    """The application: ``/api/v1`` (:data:`ROUTES`), its OpenAPI document, ``/status.json``
    and ``/metrics``, the portal."""

    def openapi(request: Request) -> Response:
        return _json(openapi_document())

    routes = [*status_routes(site, index), StarletteRoute("/api/v1/openapi.json", openapi)]
    routes += [
        StarletteRoute("/api/v1" + r.path, _endpoint(r, site, index, projects), methods=[r.method])
        for r in ROUTES
    ]
    routes += portal_routes(site, index, projects)

    async def http_error(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        if code == 405:
            return _json({"error": "method not allowed", "fix": "see /api/v1/openapi.json"}, 405)
        return _json(
            {"error": f"no such path: {request.url.path}", "fix": "see /api/v1/openapi.json"},
            code,
        )

    async def index_away(request: Request, exc: Exception) -> Response:
        return index_away_response(request.url.path)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("web: %s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        return _json({"error": "internal error", "fix": "see the fiona log; try again"}, 500)

    return Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error,
            IndexUnavailable: index_away,
            Exception: server_error,
        },
    )


_AWAY_FIX = "fiona waits for its index database and resumes by itself; try again in a minute"
_AWAY_PAGE = (
    "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
    "<title>fiona: index unavailable</title></head><body>"
    "<h1>The index is unavailable</h1><p>fiona cannot reach its index database just now (it was"
    " restarted, or the network to it is down). Nothing received is lost.</p>"
    f"<p>{_AWAY_FIX}.</p></body></html>"
)


def index_away_response(path: str) -> Response:
    """503 while the index database cannot be reached: JSON for the API, a page for people
    (no login either: the sessions are in the index). ``Retry-After`` for clients."""
    headers = {**_HEADERS, "Retry-After": "30"}
    if path.startswith("/api/") or path in ("/status.json", "/metrics"):
        body = json.dumps({"error": "index unavailable", "fix": _AWAY_FIX}, sort_keys=True)
        return Response(body, 503, headers=headers, media_type="application/json")
    return Response(_AWAY_PAGE, 503, headers=headers, media_type="text/html")


class WebServer:
    """uvicorn serving an app on a socket we bound, in a daemon thread; :meth:`stop` ends it
    (and closes ``index``, the web's own connection, when it has one)."""

    def __init__(
        self,
        app: Starlette,
        sock: socket.socket,
        cfg: uvicorn.Config,
        index: SqliteIndex | None = None,
    ) -> None:
        self.sock = sock
        self.index = index
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        if self.index is not None:
            self.index.close()


def listen(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def cached_projects(
    load: Callable[[SiteConfig], list[ProjectConfig]],
) -> Callable[[SiteConfig], list[ProjectConfig]]:
    """``load`` (the enabled projects) called again only when a project file changed (see
    :func:`engine.manage.attention.loaded_projects`): a study page or an explanation would
    otherwise parse and check every project file per request."""
    cache: dict[Path, tuple[object, list[ProjectConfig]]] = {}
    lock = threading.Lock()

    def projects(site: SiteConfig) -> list[ProjectConfig]:
        signature = projects_signature(site.projects_dir)
        with lock:
            hit = cache.get(site.projects_dir)
            if hit is not None and signature and hit[0] == signature:
                return hit[1]
            found = load(site)
            cache[site.projects_dir] = (signature, found)
            return found

    return projects


def own_index(site: SiteConfig, sock: socket.socket) -> SqliteIndex | None:
    """A connection of the web's own to the site's index (None, ``sock`` closed and the
    reason logged, when it cannot be opened)."""
    try:
        return open_index(site.index_url, site.data_dir / "index.sqlite", upgrade=False)
    except IndexUnusable as exc:
        sock.close()
        log.error("web: %s", exc)
        return None


def uvicorn_config(
    app: Starlette, cert: Path | None, key: Path | None, trusted_proxies: tuple[str, ...] = ()
) -> uvicorn.Config:
    """uvicorn for ``app``: fiona's logging, no access log, TLS with ``cert`` and ``key``,
    ``X-Forwarded-*`` believed only from ``trusted_proxies``."""
    return uvicorn.Config(
        app,
        log_config=None,  # fiona's logging stays as it is
        access_log=False,
        lifespan="off",
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
        server_header=False,
        # X-Forwarded-For/-Proto believed only from the configured reverse proxies.
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=list(trusted_proxies),
    )


def start_for_site(
    site: SiteConfig,
    projects: Callable[[SiteConfig], list[ProjectConfig]],
) -> WebServer | None:
    """The site's web API (``web``), or None when it is off or cannot listen (the receiver
    and the jobs run without it; the log says why).

    The web reads the index through a connection of its own (``fiona serve`` has opened and
    upgraded it already): a slow page then waits for SQLite, not for the lock of the
    receiver's connection, and WAL lets it read while the receiver commits."""
    cfg = site.web
    if not cfg.enabled:
        return None
    try:
        sock = listen(cfg.bind, cfg.port)
    except OSError as exc:
        log.error("web: cannot listen on %s:%d: %s", cfg.bind, cfg.port, exc.strerror)
        return None
    index = own_index(site, sock)
    if index is None:
        return None
    app = build_app(site, index, cached_projects(projects))
    tls = cfg.cert_file is not None and cfg.key_file is not None
    cert, key = (cfg.cert_file, cfg.key_file) if tls else (None, None)
    config = uvicorn_config(app, cert, key, cfg.trusted_proxies)
    server = WebServer(app, sock, config, index)
    scheme = "https" if tls else "http"
    log.info(
        "web portal on %s://%s:%d/ (API at /api/v1, /status.json, /metrics)",
        scheme,
        cfg.bind,
        server.port,
    )
    return server
