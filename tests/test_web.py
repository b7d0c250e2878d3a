"""The web API (``/api/v1``) over real HTTP against a running ``fiona serve``.

One site for the module: project ``alpha`` (studies from MR1, delivered to a folder that is
missing at first, so its study is held as ``transfer_failed``) and project ``beta`` (studies
from MR2, classified only). Users are made with ``fiona user add`` while the service runs, as
an admin would; tokens with ``fiona user token``. A late test releases alpha's held study
through the API and sees it delivered; the tests after it need no held item.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.store.audit import AuditLog
from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import REPO, FionaServer, free_port, nodelay_env, wait_for_port
from tests.test_tls import tls_files  # noqa: F401  (the fixture)

MR = synth.MR_SERIES
PASSWORD = "correct horse battery staple"


@dataclass
class Site:
    """The running service, its folders and the users' tokens (by user name)."""

    server: FionaServer
    root: Path
    web_port: int
    share: Path
    tokens: dict[str, str] = field(default_factory=dict)
    alpha_uid: str = ""
    beta_uid: str = ""
    patients: tuple[str, ...] = ()

    def fiona(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        where = ["--config", str(self.root / "site.yaml"), "--data", str(self.root / "data"),
                 "--projects", str(self.root / "projects")]  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", *argv, *where],
            cwd=REPO, capture_output=True, text=True, timeout=60, input=stdin,
        )  # fmt: skip

    def call(
        self, method: str, path: str, user: str | None = None, *, token: str | None = None,
        body: bytes | None = None, content_type: str | None = None,
    ) -> tuple[int, str]:  # fmt: skip
        """(status, body text) of one request; ``user`` sends that user's token."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}", method=method, data=body
        )
        token = token or (self.tokens[user] if user else None)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def json(
        self, method: str, path: str, user: str, code: int = 200, body: Any = None
    ) -> Any:
        """The JSON answer of one request (``body``: sent as JSON), asserting its status."""
        data = None if body is None else json.dumps(body).encode()
        kind = None if body is None else "application/json"
        status, text = self.call(method, path, user, body=data, content_type=kind)
        assert status == code, (status, text)
        return json.loads(text)


def _project(name: str, aet: str, pipeline: list[Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "routing": {"calling_ae": [aet]},
            "completeness": {"study_quiet_seconds": 1}, "pipeline": pipeline, **more}  # fmt: skip


def _wait(what: str, check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout} s")


def _held(data: Path) -> list[tuple[Any, ...]]:
    with connect_index(data / "index.sqlite") as db:
        return db.execute(
            "SELECT qid, reason, project FROM quarantine WHERE state='held'"
        ).fetchall()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    storescu = need_peer("storescu")
    root = tmp_path_factory.mktemp("web")
    projects = root / "projects"
    projects.mkdir()
    key = projects / "p.key"
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    share = root / "share"  # missing: alpha's delivery fails and its study is held
    alpha = _project(
        "alpha", "MR1",
        [{"step": "anonymize", "secret_file": "p.key"}, {"step": "send", "to": "share"}],
        destinations={"share": {"type": "folder", "path": str(share),
                                "retry": {"max_attempts": 1}}},
    )  # fmt: skip
    beta = _project("beta", "MR2", [{"step": "classify"}])
    for doc in (alpha, beta):
        (projects / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
    web_port = free_port()
    (root / "site.yaml").write_text(yaml.safe_dump(
        {"scan_interval_seconds": 0.5,
         "web": {"enabled": True, "port": web_port, "upload_max_mb": 1},
         "routing": {"unrouted_after_seconds": 1}}
    ))  # fmt: skip
    server = FionaServer(root / "data", projects, config=root / "site.yaml", web_port=None).start()
    try:
        wait_for_port(web_port, 30, server.proc)
        s = Site(server, root, web_port, share)
        pw = root / "pw.txt"
        pw.write_text(PASSWORD + "\n")
        for argv in (
            ("admin", "--role", "admin", "--phi"),
            ("coord_a", "--role", "coordinator", "--project", "alpha"),
            ("coord_b", "--role", "coordinator", "--project", "beta"),
            ("viewer", "--role", "viewer"),
        ):
            made = s.fiona("user", "add", *argv, "--password-file", str(pw))
            assert made.returncode == 0, made.stderr
            token = s.fiona("user", "token", argv[0], "--label", "tests")
            assert token.returncode == 0, token.stderr
            s.tokens[argv[0]] = token.stdout.strip()
        studies = []
        for seed, aet in ((51, "MR1"), (52, "MR2")):
            spec = synth.make_study_spec(seed)
            sent = synth.make_study(spec, [MR["t1_mprage"]], size=8)
            files = synth.write_study(sent, root / f"send-{seed}")
            result = subprocess.run(
                [storescu, "-aet", aet, "-aec", "FIONA", "127.0.0.1", str(server.port),
                 *map(str, files)],
                capture_output=True, text=True, timeout=300, env=nodelay_env(),
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            studies.append((str(sent[0].StudyInstanceUID), spec))
        s.alpha_uid, s.beta_uid = studies[0][0], studies[1][0]
        s.patients = tuple(
            v for _, spec in studies for v in (spec.patient_name, spec.patient_id)
        )
        _wait("held alpha study", lambda: _held(root / "data"))
        yield s
    finally:
        server.stop()


def _alpha_qid(site: Site) -> str:
    [(qid, reason, project)] = _held(site.root / "data")
    assert (reason, project) == ("transfer_failed", "alpha")
    return str(qid)


# -- authentication and errors -------------------------------------------------------------------


def test_no_token_or_a_wrong_one_is_401_saying_how_to_get_one(site: Site) -> None:
    for token in (None, "0123456789ab." + "x" * 43, "nonsense"):
        status, text = site.call("GET", "/api/v1/status", token=token)
        assert status == 401, text
        body = json.loads(text)
        assert body["error"] == "no valid API token"
        assert "fiona user token" in body["fix"]
    assert site.json("GET", "/api/v1/status", "admin")["ae_title"] == "FIONA"


def test_unknown_ids_are_404_with_what_to_do(site: Site) -> None:
    for method, path in (
        ("GET", "/api/v1/quarantine/abcdef123456"),
        ("POST", "/api/v1/quarantine/abcdef123456/release"),
        ("POST", "/api/v1/transfers/99999/retry"),
        ("GET", "/api/v1/studies/1.2.3.4"),
        ("GET", "/api/v1/nothing-here"),
    ):
        body = site.json(method, path, "admin", code=404)
        assert set(body) == {"error", "fix"} and body["fix"], (path, body)


def test_a_viewer_may_read_but_not_act(site: Site) -> None:
    qid = _alpha_qid(site)
    assert [i["qid"] for i in site.json("GET", "/api/v1/quarantine", "viewer")] == [qid]
    for path in (f"/api/v1/quarantine/{qid}/release", f"/api/v1/quarantine/{qid}/discard",
                 "/api/v1/transfers/1/retry"):  # fmt: skip
        body = site.json("POST", path, "viewer", code=403)
        assert body["error"] == "a viewer may only read" and "coordinator" in body["fix"]
    assert _alpha_qid(site) == qid  # still held


def test_a_coordinator_sees_only_its_projects(site: Site) -> None:
    qid = _alpha_qid(site)
    assert site.json("GET", "/api/v1/quarantine", "coord_b") == []
    assert [i["qid"] for i in site.json("GET", "/api/v1/quarantine", "coord_a")] == [qid]
    body = site.json("GET", f"/api/v1/quarantine/{qid}", "coord_b", code=403)
    assert "'alpha' is not granted" in body["error"] and "grant" in body["fix"]
    site.json("POST", f"/api/v1/quarantine/{qid}/release", "coord_b", code=403)
    listed = site.json("GET", "/api/v1/studies", "coord_b")
    assert [s["study_uid"] for s in listed["studies"]] == [site.beta_uid]
    site.json("GET", f"/api/v1/studies/{site.alpha_uid}", "coord_b", code=403)
    assert [p["name"] for p in site.json("GET", "/api/v1/projects", "coord_b")] == ["beta"]
    assert {t["project"] for t in site.json("GET", "/api/v1/transfers", "coord_b")} <= {"beta"}
    assert set(site.json("GET", "/api/v1/status", "coord_b")["projects"]) <= {"beta"}
    admin = site.json("GET", "/api/v1/studies", "admin")
    assert {s["study_uid"] for s in admin["studies"]} == {site.alpha_uid, site.beta_uid}


def test_without_the_phi_grant_no_response_names_the_patient(site: Site) -> None:
    qid = _alpha_qid(site)
    paths = ["/api/v1/status", "/api/v1/projects", "/api/v1/quarantine",
             f"/api/v1/quarantine/{qid}", "/api/v1/transfers", "/api/v1/audit",
             "/api/v1/studies", f"/api/v1/studies/{site.alpha_uid}",
             f"/api/v1/studies?text={site.alpha_uid[-6:]}"]  # fmt: skip
    for user in ("coord_a", "viewer"):
        for path in paths:
            status, text = site.call("GET", path, user)
            assert status == 200, (user, path, text)
            for value in site.patients:
                assert value not in text, (user, path)
    # The admin has the grant: the same study shows the patient, and the view is audited.
    detail = site.json("GET", f"/api/v1/studies/{site.alpha_uid}", "admin")
    assert detail["phi"]["patient_name"] in site.patients
    assert detail["series_list"] and detail["runs"][0]["steps"]
    assert any("claimed by alpha" in line for line in detail["phi"]["explanation"])
    seen = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "phi_viewed"]
    assert seen and seen[-1]["user"] == "admin"
    assert seen[-1]["route"] == "GET /api/v1/studies/{study_uid}"
    n_seen = len(seen)
    site.json("GET", "/api/v1/audit", "admin")  # user_add entries of a PHI grant are no PHI
    after = [e for e in AuditLog(site.root / "data").entries() if e["event"] == "phi_viewed"]
    assert len(after) == n_seen
    assert not any(v in json.dumps(seen) for v in site.patients)


def test_studies_are_filtered_and_paginated(site: Site) -> None:
    page = site.json("GET", "/api/v1/studies?limit=1", "admin")
    assert page["total"] == 2 and len(page["studies"]) == 1
    rest = site.json("GET", "/api/v1/studies?limit=1&offset=1", "admin")
    assert {page["studies"][0]["study_uid"], rest["studies"][0]["study_uid"]} == {
        site.alpha_uid, site.beta_uid}  # fmt: skip
    only = site.json("GET", "/api/v1/studies?project=beta&modality=MR", "admin")
    assert [s["study_uid"] for s in only["studies"]] == [site.beta_uid]
    assert site.json("GET", "/api/v1/studies?modality=CT", "admin")["total"] == 0
    assert site.json("GET", "/api/v1/studies?date_from=2999-01-01", "admin")["total"] == 0
    site.json("GET", "/api/v1/studies?limit=ten", "admin", code=400)
    # A study's state comes from its routes, and the filter agrees with the list.
    states = {}
    for row in site.json("GET", "/api/v1/studies", "admin")["studies"]:
        routes = site.json("GET", f"/api/v1/studies/{row['study_uid']}", "admin")["routes"]
        complete = any(r["state"] == "complete" for r in routes)
        assert row["state"] == ("complete" if complete else "receiving" if routes else "unrouted")
        states[row["study_uid"]] = row["state"]
    assert "complete" in states.values()
    for state in ("receiving", "complete", "unrouted", "deleted"):
        found = site.json("GET", f"/api/v1/studies?state={state}", "admin")["studies"]
        assert {s["study_uid"] for s in found} == {u for u, s in states.items() if s == state}
    site.json("GET", "/api/v1/studies?state=done", "admin", code=400)
    body = site.json("GET", "/api/v1/audit?since=yesterday", "admin", code=400)
    assert "YYYY-MM-DD" in body["error"]


def multipart(fields: dict[str, str], data: bytes, filename: str = "a.dcm") -> tuple[bytes, str]:
    """A multipart form of ``fields`` and a file ``data``: (body, its Content-Type)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    body = b"".join(parts) + head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def explain_file(site: Site, seed: int = 53) -> Path:
    """A synthetic MR file of its own study (patient ``make_study_spec(seed)``)."""
    ds = synth.make_study(synth.make_study_spec(seed), [MR["t1_mprage"]], size=8)
    [path, *_] = synth.write_study(ds, site.root / f"explain-{seed}")
    return path


