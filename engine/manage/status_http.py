"""The read-only status page of ``fiona serve`` (site config ``status_http``, off by default).

Deprecated: the web API (site config ``web``, :mod:`engine.web`) serves the same
``/status.json``, ``/`` and ``/metrics``; this stand-alone page stays for sites that use it
until the web portal's dashboard replaces it.

``GET /status.json`` answers the JSON of ``fiona status --json``; ``GET /`` a small HTML page
rendering it; ``GET /metrics`` Prometheus metrics (:mod:`engine.manage.metrics`). Each is
computed when asked. Nothing else is served and nothing can be changed. The content is counts,
times and project names only (no PHI), and the page binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine.config.model import SiteConfig
from engine.manage.metrics import render
from engine.manage.status import collect_status, render_text, verdict
from engine.store.index import Index

log = logging.getLogger(__name__)

__all__ = ["StatusPage", "render_page", "start_for_site", "start_status_page"]

StatusFn = Callable[[], dict[str, Any]]
#: The metrics for an HTTP ``Accept`` header: (body, Content-Type).
MetricsFn = Callable[[str], tuple[bytes, str]]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<title>fiona status</title>
<style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}
.ok{{color:#060}}.warn{{color:#a60}}.bad{{color:#a00}}</style></head>
<body><h1 class="{css}">fiona: {state}</h1>
<pre>{text}</pre>
<p><a href="/status.json">status.json</a> · <a href="/metrics">metrics</a>
(refreshes every 30 s)</p></body></html>
"""


def _css(doc: dict[str, Any]) -> str:
    """The heading's colour: unhealthy red, needing attention amber, else green."""
    if not doc["healthy"]:
        return "bad"
    return "warn" if doc["attention"]["needed"] else "ok"


def render_page(doc: dict[str, Any]) -> str:
    """The HTML status page of a status document (:func:`collect_status`)."""
    return _PAGE.format(
        css=_css(doc), state=html.escape(verdict(doc)), text=html.escape(render_text(doc))
    )


def _handler(status: StatusFn, metrics: MetricsFn | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics" and metrics is not None:
                self._metrics(metrics)
                return
            if path not in ("/", "/status.json"):
                self._send(404, "text/plain; charset=utf-8", b"not found\n")
                return
            try:
                doc = status()
            except Exception:
                log.exception("status page: could not collect the status")
                self._send(500, "text/plain; charset=utf-8", b"status unavailable\n")
                return
            if path == "/status.json":
                body = json.dumps(doc, indent=2, sort_keys=True).encode()
                self._send(200, "application/json", body)
                return
            self._send(200, "text/html; charset=utf-8", render_page(doc).encode())

        def _metrics(self, render: MetricsFn) -> None:
            try:
                body, content_type = render(self.headers.get("Accept", ""))
            except Exception:
                log.exception("status page: could not collect the metrics")
                self._send(500, "text/plain; charset=utf-8", b"metrics unavailable\n")
                return
            self._send(200, content_type, body)

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # http.server prints every request to stderr; a status poller would flood the log.
            log.debug("status page: " + format, *args)

    return Handler


class StatusPage:
    """A running status page; :meth:`stop` shuts it down."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_status_page(
    bind: str, port: int, status: StatusFn, metrics: MetricsFn | None = None
) -> StatusPage:
    """Serve the status page (and ``/metrics`` when ``metrics`` is given) on ``bind``:``port``
    in a daemon thread."""
    server = ThreadingHTTPServer((bind, port), _handler(status, metrics))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="status-page", daemon=True)
    thread.start()
    return StatusPage(server, thread)


def start_for_site(site: SiteConfig, index: Index) -> StatusPage | None:
    """The site's status page (``status_http``), or None when it is off or cannot listen."""
    cfg = site.status_http
    if not cfg.port:
        return None
    try:
        page = start_status_page(
            cfg.bind,
            cfg.port,
            lambda: collect_status(site, index),
            lambda accept: render(site, index, accept),
        )
    except OSError as exc:
        # The page is a convenience: the receiver and the jobs run without it.
        log.error("status page: cannot listen on %s:%d: %s", cfg.bind, cfg.port, exc.strerror)
        return None
    log.info("status page on http://%s:%d/ (metrics at /metrics)", cfg.bind, page.port)
    return page
