"""The web portal in a real headless Chromium (Selenium, Debian's chromium and chromedriver)
and over plain HTTP, against the running ``fiona serve`` of :mod:`tests.test_web`'s ``site``
(alpha's study held as ``transfer_failed``, beta's classified; users admin with ``phi``,
coord_a, coord_b, viewer). The tests run in file order: the release comes after the tests
that need the held item, login throttling last (it locks the client address for a while).
"""

from __future__ import annotations

import http.client
import http.cookiejar
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.store.audit import AuditLog
from engine.store.index import open_index
from engine.store.sessions import SessionStore
from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index, separate_index
from tests.peers import REPO, FionaServer, free_port, nodelay_env, wait_for_port
from tests.test_tls import tls_files  # noqa: F401  (the fixture)
from tests.test_web import PASSWORD, Site, _alpha_qid, _held, _wait, explain_file, multipart
from tests.test_web import site as web_site

#: The running service of tests/test_web.py (its module-scoped fixture, here under this name).
site = pytest.fixture(scope="module", name="site")(web_site.__wrapped__)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# -- plain HTTP --------------------------------------------------------------------------------


class Browser:
    """urllib with a cookie jar, sending ``Origin`` as a browser does."""

    def __init__(self, site: Site, origin: str | None = "same", follow: bool = True) -> None:
        self.base = f"http://127.0.0.1:{site.web_port}"
        self.origin = self.base if origin == "same" else origin
        self.jar = http.cookiejar.CookieJar()
        handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPCookieProcessor(self.jar)]
        if not follow:
            handlers.append(_NoRedirect())
        self.opener = urllib.request.build_opener(*handlers)
        self.last_headers: list[tuple[str, str]] = []

    def go(
        self, path: str, form: dict[str, str | list[str]] | None = None,
        headers: dict[str, str] | None = None, body: tuple[bytes, str] | None = None,
    ) -> tuple[int, str]:  # fmt: skip
        """GET ``path``, or POST ``form`` (urlencoded) or ``body`` (bytes, Content-Type)."""
        data = None if form is None else urllib.parse.urlencode(form, doseq=True).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        if body is not None:
            request.data = body[0]
            request.add_header("Content-Type", body[1])
        if request.data is not None and self.origin:
            request.add_header("Origin", self.origin)
        try:
            with self.opener.open(request, timeout=60) as answer:
                self.last_headers = list(answer.headers.items())
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            self.last_headers = list(exc.headers.items())
            return exc.code, exc.read().decode()

    def login(
        self, name: str, password: str = PASSWORD, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        return self.go("/login", {"name": name, "password": password, "next": "/"}, headers)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def test_a_login_sets_a_strict_httponly_cookie_and_the_pages_carry_a_csp(site: Site) -> None:
    anonymous = Browser(site)
    status, html = anonymous.go("/quarantine")
    assert status == 200 and 'id="login"' in html  # sent to the login page
    raw = urllib.request.urlopen(f"{anonymous.base}/login", timeout=30)
    csp = raw.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "script-src" not in csp  # no script at all, inline or not
    b = Browser(site, follow=False)
    status, _ = b.login("coord_a")
    assert status == 303
    cookie = next(v for k, v in b.last_headers if k.lower() == "set-cookie")
    assert cookie.startswith("fiona_session=") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    session_id = cookie.split(";")[0].split("=", 1)[1]
    with connect_index(site.root / "data" / "index.sqlite") as db:
        stored = [r[0] for r in db.execute("SELECT id_hash FROM web_sessions")]
    assert stored and session_id not in stored  # kept hashed only
    entries = AuditLog(site.root / "data").entries()
    assert any(e["event"] == "login" and e["user"] == "coord_a" for e in entries)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_a_post_without_the_csrf_token_or_from_elsewhere_is_403(site: Site) -> None:
    qid = _alpha_qid(site)
    b = Browser(site)
    assert b.login("coord_a")[0] == 200
    status, html = b.go("/")  # the dashboard: what needs a human, alpha's counts
    assert status == 200 and "quarantine held items: 1" in html and "<td>alpha</td>" in html
    status, html = b.go("/quarantine")
    assert status == 200 and qid in html
    token = _csrf(html)
    form: dict[str, str | list[str]] = {"action": "release", "qid": [qid], "confirm": "yes"}
    assert b.go("/quarantine/act", form)[0] == 403
    assert b.go("/quarantine/act", form | {"csrf": "x" * 43})[0] == 403
    b.origin = "http://evil.example"
    assert b.go("/quarantine/act", form | {"csrf": token})[0] == 403
    b.origin = b.base
    status, html = b.go("/quarantine/confirm", {"action": "release", "qid": [qid], "csrf": token})
    assert status == 200 and 'id="confirm"' in html  # the token works: the confirmation step
    assert _alpha_qid(site) == qid  # nothing released
    # A viewer's token is good, but a viewer may only read.
    v = Browser(site)
    v.login("viewer")
    vtoken = _csrf(v.go("/")[1])
    asked = {"action": "release", "qid": [qid], "csrf": vtoken}
    assert v.go("/quarantine/confirm", asked)[0] == 403


def test_logout_ends_the_session(site: Site) -> None:
    b = Browser(site)
    b.login("viewer")
    status, html = b.go("/")
    assert status == 200 and 'id="logout"' in html
    assert b.go("/logout", {"csrf": _csrf(html)})[0] == 200
    status, html = b.go("/")
    assert 'id="login"' in html and 'id="logout"' not in html


def test_an_idle_or_too_old_session_has_ended(site: Site) -> None:
    index = open_index("", site.root / "data" / "index.sqlite")
    try:
        sessions = SessionStore(index)
        sid, _ = sessions.start("viewer", now=1000.0)
        assert sessions.find(sid, idle=60, most=3600, now=1050.0) is not None
        assert sessions.find(sid, idle=60, most=3600, now=1111.0) is None  # idle
        sid, _ = sessions.start("viewer", now=1000.0)
        for t in range(1050, 4700, 50):  # last: 3650 s after the login
            found = sessions.find(sid, idle=60, most=3600, now=float(t))
        assert found is None  # busy, but over the absolute limit
        left, _ = sessions.start("viewer", now=1000.0)  # never used again
        assert sessions.purge(idle=60, most=3600, now=1100.0) >= 1
        assert sessions.find(left, idle=10**9, most=10**9, now=1100.0) is None
    finally:
        index.close()


def test_over_tls_the_cookie_is_secure_and_host_bound(
    tmp_path: Path,
    empty_projects: Path,
    tls_files: tuple[Path, Path],  # noqa: F811  (the fixture of tests/test_tls.py)
) -> None:
    key, cert = tls_files
    port = free_port()
    config = tmp_path / "site.yaml"
    web = {"enabled": True, "port": port, "cert_file": str(cert), "key_file": str(key)}
    config.write_text(yaml.safe_dump({"web": web}))
    server = FionaServer(tmp_path / "data", empty_projects, config=config, web_port=None).start()
    try:
        wait_for_port(port, 30, server.proc)
        pw = tmp_path / "pw.txt"
        pw.write_text(PASSWORD + "\n")
        made = subprocess.run(
            [sys.executable, "-m", "engine.cli", "user", "add", "ann", "--role", "viewer",
             "--password-file", str(pw), "--config", str(config), "--data",
             str(tmp_path / "data"), "--projects", str(empty_projects)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        base = f"https://127.0.0.1:{port}"
        form = urllib.parse.urlencode({"name": "ann", "password": PASSWORD}).encode()
        request = urllib.request.Request(f"{base}/login", data=form, headers={"Origin": base})
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )
        with pytest.raises(urllib.error.HTTPError) as moved:
            opener.open(request, timeout=30)
        assert moved.value.code == 303
        cookie = moved.value.headers["Set-Cookie"]
        assert cookie.startswith("__Host-fiona_session=") and "Secure" in cookie
        assert "HttpOnly" in cookie and "Path=/" in cookie and "Domain" not in cookie
    finally:
        server.stop()


# -- headless Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chrome() -> Iterator[object]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        why = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    profile = tempfile.mkdtemp(prefix="fiona-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(10)  # seconds a lookup waits for the next page to load
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _login(driver: object, site: Site, name: str) -> None:
    from selenium.webdriver.common.by import By

    d: object = driver
    d.delete_all_cookies() if "/" in d.current_url else None  # type: ignore[attr-defined]
    d.get(f"http://127.0.0.1:{site.web_port}/login")  # type: ignore[attr-defined]
    d.delete_all_cookies()  # type: ignore[attr-defined]
    d.find_element(By.ID, "name").send_keys(name)  # type: ignore[attr-defined]
    d.find_element(By.ID, "password").send_keys(PASSWORD)  # type: ignore[attr-defined]
    d.find_element(By.CSS_SELECTOR, "#login button").click()  # type: ignore[attr-defined]
    assert d.find_element(By.ID, "logout")  # type: ignore[attr-defined]


def test_a_coordinator_does_not_see_another_projects_studies(site: Site, chrome: object) -> None:
    from selenium.webdriver.common.by import By

    d: object = chrome
    _login(d, site, "coord_b")
    base = f"http://127.0.0.1:{site.web_port}"
    d.get(f"{base}/studies")  # type: ignore[attr-defined]
    html = d.page_source  # type: ignore[attr-defined]
    assert site.beta_uid in html and site.alpha_uid not in html
    d.get(f"{base}/quarantine")  # type: ignore[attr-defined]
    assert not d.find_elements(By.CSS_SELECTOR, "tr.item")  # type: ignore[attr-defined]
    d.get(f"{base}/studies/{site.alpha_uid}")  # type: ignore[attr-defined]
    assert "is not routed to a project granted to you" in d.page_source  # type: ignore[attr-defined]
    d.get(f"{base}/projects")  # type: ignore[attr-defined]
    rows = d.find_elements(By.CSS_SELECTOR, "tr.project")  # type: ignore[attr-defined]
    assert [r.get_attribute("id") for r in rows] == ["p-beta"]


def test_without_the_phi_grant_no_page_names_the_patient(site: Site, chrome: object) -> None:
    d: object = chrome
    base = f"http://127.0.0.1:{site.web_port}"
    pages = ["/", "/projects", "/quarantine", "/studies", f"/studies/{site.alpha_uid}",
             f"/studies/{site.beta_uid}", "/transfers", "/audit",
             "/quarantine?state=all"]  # fmt: skip
    for user in ("viewer", "coord_a"):
        _login(d, site, user)
        for path in pages:
            d.get(base + path)  # type: ignore[attr-defined]
            html = d.page_source  # type: ignore[attr-defined]
            assert "Not done" not in html or path.endswith(site.beta_uid), (user, path)
            for value in site.patients:
                assert value not in html, (user, path)
    # The admin has the grant: the study page names the patient, and the view is audited.
    _login(d, site, "admin")
    d.get(f"{base}/studies/{site.alpha_uid}")  # type: ignore[attr-defined]
    assert any(v in d.page_source for v in site.patients)  # type: ignore[attr-defined]
    seen = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "phi_viewed"]
    assert seen[-1]["user"] == "admin" and seen[-1]["route"].endswith("(portal)")
    assert not any(v in str(seen) for v in site.patients)


def test_the_dashboard_charts_the_last_day_and_shows_disk_and_jobs(
    site: Site, chrome: object
) -> None:
    from selenium.webdriver.common.by import By

    d: object = chrome
    _login(d, site, "viewer")
    d.get(f"http://127.0.0.1:{site.web_port}/")  # type: ignore[attr-defined]
    with connect_index(site.root / "data" / "index.sqlite") as db:
        received = [r[0] for r in db.execute("SELECT received_at FROM instances")]
    hour = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(received[-1]))
    in_hour = sum(time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(t)) == hour for t in received)
    rows = d.find_elements(By.CSS_SELECTOR, "#last-day-table tr")  # type: ignore[attr-defined]
    cells = {r.find_element(By.TAG_NAME, "th").text: r.text.split()[1:] for r in rows[1:]}
    assert len(cells) == 24 and cells[hour][0] == str(in_hour)
    bars = d.find_elements(By.CSS_SELECTOR, "#last-day svg rect.bar-received")  # type: ignore[attr-defined]
    assert len(bars) == 24
    tallest = max(bars, key=lambda b: float(b.get_attribute("height")))
    assert tallest.rect["height"] > 50  # drawn, not blocked by the CSP
    assert tallest.value_of_css_property("fill") == "rgb(51, 102, 204)"  # the stylesheet's
    disk = d.find_element(By.ID, "disk").text  # type: ignore[attr-defined]
    assert "GiB free of" in disk
    jobs = d.find_elements(By.CSS_SELECTOR, "#jobs tr")  # type: ignore[attr-defined]
    names = " ".join(j.text for j in jobs[1:])
    assert "heartbeat" in names and "workflow" in names, names