def test_explain_an_uploaded_file(site: Site) -> None:
    path = explain_file(site)
    body, kind = multipart({}, path.read_bytes())
    spec = synth.make_study_spec(53)
    for user in ("coord_b", "admin"):
        status, text = site.call(
            "POST", "/api/v1/explain?calling_ae=MR2", user, body=body, content_type=kind
        )
        assert status == 200, text
        found = json.loads(text)
        assert any("claimed by beta" in line for line in found["lines"])
        assert any("steps: classify" in line for line in found["lines"])
        assert any("calling AE title: yes" in line for line in found["lines"])
    # A coordinator's test weighs only its projects: alpha (from MR1) is not named to coord_b.
    status, text = site.call(
        "POST", "/api/v1/explain?calling_ae=MR1", "coord_b", body=body, content_type=kind
    )
    assert status == 200 and "alpha" not in text and "no project claims" in text, text
    # Header values only for the user with the PHI grant (admin); the view is audited.
    assert spec.patient_name not in site.call(
        "POST", "/api/v1/explain?calling_ae=MR2", "coord_b", body=body, content_type=kind
    )[1]
    assert found["phi"]["patient"]["patient_name"] == spec.patient_name
    assert any("MR2" in line for line in found["phi"]["lines"])  # the value the criterion saw
    entries = AuditLog(site.root / "data").entries()
    tested = [e for e in entries if e["event"] == "file_explained"]
    assert {e["user"] for e in tested} == {"coord_b", "admin"}
    seen = [e for e in entries if e["event"] == "phi_viewed" and "explain" in e["route"]]
    assert [e["user"] for e in seen] == ["admin"]
    assert spec.patient_name not in json.dumps(entries)


