"""The portal over HTTP: login and logout, sessions, CSRF checks, security headers, and the
Starlette routes of :data:`engine.web.pages.PAGES` rendered with Jinja2 templates.

A browser logs in with a user's password (argon2, :class:`engine.store.users.UserStore`; or the
directory's, :mod:`engine.web.login`) and gets a session cookie (``HttpOnly``,
``SameSite=Strict``, ``Secure`` over TLS); every POST must come from this site (``Origin``, else
``Referer``) and carry the session's CSRF token in the field ``csrf``, or it is refused with 403.
Failed logins are throttled per user and per client address (:mod:`engine.store.sessions`) and
audited, never with the password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route as StarletteRoute

from engine.config.model import ProjectConfig, SiteConfig
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index
from engine.store.sessions import Session, SessionStore
from engine.store.users import UserStore
from engine.web.api import Call
from engine.web.auth import ApiError, check, holds_phi, strip_phi
from engine.web.ldap import Directory
from engine.web.login import DirectoryDown, LoggedIn, check_login
from engine.web.pages import PAGES, Form, Page, Redirect, View
from engine.web.uploads import bounded_form, upload_of

log = logging.getLogger(__name__)

__all__ = ["HEADERS", "portal_routes"]

_HERE = Path(__file__).parent
#: Headers of every portal answer: no caching, no frames, no inline script, no sniffing.
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self';"
    " form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
}
_ENV = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True),
)


def _shown_value(value: Any) -> str:
    """A value of the status document as a person reads it (a mapping: ``key value, ...``;
    None: ``-``)."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_shown_value(v)}" for k, v in value.items())
    return str(value)


def _gib(value: Any) -> str:
    """Bytes as GiB with one decimal."""
    return f"{value / 2**30:.1f} GiB" if isinstance(value, int | float) else "-"


def _when(value: Any) -> str:
    """Seconds since the epoch as local ``YYYY-MM-DD HH:MM``; None: ``-``."""
    if not isinstance(value, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))


_ENV.filters["shown"] = _shown_value
_ENV.filters["when"] = _when
_ENV.filters["gib"] = _gib


class Portal:
    """The portal of one site: its sessions, users, audit log and the cookie it sets."""

    def __init__(
        self,
        site: SiteConfig,
        index: Index,
        projects: Callable[[SiteConfig], list[ProjectConfig]],
    ) -> None:
        self.site, self.index, self.projects = site, index, projects
        self.sessions = SessionStore(index)
        self.users = UserStore(index)
        self.directory = Directory(site.web.ldap) if site.web.ldap is not None else None
        if site.web.ldap is not None:
            where = " ".join(site.web.ldap.urls)
            log.info("portal: people with no local user log in through the directory at %s", where)
        self.tls = site.web.cert_file is not None and site.web.key_file is not None
        self.idle = site.web.session_idle_minutes * 60.0
        self.most = site.web.session_max_hours * 3600.0

    def audit(self, event: str, **fields: Any) -> None:
        AuditLog(self.site.data_dir).write(event, **fields)

    # -- rendering -------------------------------------------------------------------------------

    def page(
        self, template: str, title: str, session: Session | None, code: int = 200, **values: Any
    ) -> Response:
        html = _ENV.get_template(template).render(
            title=title,
            user=session.user if session else None,
            csrf=session.csrf if session else "",
            messages=values.pop("messages", []),
            **values,
        )
        return HTMLResponse(html, code, headers=HEADERS)

    def error(self, exc: ApiError, session: Session | None) -> Response:
        return self.page(
            "error.html", "Not done", session, exc.status, error=exc.error, fix=exc.fix
        )

    # -- sessions and checks -----------------------------------------------------------------------

    def https(self, request: Request) -> bool:
        """Whether the browser reached us over HTTPS: our own TLS, or a trusted reverse proxy
        saying so (``X-Forwarded-Proto``, believed only from ``web.trusted_proxies``)."""
        return self.tls or request.url.scheme == "https"

    def cookie(self, request: Request) -> str:
        """The session cookie's name; over HTTPS ``__Host-``: the browser keeps it to this
        host and path, and only over HTTPS."""
        return "__Host-fiona_session" if self.https(request) else "fiona_session"

    def session_of(self, request: Request) -> Session | None:
        raw = request.cookies.get(self.cookie(request), "")
        return self.sessions.find(raw, self.idle, self.most) if raw else None

    def same_origin(self, request: Request) -> bool:
        """Whether a POST comes from a page of this site (``Origin``, else ``Referer``)."""
        host = request.headers.get("host", "")
        source = request.headers.get("origin") or request.headers.get("referer") or ""
        return bool(host) and urlsplit(source).netloc == host

    def check_post(self, request: Request, session: Session, form: Form) -> None:
        if not self.same_origin(request):
            raise ApiError(403, "the form was not sent from this site", "open the page again")
        token = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise ApiError(
                403, "the form's security token is missing or stale", "reload the page, try again"
            )

    def set_cookie(self, request: Request, response: Response, session_id: str) -> None:
        response.set_cookie(
            self.cookie(request),
            session_id,
            max_age=int(self.most),
            path="/",
            secure=self.https(request),
            httponly=True,
            samesite="strict",
        )