def test_a_held_study_released_in_the_browser_is_delivered(site: Site, chrome: object) -> None:
    from selenium.webdriver.common.by import By

    d: object = chrome
    qid = _alpha_qid(site)
    _login(d, site, "coord_a")
    d.get(f"http://127.0.0.1:{site.web_port}/quarantine")  # type: ignore[attr-defined]
    row = d.find_element(By.ID, f"q-{qid}")  # type: ignore[attr-defined]
    assert "transfer_failed" in row.text and "MR" in row.text and "MR1" in row.text
    row.find_element(By.NAME, "qid").click()
    site.share.mkdir()  # the share is back
    d.find_element(By.ID, "release").click()  # type: ignore[attr-defined]
    chosen = d.find_elements(By.ID, "chosen")  # type: ignore[attr-defined]
    assert chosen and qid in chosen[0].text, d.page_source  # type: ignore[attr-defined]
    assert _alpha_qid(site) == qid  # only asked, not yet released
    d.find_element(By.ID, "yes").click()  # type: ignore[attr-defined]
    outcome = d.find_element(By.ID, "outcomes").text  # type: ignore[attr-defined]
    assert f"{qid}: released" in outcome, outcome
    _wait("delivered files", lambda: list(site.share.rglob("*.dcm")))
    assert _held(site.root / "data") == []
    released = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "released"]
    assert released[-1]["operator"] == "web:coord_a"