def test_explain_refuses_a_non_dicom_file_and_a_too_large_one(site: Site) -> None:
    body, kind = multipart({}, b"just some text, not DICOM\n" * 10, "notes.txt")
    status, text = site.call("POST", "/api/v1/explain", "viewer", body=body, content_type=kind)
    assert status == 422 and json.loads(text)["error"] == "not a DICOM file fiona can read"
    body, kind = multipart({}, os.urandom(2**20 + 10))  # the site allows 1 MiB
    status, text = site.call("POST", "/api/v1/explain", "viewer", body=body, content_type=kind)
    assert status == 413, text
    assert "larger than 1 MiB" in json.loads(text)["error"]


def test_the_openapi_document_is_valid_and_lists_every_route(site: Site) -> None:
    from openapi_spec_validator import validate

    from engine.web.api import ROUTES

    status, text = site.call("GET", "/api/v1/openapi.json")
    assert status == 200
    doc = json.loads(text)
    validate(doc)
    for route in ROUTES:
        assert route.method.lower() in doc["paths"]["/api/v1" + route.path]


def test_the_status_page_and_metrics_are_served_too(site: Site) -> None:
    status, text = site.call("GET", "/status.json")
    assert status == 200 and "alpha" in json.loads(text)["projects"]
    status, text = site.call("GET", "/metrics")
    assert status == 200 and "fiona_" in text
    status, text = site.call("GET", "/")  # the status page is now the portal's dashboard
    assert status == 200 and 'id="login"' in text  # behind the login
    request = urllib.request.Request(f"http://127.0.0.1:{site.web_port}/api/v1/status")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    headers = refused.value.headers
    assert headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


