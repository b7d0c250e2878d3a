"""Retrieval jobs on the web: queued through ``POST /api/v1/retrievals`` (the same function as
``fiona retrieve``), worked by ``fiona serve`` against a real Orthanc, followed on the API and
on the portal's Retrievals pages; per-project grants and the PHI grant hold."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import FionaServer, free_port, wait_for_port
from tests.test_ldap import Client
from tests.test_pacs_move import fiona_port, n_instances, peers  # noqa: F401  (fixtures)
from tests.test_pacs_query import SPECS
from tests.test_web import Site, multipart

PASSWORD = "a long enough test password"


@pytest.fixture
def web_site(
    tmp_path: Path, fiona_port: int, peers: dict[str, tuple[str, int]]  # noqa: F811
) -> Iterator[Site]:
    root = tmp_path
    projects = root / "projects"
    projects.mkdir()
    for name in ("neuro", "cardio"):
        (projects / f"{name}.yaml").write_text(
            f"name: {name}\nrouting: {{calling_ae: [NOBODY]}}\n"
            "completeness: {study_quiet_seconds: 3600}\npipeline: []\n"
        )
    ae, port = peers["orthanc"]
    web_port = free_port()
    (root / "site.yaml").write_text(
        f"data_dir: {root / 'data'}\nprojects_dir: {projects}\nport: {fiona_port}\n"
        f"web: {{port: {web_port}}}\n"
        f"pacs:\n  - {{name: clinical, ae_title: {ae}, host: 127.0.0.1, port: {port}}}\n"
        f"  - {{name: dead, ae_title: GONE, host: 127.0.0.1, port: {free_port()}}}\n"
    )
    server = FionaServer(
        root / "data", projects, port=fiona_port, config=root / "site.yaml", web_port=None
    )
    server.start()
    wait_for_port(web_port, 30, server.proc)
    site = Site(server, root, web_port, root / "share")
    (root / "pw").write_text(PASSWORD + "\n")
    for name, *grants in (
        ("boss", "--role", "admin", "--phi"),
        ("neuro", "--role", "coordinator", "--project", "neuro"),
        ("cardio", "--role", "coordinator", "--project", "cardio"),
        ("look", "--role", "viewer", "--project", "neuro"),
    ):
        made = site.fiona("user", "add", name, *grants, "--password-file", str(root / "pw"))
        assert made.returncode == 0, made.stderr
        token = site.fiona("user", "token", name)
        assert token.returncode == 0, token.stderr
        site.tokens[name] = token.stdout.split()[-1]
    try:
        yield site
    finally:
        server.stop()


def _queue(site: Site, user: str, text: str, **query: str) -> tuple[int, Any]:
    body, kind = multipart({}, text.encode(), filename="list.csv")
    path = "/api/v1/retrievals?" + "&".join(f"{k}={v}" for k, v in query.items())
    status, answer = site.call("POST", path, user, body=body, content_type=kind)
    return status, json.loads(answer)


def _finished(site: Site, job: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = site.json("GET", f"/api/v1/retrievals/{job}", "neuro")
        if all(r["state"] in ("done", "partial", "failed") for r in found["rows_detail"]):
            return dict(found)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish: {found}")


def test_a_list_queued_on_the_web_is_retrieved_and_followed(web_site: Site) -> None:
    site = web_site
    accession = SPECS[0].accession_number
    status, queued = _queue(site, "neuro", f"accession,subject\n{accession},S001\n",
                            pacs="clinical", project="neuro")  # fmt: skip
    assert status == 200, queued
    job = queued["job"]
    done = _finished(site, job)
    [row] = done["rows_detail"]
    assert (row["line"], row["state"]) == (2, "done")
    assert row["arrived"] == row["expected"] == n_instances(1)
    # Without the PHI grant no answer names what the row asked for.
    listed = site.call("GET", "/api/v1/retrievals", "neuro")[1]
    detail = site.call("GET", f"/api/v1/retrievals/{job}", "neuro")[1]
    assert accession not in listed + detail and '"phi"' not in detail
    # With it, the row's accession number, and an audit entry naming the viewer.
    shown = site.json("GET", f"/api/v1/retrievals/{job}", "boss")
    assert shown["rows_detail"][0]["phi"] == {"accession": accession, "subject": "S001"}
    audit = (site.root / "data" / "audit").glob("*.jsonl")
    entries = [json.loads(line) for f in audit for line in f.read_text().splitlines()]
    assert any(e["event"] == "phi_viewed" and e.get("user") == "boss" for e in entries)
    assert any(e["event"] == "retrieve_queued" and e.get("by") == "web:neuro" for e in entries)
    # Another project's coordinator neither sees nor opens the job.
    assert site.json("GET", "/api/v1/retrievals", "cardio") == []
    assert site.call("GET", f"/api/v1/retrievals/{job}", "cardio")[0] == 403
    # The portal's pages show the same.
    browser = Client(site.web_port)
    assert browser.login("neuro", PASSWORD)[0] == 303
    status, page = browser.go("/retrievals")
    assert status == 200 and f'href="/retrievals/{job}"' in page and "1 done" in page
    status, page = browser.go(f"/retrievals/{job}")
    assert status == 200 and 'class="row done"' in page and accession not in page
    # Nothing partial or failed: a retry queues nothing.
    again = site.json("POST", f"/api/v1/retrievals/{job}/retry", "neuro")
    assert again == {"job": job, "queued": 0}


def _states(site: Site, job: int) -> list[str]:
    rows = site.json("GET", f"/api/v1/retrievals/{job}", "boss")["rows_detail"]
    return [r["state"] for r in rows]


def test_a_job_is_cancelled_and_queued_again(web_site: Site) -> None:
    site = web_site
    lines = "accession\n" + "".join(f"ACC{n}\n" for n in range(3))
    status, queued = _queue(site, "neuro", lines, pacs="dead", project="neuro")
    assert status == 200, queued
    job = queued["job"]
    assert site.call("POST", f"/api/v1/retrievals/{job}/cancel", "cardio")[0] == 403
    assert site.call("POST", f"/api/v1/retrievals/{job}/cancel", "look")[0] == 403
    # The portal's button, with the session's CSRF token.
    browser = Client(site.web_port)
    assert browser.login("neuro", PASSWORD)[0] == 303
    page = browser.go(f"/retrievals/{job}")[1]
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None and 'id="do-cancel"' in page
    assert browser.go(f"/retrievals/{job}/cancel", {"csrf": token.group(1)})[0] == 303
    assert _states(site, job) == ["cancelled"] * 3
    time.sleep(2)  # the worker's ticks (every 0.5 s) leave cancelled rows alone
    assert _states(site, job) == ["cancelled"] * 3
    again = site.json("POST", f"/api/v1/retrievals/{job}/retry", "neuro")
    assert again == {"job": job, "queued": 3}
    assert set(_states(site, job)) <= {"queued", "querying"}
    cancelled = site.fiona("retrieve", "cancel", str(job))  # the command line, the same
    assert cancelled.returncode == 0
    assert f"retrieval job {job}: 3 rows cancelled" in cancelled.stdout
    assert site.fiona("retrieve", "retry").returncode == 2
    assert site.fiona("retrieve", "retry", "999").stderr.strip() == "fiona: no retrieval job 999"
    audit = (site.root / "data" / "audit").glob("*.jsonl")
    events = [json.loads(line)["event"] for f in audit for line in f.read_text().splitlines()]
    assert events.count("retrieve_cancelled") == 2 and events.count("retrieve_requeued") == 1


def test_a_list_with_problems_or_from_a_viewer_is_refused(web_site: Site) -> None:
    site = web_site
    status, answer = _queue(site, "neuro", "accession,colour\nA1,red\n", pacs="clinical",
                            project="neuro", name="list.csv")  # fmt: skip
    assert status == 422 and "list.csv:1 'colour': unknown column" in answer["fix"], answer
    status, answer = _queue(site, "neuro", "accession\nA1\n", pacs="nowhere", project="neuro")
    assert status == 400 and "no PACS named 'nowhere'" in answer["error"], answer
    status, answer = _queue(site, "neuro", "accession\nA1\n", pacs="clinical", project="cardio")
    assert status == 403, answer
    status, answer = _queue(site, "look", "accession\nA1\n", pacs="clinical", project="neuro")
    assert status == 403, answer
    assert site.json("GET", "/api/v1/retrievals", "boss") == []