def test_an_unrouted_study_assigned_in_the_browser_is_routed_and_run(
    site: Site, chrome: object
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    storescu = need_peer("storescu")
    spec = synth.make_study_spec(53)
    sent = synth.make_study(spec, [synth.MR_SERIES["t1_mprage"]], size=8)
    files = synth.write_study(sent, site.root / "send-53")
    result = subprocess.run(
        [storescu, "-aet", "MR9", "-aec", "FIONA", "127.0.0.1", str(site.server.port),
         *map(str, files)],
        capture_output=True, text=True, timeout=300, env=nodelay_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    uid = str(sent[0].StudyInstanceUID)
    _wait("an unrouted hold", lambda: [h for h in _held(site.root / "data") if h[1] == "unrouted"])
    d: object = chrome
    _login(d, site, "admin")
    d.get(f"http://127.0.0.1:{site.web_port}/studies/{uid}")  # type: ignore[attr-defined]
    d.find_element(By.ID, "assign-link").click()  # type: ignore[attr-defined]
    Select(d.find_element(By.ID, "project")).select_by_visible_text("beta")  # type: ignore[attr-defined]
    d.find_element(By.ID, "subject").send_keys("S001")  # type: ignore[attr-defined]
    d.find_element(By.ID, "event").send_keys("baseline")  # type: ignore[attr-defined]
    d.find_element(By.ID, "do-assign").click()  # type: ignore[attr-defined]
    outcome = d.find_element(By.ID, "outcomes").text  # type: ignore[attr-defined]
    assert "assigned to beta" in outcome, outcome

    def run_done() -> bool:
        detail = site.json("GET", f"/api/v1/studies/{uid}", "admin")
        return any(r["project"] == "beta" and r["state"] == "done" for r in detail["runs"])

    _wait("beta's run of the assigned study", run_done)
    assert not [h for h in _held(site.root / "data") if h[1] == "unrouted"]
    with connect_index(site.root / "data" / "index.sqlite") as db:
        route = db.execute(
            "SELECT subject, event, assigned FROM study_routes WHERE study_uid=? AND project=?",
            (uid, "beta"),
        ).fetchone()
    assert route == ("S001", "baseline", 1)
    assigned = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "assigned"]
    assert assigned[-1]["operator"] == "web:admin" and assigned[-1]["project"] == "beta"
    assert "S001" not in str(assigned)
    # A coordinator may not assign (it would reach studies of no granted project).
    body = site.json("POST", f"/api/v1/studies/{uid}/assign", "coord_b", code=403)
    assert body["error"] == "only an admin may do this"


def test_transfers_are_retried_from_their_page_and_the_answer_says_why_not(site: Site) -> None:
    b = Browser(site)
    b.login("coord_a")
    status, html = b.go("/transfers")
    assert status == 200 and "<td>alpha</td>" in html and "<td>done</td>" in html
    [transfer_id] = re.findall(r'action="/transfers/(\d+)/retry"', html)
    status, html = b.go(f"/transfers/{transfer_id}/retry", {"csrf": _csrf(html)})
    assert status == 409 and "Not done" in html, html  # a done transfer is not sent again
    v = Browser(site)
    v.login("viewer")
    status, html = v.go("/transfers")
    assert 'action="/transfers/' not in html  # a viewer gets no buttons
    status, _ = v.go(f"/transfers/{transfer_id}/cancel", {"csrf": _csrf(v.go("/")[1])})
    assert status == 403


# -- users and test-a-file pages ----------------------------------------------------------------


def test_the_users_page_is_for_admins_and_its_forms_need_the_csrf_token(site: Site) -> None:
    c = Browser(site)
    c.login("coord_a")
    status, html = c.go("/")
    assert status == 200 and 'id="nav-users"' not in html and 'id="nav-explain"' in html
    assert c.go("/users")[0] == 403
    new = {"name": "mallory", "role": "admin", "password": PASSWORD, "password2": PASSWORD}
    assert c.go("/users", new | {"csrf": _csrf(html)})[0] == 403
    a = Browser(site)
    a.login("admin")
    status, html = a.go("/users")
    assert status == 200 and 'id="nav-users"' in html and 'id="u-coord_a"' in html
    token = _csrf(html)
    assert a.go("/users", new)[0] == 403  # no token
    assert a.go("/users", new | {"csrf": "x" * 43})[0] == 403
    a.origin = "http://evil.example"
    assert a.go("/users", new | {"csrf": token})[0] == 403
    assert a.go("/users/viewer/remove", {"csrf": token, "confirm": "yes"})[0] == 403
    a.origin = a.base
    site.json("GET", "/api/v1/users/mallory", "admin", code=404)  # none of these made her
    site.json("GET", "/api/v1/users/viewer", "admin")
    status, html = a.go("/users", new | {"csrf": token, "password2": PASSWORD + "!"})
    assert status == 400 and "the two passwords differ" in html
    status, html = a.go("/users/admin/remove", {"csrf": token, "confirm": "yes"})
    assert status == 409 and "is the last admin" in html
    status, html = a.go("/users/viewer/remove", {"csrf": token})  # not confirmed
    assert status == 400 and "not confirmed" in html
    body = multipart({}, explain_file(site).read_bytes())
    assert a.go("/explain", body=body)[0] == 403  # an upload needs the token too


def test_an_admin_changes_a_users_grants_password_and_removes_them_on_the_page(
    site: Site,
) -> None:
    a = Browser(site)
    a.login("admin")
    token = _csrf(a.go("/users")[1])
    new = {"name": "hugo", "role": "viewer", "password": PASSWORD, "password2": PASSWORD}
    status, html = a.go("/users", new | {"csrf": token})
    assert status == 200 and "user hugo added (viewer)" in html
    status, html = a.go("/users/hugo")
    assert status == 200 and 'id="change-user"' in html
    change = {"csrf": token, "role": "coordinator", "project": ["alpha"], "phi_grant": "true"}
    status, html = a.go("/users/hugo", change)
    assert status == 200 and "user hugo: coordinator, alpha, PHI grant" in html, html
    shown = site.json("GET", "/api/v1/users/hugo", "admin")
    assert (shown["role"], shown["projects"], shown["phi_grant"]) == (
        "coordinator", ["alpha"], True)  # fmt: skip
    status, html = a.go("/users/hugo", {"csrf": token, "role": "coordinator"})  # boxes unticked
    assert status == 200 and "user hugo: coordinator, no project, no PHI grant" in html
    other = "a different passphrase"
    status, _ = a.go("/users/hugo/password", {"csrf": token, "password": other,
                                               "password2": other + "?"})  # fmt: skip
    assert status == 400
    status, html = a.go("/users/hugo/password", {"csrf": token, "password": other,
                                                  "password2": other})  # fmt: skip
    assert status == 200 and "new password set" in html
    assert Browser(site).login("hugo", other)[0] == 200
    status, html = a.go("/users/hugo/remove", {"csrf": token, "confirm": "yes"})
    assert status == 200 and "user hugo: removed" in html
    site.json("GET", "/api/v1/users/hugo", "admin", code=404)
    events = [e["event"] for e in AuditLog(site.root / "data").entries() if e.get("user") == "hugo"]
    assert events == ["user_add", "user_change", "user_change", "user_password", "login",
                      "user_remove"]  # fmt: skip
    assert other not in str(AuditLog(site.root / "data").entries())


def _login_from(source: str, site: Site, name: str) -> tuple[int, str]:
    """A login with the right password from loopback address ``source``."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", site.web_port, timeout=60, source_address=(source, 0)
    )
    form = urllib.parse.urlencode({"name": name, "password": PASSWORD, "next": "/"})
    headers = {"Origin": f"http://127.0.0.1:{site.web_port}",
               "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
    try:
        conn.request("POST", "/login", form, headers)
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def test_a_user_disabled_on_the_page_is_logged_out_and_refused_until_enabled(
    site: Site,
) -> None:
    assert site.fiona("user", "add", "lena", "--role", "viewer", "--password-file",
                      str(site.root / "pw.txt")).returncode == 0  # fmt: skip
    lena = Browser(site)
    lena.login("lena")
    assert 'id="logout"' in lena.go("/")[1]
    a = Browser(site)
    a.login("admin")
    status, html = a.go("/users/lena")
    assert status == 200 and 'id="disable-user"' in html
    status, html = a.go("/users/lena/disable", {"csrf": _csrf(html)})
    assert status == 200 and "user lena: disabled" in html, html
    status, html = lena.go("/")  # the session she had has ended
    assert 'id="login"' in html and 'id="logout"' not in html
    # From an address of its own: the failure must not count against the other tests' logins.
    status, html = _login_from("127.0.0.9", site, "lena")
    assert status == 401 and "wrong user name or password" in html
    status, html = a.go("/users")
    assert re.search(r'id="u-lena">.*?disabled \S', html, re.S), html
    status, html = a.go("/users/lena")
    assert 'id="disabled"' in html and 'id="enable-user"' in html
    status, html = a.go("/users/lena/enable", {"csrf": _csrf(html)})
    assert status == 200 and "user lena: enabled again" in html
    assert Browser(site).login("lena")[0] == 200
    entries = [e for e in AuditLog(site.root / "data").entries() if e.get("user") == "lena"]
    assert [e["event"] for e in entries] == ["user_add", "login", "user_disable",
                                             "login_refused", "user_enable", "login"]  # fmt: skip
    assert entries[3]["why"] == "disabled"
    assert site.fiona("user", "remove", "lena").returncode == 0


def test_a_token_made_on_the_users_page_works_and_is_not_shown_again(site: Site) -> None:
    a = Browser(site)
    a.login("admin")
    status, html = a.go("/users/viewer")
    assert status == 200 and 'id="make-token"' in html
    status, html = a.go("/users/viewer/tokens", {"csrf": _csrf(html), "label": "from the page"})
    assert status == 200 and "shown only this once" in html
    found = re.search(r'<code id="token">([^<]+)</code>', html)
    assert found
    token = found.group(1)
    assert site.call("GET", "/api/v1/status", token=token)[0] == 200
    status, html = a.go("/users/viewer")
    token_id, secret = token.split(".")
    assert token_id in html and secret not in html
    assert secret not in site.call("GET", "/api/v1/users", "admin")[1]
    status, html = a.go(f"/users/viewer/tokens/{token_id}/revoke", {"csrf": _csrf(html)})
    assert status == 200 and "revoked" in html
    assert site.call("GET", "/api/v1/status", token=token)[0] == 401
    made = [e for e in AuditLog(site.root / "data").entries() if e.get("token_id") == token_id]
    assert [(e["event"], e["operator"], e["user"]) for e in made] == [
        ("user_token", "web:admin", "viewer"), ("user_token_revoked", "web:admin", "viewer")]
    assert secret not in str(made)


def test_a_file_too_large_or_not_dicom_gets_one_clear_message(site: Site) -> None:
    v = Browser(site)
    v.login("viewer")
    token = _csrf(v.go("/explain")[1])
    status, html = v.go("/explain", body=multipart({"csrf": token}, b"%PDF-1.4 not DICOM"))
    assert status == 422 and "not a DICOM file fiona can read" in html
    status, html = v.go("/explain", body=multipart({"csrf": token}, os.urandom(2**20 + 10)))
    assert status == 413 and "larger than 1 MiB" in html


def test_forwarded_headers_are_believed_only_from_a_trusted_proxy(
    site: Site,
    tmp_path: Path,
    empty_projects: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    b = Browser(site, follow=False)
    assert b.login("viewer", headers=forwarded)[0] == 303  # the site trusts no proxy
    cookie = next(v for k, v in b.last_headers if k.lower() == "set-cookie")
    assert cookie.startswith("fiona_session=") and "Secure" not in cookie
    logins = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "login"]
    assert logins[-1]["address"] == "127.0.0.1"
    separate_index(request, monkeypatch)  # the second fiona below has its own index
    port = free_port()
    config = tmp_path / "site.yaml"
    web = {"enabled": True, "port": port, "trusted_proxies": ["127.0.0.1"]}
    config.write_text(yaml.safe_dump({"web": web}))
    server = FionaServer(tmp_path / "data", empty_projects, config=config, web_port=None).start()
    try:
        wait_for_port(port, 30, server.proc)
        pw = tmp_path / "pw.txt"
        pw.write_text(PASSWORD + "\n")
        made = subprocess.run(
            [sys.executable, "-m", "engine.cli", "user", "add", "ann", "--role", "viewer",
             "--password-file", str(pw), "--config", str(config), "--data",
             str(tmp_path / "data"), "--projects", str(empty_projects)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        behind = Browser(site, follow=False)
        behind.base = behind.origin = f"http://127.0.0.1:{port}"
        assert behind.login("ann", headers=forwarded)[0] == 303
        cookie = next(v for k, v in behind.last_headers if k.lower() == "set-cookie")
        assert cookie.startswith("__Host-fiona_session=") and "Secure" in cookie
        logins = [e for e in AuditLog(tmp_path / "data").entries() if e["event"] == "login"]
        assert logins[-1]["address"] == "203.0.113.7"
    finally:
        server.stop()
    config.write_text(yaml.safe_dump({"web": {"trusted_proxies": ["10.0.0.0/8", "proxy.lan"]}}))
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "validate", "--config", str(config),
         "--projects", str(empty_projects)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "web.trusted_proxies[1]: expected an IP address or network" in result.stdout


def test_a_file_tested_in_the_browser_shows_header_values_only_with_the_phi_grant(
    site: Site, chrome: object
) -> None:
    from selenium.webdriver.common.by import By

    d: object = chrome
    path = explain_file(site, 54)
    patient = synth.make_study_spec(54).patient_name
    for user in ("coord_b", "admin"):
        _login(d, site, user)
        d.find_element(By.ID, "nav-explain").click()  # type: ignore[attr-defined]
        d.find_element(By.ID, "file").send_keys(str(path))  # type: ignore[attr-defined]
        d.find_element(By.ID, "calling_ae").send_keys("MR2")  # type: ignore[attr-defined]
        d.find_element(By.ID, "do-explain").click()  # type: ignore[attr-defined]
        shown = d.find_element(By.ID, "explanation").text  # type: ignore[attr-defined]
        assert "claimed by beta" in shown and "steps: classify" in shown, shown
        assert "labels:" in shown
        html = d.page_source  # type: ignore[attr-defined]
        assert (patient in html) is (user == "admin"), user
    tested = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "file_explained"]
    assert [e["user"] for e in tested[-2:]] == ["coord_b", "admin"]


def test_an_admin_makes_a_coordinator_who_then_logs_in(site: Site, chrome: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d: object = chrome
    _login(d, site, "admin")
    d.find_element(By.ID, "nav-users").click()  # type: ignore[attr-defined]
    d.find_element(By.ID, "new-name").send_keys("carla")  # type: ignore[attr-defined]
    Select(d.find_element(By.ID, "new-role")).select_by_visible_text("coordinator")  # type: ignore[attr-defined]
    d.find_element(By.ID, "new-projects").send_keys("beta")  # type: ignore[attr-defined]
    d.find_element(By.ID, "new-password").send_keys(PASSWORD)  # type: ignore[attr-defined]
    d.find_element(By.ID, "new-password2").send_keys(PASSWORD)  # type: ignore[attr-defined]
    d.find_element(By.ID, "do-add").click()  # type: ignore[attr-defined]
    outcome = d.find_element(By.ID, "outcomes").text  # type: ignore[attr-defined]
    assert "user carla added (coordinator)" in outcome, outcome
    d.get(f"http://127.0.0.1:{site.web_port}/users")  # type: ignore[attr-defined]
    row = d.find_element(By.ID, "u-carla").text  # type: ignore[attr-defined]
    assert "coordinator" in row and "beta" in row
    _login(d, site, "carla")
    assert not d.find_elements(By.ID, "nav-users")  # type: ignore[attr-defined]
    d.get(f"http://127.0.0.1:{site.web_port}/projects")  # type: ignore[attr-defined]
    rows = d.find_elements(By.CSS_SELECTOR, "tr.project")  # type: ignore[attr-defined]
    assert [r.get_attribute("id") for r in rows] == ["p-beta"]
    added = [e for e in AuditLog(site.root / "data").entries() if e.get("user") == "carla"]
    assert added[0]["event"] == "user_add" and added[0]["operator"] == "web:admin"
    assert PASSWORD not in str(added)


# -- last: throttling locks the client address -------------------------------------------------


def test_failed_logins_are_throttled_and_audited_without_the_password(site: Site) -> None:
    b = Browser(site)
    wrong = "not the password at all"
    for _ in range(5):
        status, html = b.login("coord_b", wrong)
        assert status == 401 and "wrong user name or password" in html
    status, html = b.login("coord_b")  # the right password, but locked now
    assert status == 429 and "too many failed logins" in html
    status, html = Browser(site).login("viewer")  # the same address: locked too
    assert status == 429
    typo = "correct horse battery staple!"  # a password typed into the name field
    assert Browser(site).login(typo, "x")[0] == 429
    entries = AuditLog(site.root / "data").entries()
    failed = [e for e in entries if e["event"] == "login_failed"]
    assert len(failed) >= 5 and failed[-1]["failures"] >= 5 and failed[-1]["user"] == "coord_b"
    assert any(e["event"] == "login_refused" for e in entries)
    text = str(entries)
    assert wrong not in text and PASSWORD not in text and typo not in text