# -- users and tokens ----------------------------------------------------------------------------


def test_a_revoked_token_is_refused(site: Site) -> None:
    made = site.fiona("user", "token", "viewer")
    token = made.stdout.strip()
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 200
    token_id = token.split(".")[0]
    listing = site.fiona("user", "list")
    assert token_id in listing.stdout and token not in listing.stdout
    revoked = site.fiona("user", "revoke-token", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 401
    assert site.call("GET", "/api/v1/projects", "viewer")[0] == 200  # its other token works
    entries = AuditLog(site.root / "data").entries()
    assert {"user_add", "user_token", "user_token_revoked"} <= {e["event"] for e in entries}
    text = json.dumps(entries)
    assert token.split(".")[1] not in text and PASSWORD not in text


def test_user_add_needs_a_password_and_refuses_a_weak_one(site: Site) -> None:
    no_tty = site.fiona("user", "add", "eve", "--role", "viewer", stdin="")
    assert no_tty.returncode == 1 and "--password-file" in no_tty.stderr
    short = site.root / "short.txt"
    short.write_text("secret\n")
    weak = site.fiona("user", "add", "eve", "--role", "viewer", "--password-file", str(short))
    assert weak.returncode == 1 and "too short" in weak.stderr
    again = site.fiona("user", "add", "admin", "--role", "viewer",
                       "--password-file", str(site.root / "pw.txt"))  # fmt: skip
    assert again.returncode == 1 and "exists already" in again.stderr
    names = [line.split()[0] for line in site.fiona("user", "list").stdout.splitlines()]
    assert "eve" not in names and "admin" in names
    assert not [e for e in AuditLog(site.root / "data").entries() if e.get("user") == "eve"]


def test_user_set_and_password_change_grants_and_the_password_on_the_server(site: Site) -> None:
    pw = str(site.root / "pw.txt")
    made = site.fiona("user", "add", "ivy", "--role", "viewer", "--password-file", pw)
    assert made.returncode == 0, made.stderr
    changed = site.fiona("user", "set", "ivy", "--role", "coordinator", "--project", "beta",
                         "--phi")  # fmt: skip
    assert changed.returncode == 0 and "coordinator, beta, sees PHI" in changed.stdout
    assert site.fiona("user", "set", "ivy").returncode == 1  # nothing to change
    cleared = site.fiona("user", "set", "ivy", "--no-projects", "--no-phi")
    assert "coordinator, no project yet" in cleared.stdout and "PHI" not in cleared.stdout
    new = site.root / "new-pw.txt"
    new.write_text("a brand new passphrase\n")
    done = site.fiona("user", "password", "ivy", "--password-file", str(new))
    assert done.returncode == 0, done.stderr
    last = site.fiona("user", "set", "admin", "--role", "viewer")
    assert last.returncode == 1 and "last admin" in last.stderr
    from engine.store.index import open_index
    from engine.store.users import UserStore

    index = open_index("", site.root / "data" / "index.sqlite", upgrade=False, read_only=True)
    try:
        assert UserStore(index).check_password("ivy", "a brand new passphrase") is not None
        assert UserStore(index).check_password("ivy", PASSWORD) is None
    finally:
        index.close()
    events = [e["event"] for e in AuditLog(site.root / "data").entries() if e.get("user") == "ivy"]
    assert events == ["user_add", "user_change", "user_change", "user_password"]
    assert site.fiona("user", "remove", "ivy").returncode == 0


def test_a_removed_user_is_refused(site: Site) -> None:
    pw = str(site.root / "pw.txt")
    made = site.fiona("user", "add", "temp", "--role", "viewer", "--password-file", pw)
    assert made.returncode == 0, made.stderr
    token = site.fiona("user", "token", "temp").stdout.strip()
    assert site.call("GET", "/api/v1/status", token=token)[0] == 200
    assert site.fiona("user", "remove", "temp").returncode == 0
    assert site.call("GET", "/api/v1/status", token=token)[0] == 401


def test_a_disabled_user_is_refused_until_enabled_and_keeps_its_grants(site: Site) -> None:
    pw = str(site.root / "pw.txt")
    made = site.fiona("user", "add", "kim", "--role", "coordinator", "--project", "alpha",
                      "--password-file", pw)  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = site.fiona("user", "token", "kim").stdout.strip()
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 200
    off = site.fiona("user", "disable", "kim")
    assert off.returncode == 0 and "kim: disabled" in off.stdout, off.stderr
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 401
    listed = site.fiona("user", "list").stdout
    assert "DISABLED since" in listed and token.split(".")[0] in listed  # kept, for the record
    shown = site.json("GET", "/api/v1/users/kim", "admin")
    assert shown["disabled_at"] is not None and shown["projects"] == ["alpha"]
    on = site.json("POST", "/api/v1/users/kim/enable", "admin")
    assert on["disabled_at"] is None and on["projects"] == ["alpha"]
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 200  # the same token again
    site.json("POST", "/api/v1/users/kim/disable", "admin")
    assert site.call("GET", "/api/v1/projects", token=token)[0] == 401
    site.json("POST", "/api/v1/users/kim/disable", "coord_a", code=403)
    site.json("POST", "/api/v1/users/nobody/disable", "admin", code=404)
    # The last enabled admin cannot be disabled (nobody could manage the portal then).
    refused = site.json("POST", "/api/v1/users/admin/disable", "admin", code=409)
    assert "last admin" in refused["error"]
    assert site.fiona("user", "disable", "admin").returncode == 1
    entries = [e for e in AuditLog(site.root / "data").entries() if e.get("user") == "kim"]
    assert [(e["event"], e["operator"].startswith("web:")) for e in entries[-3:]] == [
        ("user_disable", False), ("user_enable", True), ("user_disable", True)
    ]  # fmt: skip
    assert site.fiona("user", "remove", "kim").returncode == 0


def test_only_admins_reach_the_users_api(site: Site) -> None:
    for user in ("coord_a", "viewer"):
        body = site.json("GET", "/api/v1/users", user, code=403)
        assert body["error"] == "only an admin may do this"
        site.json("POST", "/api/v1/users/viewer/remove", user, code=403)
        site.json("POST", "/api/v1/users/viewer/tokens", user, code=403, body={})
    listed = site.json("GET", "/api/v1/users", "admin")
    by_name = {u["name"]: u for u in listed}
    coord = by_name["coord_a"]
    assert (coord["role"], coord["projects"]) == ("coordinator", ["alpha"])
    assert by_name["admin"]["phi_grant"] is True and by_name["viewer"]["phi_grant"] is False
    assert by_name["viewer"]["source"] == "local"
    [token] = [t for t in by_name["viewer"]["tokens"] if t["label"] == "tests"]
    assert set(token) == {"id", "label", "created_at", "last_used_at", "revoked_at"}
    text = json.dumps(listed)
    assert not any(secret.split(".")[1] in text for secret in site.tokens.values())
    assert "password" not in text and "argon2" not in text


def test_an_admin_manages_a_user_over_the_api_and_each_change_is_audited(site: Site) -> None:
    new = {"name": "dora", "role": "coordinator", "projects": "alpha", "password": PASSWORD}
    made = site.json("POST", "/api/v1/users", "admin", body=new)
    assert (made["role"], made["projects"], made["phi_grant"]) == ("coordinator", ["alpha"], False)
    site.json("POST", "/api/v1/users", "admin", code=409,
              body={"name": "dora", "role": "viewer", "password": PASSWORD})  # fmt: skip
    short = site.json("POST", "/api/v1/users", "admin", code=400,
                      body={"name": "ed", "role": "viewer", "password": "short"})  # fmt: skip
    assert "too short" in short["error"]
    changed = site.json("POST", "/api/v1/users/dora", "admin",
                        body={"projects": "alpha,beta", "phi_grant": "true"})  # fmt: skip
    assert (changed["role"], changed["projects"], changed["phi_grant"]) == (
        "coordinator", ["alpha", "beta"], True)  # fmt: skip
    new_password = "another long passphrase"
    site.json("POST", "/api/v1/users/dora/password", "admin", body={"password": new_password})
    token = site.json("POST", "/api/v1/users/dora/tokens", "admin", body={"label": "ci"})
    assert token["note"].startswith("shown once")
    secret = token["token"]
    status, text = site.call("GET", "/api/v1/projects", token=secret)
    assert status == 200 and {p["name"] for p in json.loads(text)} == {"alpha", "beta"}
    shown = site.json("GET", "/api/v1/users/dora", "admin")
    assert [t["id"] for t in shown["tokens"]] == [token["id"]]
    assert secret.split(".")[1] not in json.dumps(shown)  # never again
    site.json("POST", f"/api/v1/users/viewer/tokens/{token['id']}/revoke", "admin", code=404)
    site.json("POST", f"/api/v1/users/dora/tokens/{token['id']}/revoke", "admin")
    assert site.call("GET", "/api/v1/projects", token=secret)[0] == 401
    site.json("POST", "/api/v1/users/dora/remove", "admin")
    site.json("GET", "/api/v1/users/dora", "admin", code=404)
    entries = [e for e in AuditLog(site.root / "data").entries() if e.get("user") == "dora"]
    assert [e["event"] for e in entries] == ["user_add", "user_change", "user_password",
                                             "user_token", "user_token_revoked", "user_remove"]
    assert {e["operator"] for e in entries} == {"web:admin"}
    text = json.dumps(entries)
    assert PASSWORD not in text and new_password not in text and secret.split(".")[1] not in text


def test_the_last_admin_is_neither_removed_nor_demoted(site: Site) -> None:
    for path, body in (("/api/v1/users/admin/remove", None),
                       ("/api/v1/users/admin", {"role": "viewer"})):  # fmt: skip
        refused = site.json("POST", path, "admin", code=409, body=body)
        assert "last admin" in refused["error"], refused
    cli = site.fiona("user", "remove", "admin")
    assert cli.returncode == 1 and "is the last admin" in cli.stderr
    assert site.json("GET", "/api/v1/users/admin", "admin")["role"] == "admin"
    site.json("POST", "/api/v1/users", "admin",
              body={"name": "admin2", "role": "admin", "password": PASSWORD})  # fmt: skip
    site.json("POST", "/api/v1/users/admin2", "admin", body={"role": "viewer"})  # two admins
    site.json("POST", "/api/v1/users/admin2/remove", "admin")
    changes = ("user_remove", "user_change")
    entries = AuditLog(site.root / "data").entries()
    assert not [e for e in entries if e.get("user") == "admin" and e["event"] in changes]


# -- acting: the last tests, they change the site -----------------------------------------------


def test_a_held_study_released_through_the_api_is_delivered(site: Site) -> None:
    qid = _alpha_qid(site)
    site.share.mkdir()  # the share is back
    done = site.json("POST", f"/api/v1/quarantine/{qid}/release", "coord_a")
    assert done["done"] and "queued again" in done["message"], done
    _wait("delivered files", lambda: list(site.share.rglob("*.dcm")))
    transfers = _wait(
        "a done transfer",
        lambda: [t for t in site.json("GET", "/api/v1/transfers", "coord_a")
                 if t["state"] == "done"],
    )  # fmt: skip
    assert transfers[0]["project"] == "alpha"
    assert _held(site.root / "data") == []
    body = site.json("POST", f"/api/v1/quarantine/{qid}/release", "coord_a", code=409)
    assert "released, not held" in body["error"]
    released = [e for e in AuditLog(site.root / "data").entries()
                if e["event"] == "released"]  # fmt: skip
    assert released and released[-1]["operator"] == "web:coord_a"


def _per_hour(data: Path, sql: str) -> dict[str, int]:
    """Rows of the index by their UTC hour (``2026-01-31T12:00Z``): ``sql`` selects times."""
    with connect_index(data / "index.sqlite") as db:
        times = [r[0] for r in db.execute(sql)]
    out: dict[str, int] = {}
    for at in times:
        hour = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(at))
        out[hour] = out.get(hour, 0) + 1
    return out


