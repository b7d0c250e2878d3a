"""The audit trail: an entry for every decision about a study, and none with PHI in it.

A study goes the whole way (received, routed, complete, classified, de-identified, verified,
copied) through the real archive, tracker and runner; a second is held. ``fiona audit STUDY``
then tells the first one's story, and the audit files hold no patient name, ID, accession
number or original UID of either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.manage.audit_cli import matching
from engine.store.audit import AuditLog, uid_token
from tests import synth
from tests.test_quarantine_cli import World, _key, _project, _select, _study


def _phi(datasets: list[synth.Dataset]) -> set[str]:
    """Every identifying string of a study: names, IDs, accession number, original UIDs."""
    out: set[str] = set()
    for ds in datasets:
        out |= {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)}
        out |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    return {v for v in out if len(v) >= 4}


def test_a_full_run_is_told_by_fiona_audit_without_phi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _key(tmp_path)
    pipeline = [
        {"step": "classify"},
        {"step": "anonymize", "secret_file": "p.key"},
        {"step": "copy", "to": str(tmp_path / "out")},
    ]
    world = World(
        tmp_path,
        [_project("p", pipeline), _project("q", _select("dwi", tmp_path / "q"), aet="MR2")],
        {},
    )
    done, held = _study(11), _study(12)
    world.send(done)
    world.send(held, aet="MR2")
    world.scan()
    assert world.rows("SELECT project, state FROM pipeline_runs ORDER BY project") == [
        ("p", "done"),
        ("q", "quarantined"),
    ]
    uid = str(done[0].StudyInstanceUID)
    code, text = world.cli(capsys, "audit", "--json", uid)
    assert code == 0
    story = [json.loads(line) for line in text.splitlines()]
    assert [e["event"] for e in story] == [
        "received",
        "routed",
        "completed",
        "classified",
        "anonymized",
        "verified",
    ]
    assert {e["study"] for e in story} == {uid_token(uid)}
    assert story[0]["instances"] == len(done) and story[1]["projects"] == ["p"]
    assert story[-1]["files"] == len(done) and story[-1]["series"] == 2
    code, text = world.cli(capsys, "audit", "--event", "quarantined")
    assert (
        code == 0
        and "nothing_selected" in text
        and uid_token(str(held[0].StudyInstanceUID)) in text
    )
    audit_text = "".join(p.read_text() for p in (world.data / "audit").glob("*.jsonl"))
    leaks = [v for v in _phi(done) | _phi(held) if v in audit_text]
    assert leaks == []


def test_received_is_written_once_per_study_per_day(tmp_path: Path) -> None:
    world = World(tmp_path, [_project("p", [])], {})
    datasets = _study(13)
    world.send(datasets[:3])
    world.workflow.scan()
    world.send(datasets[3:])
    world.workflow.scan()
    received = [e for e in world.audit() if e["event"] == "received"]
    assert [(e["instances"], e["first"]) for e in received] == [(3, True)]


def test_matching_filters_by_study_project_event_and_day(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.write("routed", study=uid_token("1.2.3"), projects=["p", "q"])
    log.write("quarantined", study=uid_token("1.2.4"), project="q", reason="unrouted")
    entries = log.entries()
    assert [e["event"] for e in matching(entries, study_uid="1.2.3")] == ["routed"]
    assert [e["event"] for e in matching(entries, project="q")] == ["routed", "quarantined"]
    assert [e["event"] for e in matching(entries, events=["quarantined"])] == ["quarantined"]
    assert matching(entries, since="2999-01-01") == []
    assert len(matching(entries, since="2000-01-01")) == 2


def test_a_studys_entries_are_read_without_parsing_the_others(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.write("routed", study=uid_token("1.2.3"), project="p")
    log.write("routed", study=uid_token("1.2.4"), project="p")
    log.write("sent", project="p", study=uid_token("1.2.3"), note='"study":"elsewhere"')
    files = list((tmp_path / "audit").glob("audit-*.jsonl"))
    with files[0].open("a") as f:
        f.write("not json, and not about the study\n")  # never parsed
    assert [e["event"] for e in log.entries("1.2.3")] == ["routed", "sent"]
    assert log.entries("9.9") == []


def test_an_audit_failure_does_not_stop_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, [_project("p", [{"step": "classify"}])], {})
    world.send(_study(14))

    def broken(self: AuditLog, event: str, **fields: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AuditLog, "write", broken)
    world.scan()
    assert world.rows("SELECT state FROM pipeline_runs") == [("done",)]


def _month_file(data: Path, month: str, events: list[str], torn: bool = False) -> None:
    folder = data / "audit"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"at": f"{month[:4]}-{month[4:]}-15T10:00:00Z", "event": e, "n": i})
        for i, e in enumerate(events)
    ]
    if torn:
        lines.append('{"at":"2026-0')  # a crash in the middle of a write
    (folder / f"audit-{month}.jsonl").write_text("\n".join(lines) + "\n")


def test_the_latest_entries_are_read_from_the_newest_month_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _month_file(tmp_path, "202609", ["login"] * 3, torn=True)  # must not be read for the last 4
    _month_file(tmp_path, "202610", ["login", "released", "login"])
    _month_file(tmp_path, "202611", ["login", "login"])
    audit = AuditLog(tmp_path)
    logins = audit.latest(4, lambda e: e["event"] == "login")
    assert [(e["at"][:7], e["n"]) for e in logins] == [
        ("2026-10", 0), ("2026-10", 2), ("2026-11", 0), ("2026-11", 1)
    ]  # fmt: skip
    assert "not JSON" not in caplog.text
    # Asked for more than the newer months hold: the torn line of the oldest is left out, said
    # in the log by file, never by content.
    assert len(audit.latest(100, lambda e: True)) == 8
    assert "audit-202609.jsonl: 1 line(s) that are not JSON objects left out" in caplog.text
    assert '"2026-0' not in caplog.text


def test_since_leaves_the_months_before_it_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _month_file(tmp_path, "202609", ["login"], torn=True)
    _month_file(tmp_path, "202611", ["login", "released"])
    found = AuditLog(tmp_path).entries(since="2026-11-01")
    assert [e["event"] for e in found] == ["login", "released"]
    assert "not JSON" not in caplog.text
    assert len(AuditLog(tmp_path).entries()) == 3  # the torn line is left out, not an error