async def _form(request: Request) -> Form:
    form = await request.form(max_files=0, max_fields=2000)
    out: Form = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            out.setdefault(key, []).append(value)
    await form.close()
    return out


async def _upload_form(portal: Portal, request: Request) -> tuple[Form, bytes]:
    """The fields and the file of a test-a-file form (at most ``web.upload_max_mb``). The
    same-origin check comes first: no other site's page makes us read an upload."""
    if not portal.same_origin(request):
        raise ApiError(403, "the form was not sent from this site", "open the page again")
    form = await bounded_form(request, int(portal.site.web.upload_max_mb * 2**20))
    fields: Form = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields.setdefault(key, []).append(value)
    try:
        return fields, await upload_of(form)
    finally:
        await form.close()


def _next(raw: str) -> str:
    """A local path to go to after the login (anything else: the dashboard)."""
    if raw.startswith("/") and not raw.startswith("//") and raw.isprintable() and not any(
        c in raw for c in " \\"
    ):
        return raw
    return "/"


def _login_routes(portal: Portal) -> list[StarletteRoute]:
    async def show(request: Request) -> Response:
        nxt = _next(request.query_params.get("next", "/"))
        return portal.page("login.html", "Log in", None, next=nxt)

    async def login(request: Request) -> Response:
        form = await _form(request)
        name = (form.get("name") or [""])[0].strip()
        password = (form.get("password") or [""])[0]
        nxt = _next((form.get("next") or ["/"])[0])
        if not portal.same_origin(request):
            err = ApiError(403, "the form was not sent from this site", "open /login again")
            return portal.error(err, None)
        return await run_in_threadpool(_check_login, portal, request, name, password, nxt)

    async def logout(request: Request) -> Response:
        session = await run_in_threadpool(portal.session_of, request)
        if session is not None:
            try:
                portal.check_post(request, session, await _form(request))
            except ApiError as exc:
                return portal.error(exc, session)
            await run_in_threadpool(portal.sessions.end, request.cookies[portal.cookie(request)])
            portal.audit("logout", operator=f"web:{session.user.name}", user=session.user.name)
        answer = RedirectResponse("/login", 303, headers=HEADERS)
        answer.delete_cookie(
            portal.cookie(request), path="/", secure=portal.https(request), httponly=True
        )
        return answer

    return [
        StarletteRoute("/login", show, methods=["GET"]),
        StarletteRoute("/login", login, methods=["POST"]),
        StarletteRoute("/logout", logout, methods=["POST"]),
    ]