def test_received_and_sent_per_hour_are_counted_live(site: Site) -> None:
    data = site.root / "data"
    hours = site.json("GET", "/api/v1/status", "viewer")["last_day"]
    assert len(hours) == 24
    for key, sql in (
        ("received", "SELECT received_at FROM instances"),
        ("sent_instances", "SELECT sent_at FROM transfer_items WHERE sent_at IS NOT NULL"),
        ("sent_transfers", "SELECT finished_at FROM transfers WHERE state='done'"),
    ):
        expected = _per_hour(data, sql)
        assert expected, key  # 16 instances received, alpha's 8 delivered in one transfer
        assert {h["hour"]: h[key] for h in hours if h[key]} == expected, key


# -- serving: TLS, configuration ------------------------------------------------------------------


def test_with_a_certificate_and_key_the_api_is_served_over_https(
    tmp_path: Path,
    empty_projects: Path,
    tls_files: tuple[Path, Path],  # noqa: F811  (the fixture of tests/test_tls.py)
) -> None:
    import ssl

    key, cert = tls_files
    port = free_port()
    site = tmp_path / "site.yaml"
    web = {"enabled": True, "port": port, "cert_file": str(cert), "key_file": str(key)}
    site.write_text(yaml.safe_dump({"web": web}))
    server = FionaServer(tmp_path / "data", empty_projects, config=site, web_port=None).start()
    try:
        wait_for_port(port, 30, server.proc)
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        url = f"https://127.0.0.1:{port}/api/v1/status"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=30, context=context)
        assert refused.value.code == 401  # TLS worked; the API answered
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=30)
    finally:
        server.stop()


