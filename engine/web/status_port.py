"""The deprecated ``status_http`` section, kept working for one release on the web's code.

Sites that set ``status_http.port`` have Prometheus and monitoring pointed at it, so that port
still answers, without a login, what the web server answers there: ``GET /status.json`` and
``GET /metrics`` (:func:`engine.web.server.status_routes`), and ``GET /`` the ``fiona status``
text (the HTML page it served is the portal's dashboard now). ``fiona validate`` and the start
log say how to move off it (:func:`engine.config.validate.status_http_deprecated`). When it
names the web's own port, the web server answers there already and nothing more is started.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route as StarletteRoute

from engine.config.model import SiteConfig
from engine.manage.status import collect_status, render_text
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.web.server import (
    WebServer,
    index_away_response,
    listen,
    own_index,
    status_routes,
    uvicorn_config,
)

log = logging.getLogger(__name__)

__all__ = ["start_status_port"]

_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def status_app(site: SiteConfig, index: Index) -> Starlette:
    """``/status.json``, ``/metrics`` and ``/`` (the status as text); nothing else."""

    def text(request: Request) -> Response:
        return PlainTextResponse(render_text(collect_status(site, index)) + "\n", headers=_HEADERS)

    async def index_away(request: Request, exc: Exception) -> Response:
        return index_away_response(request.url.path)

    return Starlette(
        routes=[*status_routes(site, index), StarletteRoute("/", text)],
        exception_handlers={IndexUnavailable: index_away},
    )


def start_status_port(site: SiteConfig) -> WebServer | None:
    """The ``status_http`` port's server, or None when it is off, is the web's own port, or
    cannot listen (the log says why; the receiver and the jobs run without it)."""
    cfg = site.status_http
    if not cfg.port:
        return None
    if site.web.enabled and cfg.port == site.web.port:
        log.info("status_http: port %d is the web portal's, which serves the same", cfg.port)
        return None
    try:
        sock = listen(cfg.bind, cfg.port)
    except OSError as exc:
        log.error("status_http: cannot listen on %s:%d: %s", cfg.bind, cfg.port, exc.strerror)
        return None
    index = own_index(site, sock)
    if index is None:
        return None
    app = status_app(site, index)
    server = WebServer(app, sock, uvicorn_config(app, None, None), index)
    log.info("status_http (deprecated) on http://%s:%d/ (/status.json, /metrics)", cfg.bind,
             server.port)  # fmt: skip
    return server