def _check_login(portal: Portal, request: Request, name: str, password: str, nxt: str) -> Response:
    address = request.client.host if request.client else "-"
    # The name as typed is kept only hashed, and audited only when it is a user's: people type
    # their password into the name field.
    keys = [f"user:{hashlib.sha256(name.lower().encode()).hexdigest()[:32]}", f"addr:{address}"]
    known = name if portal.users.get(name[:64]) is not None else "(no such user)"
    wait = portal.sessions.locked_for(keys)
    if wait > 0:
        portal.audit("login_refused", user=known, address=address, why="throttled")
        return portal.page(
            "login.html", "Log in", None, 429, next=nxt,
            messages=[f"too many failed logins: try again in {int(wait) + 1} s"],
        )  # fmt: skip
    outcome = check_login(portal.users, portal.directory, name, password)
    if isinstance(outcome, DirectoryDown):  # not counted as a failure: nobody guessed wrong
        portal.audit("login_refused", user=known, address=address, why="directory not reachable")
        return portal.page(
            "login.html", "Log in", None, 503, next=nxt,
            messages=["the directory (LDAP) is not reachable: try again in a while, or ask an"
                      " admin to look at fiona's log"],
        )  # fmt: skip
    if not isinstance(outcome, LoggedIn):
        failures = portal.sessions.failed(keys)
        if outcome.why:
            portal.audit("login_refused", user=outcome.user, address=address, why=outcome.why,
                         failures=failures)  # fmt: skip
        else:
            portal.audit("login_failed", user=known, address=address, failures=failures)
        return portal.page(
            "login.html", "Log in", None, 401, next=nxt,
            messages=["wrong user name or password"],
        )  # fmt: skip
    user = outcome.user
    if outcome.regranted:  # who held which grants when: as fiona user add is audited
        grants = {"role": user.role.value, "projects": list(user.projects), "phi_grant": user.phi}
        portal.audit("user_directory_grants", operator="directory", user=user.name, **grants)
    portal.sessions.succeeded(keys[:1])
    portal.sessions.purge(portal.idle, portal.most)
    session_id, _ = portal.sessions.start(user.name)
    portal.audit("login", operator=f"web:{user.name}", user=user.name, address=address)
    answer = RedirectResponse(nxt, 303, headers=HEADERS)
    portal.set_cookie(request, answer, session_id)
    return answer


def _shown(portal: Portal, call: Call, page: Page, view: View) -> dict[str, Any]:
    """The view's values as the user may see them: without PHI for users without the grant;
    with it, an audit entry naming the user (and the study's token) first."""
    if not call.user.phi:
        return dict(strip_phi(view.values))
    if holds_phi(view.values):
        uid = call.params.get("study_uid")
        portal.audit(
            "phi_viewed",
            operator=call.who,
            user=call.user.name,
            route=f"{page.method} {page.path} (portal)",
            study=uid_token(uid) if uid else "",
        )
    return view.values


def _page_endpoint(portal: Portal, page: Page) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        session = await run_in_threadpool(portal.session_of, request)
        if session is None:
            if page.method == "GET":
                query = f"?{request.url.query}" if request.url.query else ""
                target = quote(request.url.path + query, safe="/")
                return RedirectResponse(f"/login?next={target}", 303, headers=HEADERS)
            return portal.error(ApiError(403, "not logged in", "log in, then try again"), None)
        try:
            form: Form = {}
            upload = None
            if page.upload:
                form, upload = await _upload_form(portal, request)
            elif page.method == "POST":
                form = await _form(request)
            if page.method == "POST":
                portal.check_post(request, session, form)
            check(session.user, page.need)
            call = Call(
                session.user, portal.site, portal.index, portal.projects,
                dict(request.path_params), request.query_params, upload,
            )  # fmt: skip
            done = await run_in_threadpool(page.handler, call, form)
            if isinstance(done, Redirect):
                return RedirectResponse(done.url, 303, headers=HEADERS)
            if isinstance(done, Response):  # a download, streamed as the API streams it
                done.headers.update(HEADERS)
                return done
            values = await run_in_threadpool(_shown, portal, call, page, done)
        except ApiError as exc:
            return portal.error(exc, session)
        return portal.page(done.template, done.title, session, **values)

    return endpoint


def portal_routes(
    site: SiteConfig,
    index: Index,
    projects: Callable[[SiteConfig], list[ProjectConfig]],
) -> list[StarletteRoute]:
    """The portal's routes: login, logout, the stylesheet and every page of :data:`PAGES`."""
    portal = Portal(site, index, projects)
    css = (_HERE / "portal.css").read_text(encoding="utf-8")

    def stylesheet(request: Request) -> Response:
        return Response(css, headers={**HEADERS, "Cache-Control": "max-age=300"},
                        media_type="text/css")  # fmt: skip

    routes = [*_login_routes(portal), StarletteRoute("/portal.css", stylesheet)]
    routes += [StarletteRoute(p.path, _page_endpoint(portal, p), methods=[p.method]) for p in PAGES]
    return routes