def test_a_certificate_without_its_key_is_a_config_error(
    tmp_path: Path, empty_projects: Path
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here\n")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"web": {"enabled": True, "cert_file": str(cert)}}))
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "validate", "--config", str(site),
         "--projects", str(empty_projects)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "site.yaml:2 web: cert_file is set but key_file is not" in result.stdout + result.stderr


def test_validate_warns_when_the_api_would_send_tokens_in_clear_on_the_network(
    tmp_path: Path, empty_projects: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"web": {"bind": "0.0.0.0", "enabled": True}}))
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "validate", "--config", str(site),
         "--projects", str(empty_projects)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert (
        f"{site}:2 web.bind: warning: the web API listens on 0.0.0.0 over plain HTTP"
    ) in result.stdout


def _on_a_terminal(argv: list[str], answers: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` with a new pseudo-terminal as its controlling terminal, typing each answer
    after each prompt ending in ':'; (exit status, everything the terminal showed). A command
    still waiting at ``timeout`` is killed and the test fails."""
    import select

    main_fd, child_fd = os.openpty()
    name = os.ttyname(child_fd)
    proc = subprocess.Popen(
        argv, cwd=REPO, stdin=child_fd, stdout=child_fd, stderr=child_fd,
        start_new_session=True,  # then opening the terminal makes it the controlling one
        preexec_fn=lambda: os.close(os.open(name, os.O_RDWR)),
    )  # fmt: skip
    os.close(child_fd)
    shown = b""
    pending = list(answers)
    mark = 0  # what the terminal showed before the last answer
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:  # the command ended: the terminal is closed
                break
            if not chunk:
                break
            shown += chunk
            if pending and shown[mark:].rstrip().endswith(b":"):
                os.write(main_fd, pending.pop(0).encode() + b"\n")
                mark = len(shown)
        else:
            proc.kill()
            raise AssertionError(f"still running after {timeout} s: {shown!r}")
        return proc.wait(timeout=30), shown.decode(errors="replace")
    finally:
        os.close(main_fd)


def test_user_add_asks_for_the_password_twice_on_a_terminal(site: Site) -> None:
    where = ["--config", str(site.root / "site.yaml"), "--data", str(site.root / "data"),
             "--projects", str(site.root / "projects")]  # fmt: skip
    argv = [sys.executable, "-m", "engine.cli", "user", "add", "carol", "--role", "viewer", *where]
    code, shown = _on_a_terminal(argv, ["first password!!", "other password!!"])
    assert code == 1 and "the two passwords differ" in shown, shown
    code, shown = _on_a_terminal(argv, [PASSWORD, PASSWORD])
    assert code == 0 and "user carol: viewer" in shown, shown
    assert PASSWORD not in shown  # not echoed
    from engine.store.index import open_index
    from engine.store.users import UserStore

    index = open_index("", site.root / "data" / "index.sqlite", upgrade=False, read_only=True)
    try:
        users = UserStore(index)
        assert users.check_password("carol", PASSWORD) is not None
        assert users.check_password("carol", "first password!!") is None
    finally:
        index.close()


def test_the_webs_projects_are_read_again_only_when_a_project_file_changed(
    tmp_path: Path,
) -> None:
    from engine.config.loader import load_site
    from engine.web.server import cached_projects

    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "a.yaml").write_text("name: a\n")
    site = load_site(None, {"data_dir": str(tmp_path / "data"), "projects_dir": str(projects)})
    calls: list[int] = []

    def load(_: Any) -> list[Any]:
        calls.append(1)
        return []

    cached = cached_projects(load)
    cached(site)
    cached(site)
    assert len(calls) == 1
    os.utime(projects / "a.yaml", ns=(0, 10**18))  # edited
    cached(site)
    (projects / "b.yaml").write_text("name: b\n")  # added
    cached(site)
    assert len(calls) == 3
