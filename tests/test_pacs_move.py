"""C-MOVE from a real PACS (Orthanc, dcmtk's dcmqrscp) into a running ``fiona serve``, by the
SCU of engine.net; and ``fiona retrieve`` jobs over it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from engine.cli import main
from engine.config.loader import load_site
from engine.retrieve.peer import move_proposals, open_association
from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import DcmqrscpServer, FionaServer, OrthancServer, PeerMissing, free_port
from tests.qr_peer import FlakyPacs
from tests.test_pacs_query import SERIES, SPECS, UID
from tests.test_transfer_dicom import need

MOVE_PROPOSALS = move_proposals()


@pytest.fixture(scope="module")
def fiona_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory, fiona_port: int
) -> Iterator[dict[str, tuple[str, int]]]:
    """Orthanc and dcmqrscp, each loaded with the studies of test_pacs_query and knowing
    fiona's AE title FIONA at ``fiona_port``; name -> (AE title, port)."""
    studies = tmp_path_factory.mktemp("move-studies")
    for spec in SPECS:
        synth.write_study(
            synth.make_study(spec, SERIES[spec.seed], size=16), studies / str(spec.seed)
        )
    need_peer("dcmqrscp")
    qr = DcmqrscpServer(tmp_path_factory.mktemp("qr"), peers=(("FIONA", fiona_port),)).start()
    qr.store(studies)
    try:
        orthanc = OrthancServer(
            tmp_path_factory.mktemp("orthanc-move"),
            extra={"DicomModalities": {"fiona": ["FIONA", "127.0.0.1", fiona_port]}},
        ).start()
    except PeerMissing as exc:
        qr.stop()
        need(exc)
    try:
        DcmqrscpServer.load(orthanc.ae_title, orthanc.dicom_port, studies)
        yield {
            "orthanc": (orthanc.ae_title, orthanc.dicom_port),
            "dcmqrscp": (qr.ae_title, qr.port),
        }
    finally:
        orthanc.stop()
        qr.stop()


@pytest.fixture
def fiona(tmp_path: Path, fiona_port: int) -> Iterator[FionaServer]:
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "neuro.yaml").write_text(
        "name: neuro\nrouting: {calling_ae: [NOBODY]}\n"
        "completeness: {study_quiet_seconds: 3600}\npipeline: []\n"
    )
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, port=fiona_port)
    yield server
    server.stop()


def site_with(
    tmp_path: Path, ae: str, port: int, fiona: FionaServer, retrieve: str = "move"
) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        f"data_dir: {fiona.data_dir}\nprojects_dir: {fiona.projects_dir}\nport: {fiona.port}\n"
        f"pacs:\n  - {{name: clinical, ae_title: {ae}, host: 127.0.0.1, port: {port},"
        f" retrieve: {retrieve}}}\n"
    )
    return path


def index_rows(fiona: FionaServer, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = connect_index(fiona.data_dir / 'index.sqlite', read_only=True, timeout=30)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def held(fiona: FionaServer, study_uid: str) -> int:
    rows = index_rows(
        fiona,
        "SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref"
        " JOIN studies st ON st.id = se.study_ref WHERE st.study_uid=?",
        study_uid,
    )
    return int(rows[0][0])


def n_instances(seed: int) -> int:
    return sum(s.n_instances for s in SERIES[seed])


def study_move(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


@pytest.mark.parametrize("peer", ["orthanc", "dcmqrscp"])
def test_c_move_into_fiona(
    peers: dict[str, tuple[str, int]], peer: str, fiona: FionaServer, tmp_path: Path
) -> None:
    site = load_site(site_with(tmp_path, *peers[peer], fiona))
    fiona.start()
    assoc = open_association(site, site.pacs[0], MOVE_PROPOSALS)
    try:
        result = assoc.move(study_move(UID[1]), "FIONA")
        assert not isinstance(result, str)
        assert (result.status, result.completed, result.failed) == (0, n_instances(1), 0)
        # Sent before the final answer: every instance is in fiona's index by now.
        assert held(fiona, UID[1]) == n_instances(1)
        unknown = assoc.move(study_move(UID[2]), "NOBODY")
        assert not isinstance(unknown, str)
        assert not unknown.ok
        assert unknown.status == 0xA801 or 0xC000 <= unknown.status <= 0xCFFF, unknown
        assert held(fiona, UID[2]) == 0
    finally:
        assoc.release()


# --------------------------------------------------------------------------- fiona retrieve


def status_rows(capsys: pytest.CaptureFixture[str], site: Path, job: int) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["retrieve", "status", str(job), "--config", str(site), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def finished(capsys: pytest.CaptureFixture[str], site: Path, job: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = status_rows(capsys, site, job)
        if all(r["state"] in ("done", "partial", "failed") for r in rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"job {job} not finished: {rows}")


def queue(capsys: pytest.CaptureFixture[str], site: Path, csv: Path, *more: str) -> int:
    capsys.readouterr()
    status = main(["retrieve", "clinical", "--list", str(csv), "--config", str(site), *more])
    out, err = capsys.readouterr()
    assert status == 0, err
    return int(out.split()[2].rstrip(":"))


@pytest.mark.parametrize("method", ["move", "get"])
@pytest.mark.parametrize("peer", ["orthanc", "dcmqrscp"])
def test_retrieve_a_list(
    peers: dict[str, tuple[str, int]],
    peer: str,
    method: str,
    fiona: FionaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = site_with(tmp_path, *peers[peer], fiona, method)
    fiona.config = site
    fiona.start()
    csv = tmp_path / "list.csv"
    csv.write_text(
        "accession,patient_id,study_date,subject,modality\n"
        f"{SPECS[0].accession_number},,,S001,\n"  # by accession
        f",{SPECS[1].patient_id},20220101-20221231,S002,\n"  # by patient and dates
        "NO-SUCH-ACCESSION,,,S003,\n"
        f"{SPECS[2].accession_number},,,S004,MR\n"  # a CT study: no MR series
    )
    job = queue(capsys, site, csv, "--project", "neuro")
    rows = finished(capsys, site, job)
    assert [(r["line"], r["state"]) for r in rows] == [
        (2, "done"),
        (3, "done"),
        (4, "failed"),
        (5, "failed"),
    ]
    assert (rows[0]["expected"], rows[0]["arrived"]) == (n_instances(1), n_instances(1))
    assert (rows[1]["expected"], rows[1]["arrived"]) == (n_instances(2), n_instances(2))
    assert rows[2]["reason"] == "no study matched"
    assert rows[3]["reason"] == "no series matched the row's modality and series description"
    assert held(fiona, UID[1]) == n_instances(1) and held(fiona, UID[3]) == 0
    routes = index_rows(
        fiona, "SELECT study_uid, project, subject, assigned FROM study_routes ORDER BY subject"
    )
    assert routes == [(UID[1], "neuro", "S001", 1), (UID[2], "neuro", "S002", 1)]
    capsys.readouterr()
    assert main(["retrieve", "status", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "2 done 2 failed" in out
    assert SPECS[0].accession_number not in out and SPECS[1].patient_id not in out
    assert SPECS[0].accession_number not in fiona.log_text()
    audit = [
        json.loads(line)
        for f in sorted((fiona.data_dir / "audit").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    retrieved = [e for e in audit if e["event"] == "retrieved"]
    # Rows run in parallel lanes (max_associations 2): they finish in any order.
    assert sorted((e["line"], e["outcome"], len(e["studies"])) for e in retrieved) == [
        (2, "done", 1),
        (3, "done", 1),
        (4, "failed", 0),
        (5, "failed", 0),
    ]
    text = json.dumps(audit)
    assert UID[1] not in text and SPECS[0].accession_number not in text


def test_a_killed_retrieval_resumes_without_duplicates(
    peers: dict[str, tuple[str, int]],
    fiona: FionaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """fiona serve stopped half-way through a row (one series and part of another arrived,
    the row 'retrieving'): the next start takes the row up, fetches only what is missing (a
    series-level and an image-level C-MOVE), and ends it done."""
    site = site_with(tmp_path, *peers["orthanc"], fiona)
    fiona.config = site
    fiona.start()
    loaded = load_site(site)
    assoc = open_association(loaded, loaded.pacs[0], MOVE_PROPOSALS)
    first = Dataset()
    first.QueryRetrieveLevel = "SERIES"
    first.StudyInstanceUID = UID[1]
    first.SeriesInstanceUID = synth.series_uid(SPECS[0], SERIES[1][0], 1)
    assert assoc.move(first, "FIONA").ok
    # ... and three instances of the second series: the rest go by an image-level C-MOVE.
    second = synth.make_series(SPECS[0], SERIES[1][1], 2, size=16)
    some = Dataset()
    some.QueryRetrieveLevel = "IMAGE"
    some.StudyInstanceUID = UID[1]
    some.SeriesInstanceUID = second[0].SeriesInstanceUID
    some.SOPInstanceUID = [str(ds.SOPInstanceUID) for ds in second[:3]]
    assert assoc.move(some, "FIONA").completed == 3
    assoc.release()
    assert held(fiona, UID[1]) == SERIES[1][0].n_instances + 3
    fiona.stop()
    csv = tmp_path / "list.csv"
    csv.write_text(f"study_uid\n{UID[1]}\n")
    job = queue(capsys, site, csv)
    with connect_index(fiona.data_dir / "index.sqlite") as db:
        # Held by a node that died: its lease ran out, any node takes the row over.
        db.execute(
            "UPDATE retrieve_rows SET state='retrieving', claimed_by='gone/1', lease_until=0"
        )
    fiona.proc = None
    fiona.start()
    (row,) = finished(capsys, site, job)
    assert (row["state"], row["arrived"], row["expected"]) == (
        "done",
        n_instances(1),
        n_instances(1),
    )
    assert held(fiona, UID[1]) == n_instances(1)
    assert index_rows(fiona, "SELECT count(*) FROM duplicates") == [(0,)]
    assert index_rows(fiona, "SELECT claimed_by FROM retrieve_rows") == [(None,)]  # released


def test_studies_per_hour_hold_with_rows_in_parallel(
    peers: dict[str, tuple[str, int]],
    fiona: FionaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """studies_per_hour 1 with two lanes: a row under way counts, so the second lane does not
    take the second row while the first is being fetched, nor after it (the hour is full)."""
    site = site_with(tmp_path, *peers["orthanc"], fiona)
    text = site.read_text().replace(
        "retrieve: move", "retrieve: move, limits: {max_associations: 2, studies_per_hour: 1}"
    )
    site.write_text(text)
    fiona.config = site
    fiona.start()
    csv = tmp_path / "list.csv"
    csv.write_text(f"study_uid\n{UID[1]}\n{UID[2]}\n")
    job = queue(capsys, site, csv)
    deadline = time.monotonic() + 60
    while not any(r["state"] == "done" for r in status_rows(capsys, site, job)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.0)  # four more ticks of the job
    rows = status_rows(capsys, site, job)
    assert sorted(r["state"] for r in rows) == ["done", "queued"], rows
    assert held(fiona, UID[1]) + held(fiona, UID[2]) in (n_instances(1), n_instances(2))


def test_bad_lists_are_not_queued(
    fiona: FionaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = site_with(tmp_path, "PACS", 104, fiona)
    fiona.config = site
    fiona.start()
    csv = tmp_path / "list.csv"
    csv.write_text("accession,patient_idd\nA1,\n,\n,P1\n")
    status = main(["retrieve", "clinical", "--list", str(csv), "--config", str(site)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{csv}:1 'patient_idd': unknown column" in err
    csv.write_text("accession,patient_id,study_date\nA1,,\n,P1,\n,,2023\n")
    assert main(["retrieve", "clinical", "--list", str(csv), "--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"{csv}:3 study_date: a patient_id needs a study_date range" in err
    assert f"{csv}:4: expected an accession, a study_uid or a patient_id" in err
    assert f"{csv}:4 study_date: expected a study date" in err
    csv.write_text("accession\nA1\n")
    status = main(
        ["retrieve", "clinical", "--list", str(csv), "--config", str(site), "--project", "nope"]
    )
    assert status == 2 and "no such project: nope" in capsys.readouterr().err
    assert index_rows(fiona, "SELECT count(*) FROM retrieve_rows") == [(0,)]


def test_a_pacs_that_does_not_know_the_destination_fails_the_row(
    peers: dict[str, tuple[str, int]],
    fiona: FionaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ae, port = peers["dcmqrscp"]
    site = tmp_path / "site.yaml"
    site.write_text(
        f"data_dir: {fiona.data_dir}\nprojects_dir: {fiona.projects_dir}\nport: {fiona.port}\n"
        f"pacs:\n  - {{name: clinical, ae_title: {ae}, host: 127.0.0.1, port: {port},"
        " move_destination: NOBODY}\n"
    )
    fiona.config = site
    fiona.start()
    csv = tmp_path / "list.csv"
    csv.write_text(f"accession\n{SPECS[0].accession_number}\n")
    (row,) = finished(capsys, site, queue(capsys, site, csv))
    assert (row["state"], row["arrived"]) == ("failed", 0)
    assert row["reason"].startswith(
        f"{n_instances(1)} of {n_instances(1)} instances did not arrive"
    )
    assert "PACS clinical answered the C-MOVE with status 0x" in row["reason"]


@pytest.mark.parametrize("on_refused", ["fail", "move"])
def test_a_pacs_that_refuses_c_get(
    on_refused: str, tmp_path: Path, fiona: FionaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Orthanc not allowing C-GET for fiona's AE aborts the association on the request.
    on_get_refused: fail: the row fails (second try) saying what to check and what to set;
    move: the same row is fetched by C-MOVE at once and ends done, the log and the row's audit
    entry saying it fell back."""
    studies = tmp_path / "studies"
    synth.write_study(synth.make_study(SPECS[0], SERIES[1], size=16), studies)
    allowed = {"AET": "FIONA", "Host": "127.0.0.1", "Port": fiona.port, "AllowGet": False}
    try:
        orthanc = OrthancServer(
            tmp_path / "orthanc", extra={"DicomModalities": {"fiona": allowed}}
        ).start()
    except PeerMissing as exc:
        need(exc)
    try:
        DcmqrscpServer.load(orthanc.ae_title, orthanc.dicom_port, studies)
        site = site_with(tmp_path, orthanc.ae_title, orthanc.dicom_port, fiona, "get")
        text = site.read_text().replace(
            "retrieve: get", f"retrieve: get, on_get_refused: {on_refused}"
        )
        site.write_text(text)
        fiona.config = site
        fiona.start()
        csv = tmp_path / "list.csv"
        csv.write_text(f"accession\n{SPECS[0].accession_number}\n")
        (row,) = finished(capsys, site, queue(capsys, site, csv))
    finally:
        orthanc.stop()
    (entry,) = [
        json.loads(line)
        for f in sorted((fiona.data_dir / "audit").glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if json.loads(line)["event"] == "retrieved"
    ]
    refused = "PACS clinical: the peer aborted the association"
    if on_refused == "fail":
        assert (row["state"], row["arrived"]) == ("failed", 0)
        assert row["reason"] == (
            f"{refused} (does the PACS allow C-GET from FIONA?; with on_get_refused: move"
            " fiona retrieves by C-MOVE instead)"
        )
        assert "fallback" not in entry
        return
    assert (row["state"], row["arrived"], row["expected"]) == ("done", 15, 15), row
    assert held(fiona, UID[1]) == 15
    assert (entry["outcome"], entry["via"]) == ("done", "C-MOVE")
    assert entry["fallback"] == f"C-GET refused: {refused}"
    assert (
        f"{refused}: retrieving from PACS clinical by C-MOVE from now on (on_get_refused: move)"
        in fiona.log_text()
    )


@pytest.mark.parametrize("on_refused", ["fail", "move"])
def test_a_pacs_without_c_get(
    on_refused: str, fiona: FionaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS that does not accept Study Root C-GET at all (its association takes FIND and
    MOVE only): fail says so at once; move fetches the row by C-MOVE."""
    pacs = FlakyPacs(synth.make_study(SPECS[0], SERIES[1], size=16), fiona.port).start()
    try:
        site = site_with(tmp_path, pacs.ae_title, pacs.port, fiona, "get")
        text = site.read_text().replace(
            "retrieve: get", f"retrieve: get, on_get_refused: {on_refused}"
        )
        site.write_text(text)
        fiona.config = site
        fiona.start()
        csv = tmp_path / "list.csv"
        csv.write_text(f"accession\n{SPECS[0].accession_number}\n")
        (row,) = finished(capsys, site, queue(capsys, site, csv))
    finally:
        pacs.stop()
    refused = "PACS clinical: the peer does not accept Study Root C-GET requests from us"
    if on_refused == "fail":
        assert (row["state"], row["attempts"]) == ("failed", 0)
        assert (
            row["reason"]
            == f"{refused} (with on_get_refused: move fiona retrieves by C-MOVE instead)"
        )
        assert pacs.moves == 0
        return
    assert (row["state"], row["arrived"], row["expected"]) == ("done", 15, 15), row
    assert pacs.moves == 2  # the study, then the instance its first C-MOVE left out


@pytest.mark.parametrize(("mode", "state"), [("drop_first", "done"), ("lie", "failed")])
def test_a_pacs_that_drops_an_instance_or_delivers_nothing(
    mode: str,
    state: str,
    fiona: FionaServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """drop_first: the first C-MOVE leaves one instance out and answers success; the series
    that came up short against its count is listed, the next round fetches the missing
    instance and the row ends done. lie: success with nothing sent is a failure."""
    pacs = FlakyPacs(synth.make_study(SPECS[0], SERIES[1], size=16), fiona.port, mode).start()
    try:
        site = site_with(tmp_path, pacs.ae_title, pacs.port, fiona)
        fiona.config = site
        fiona.start()
        csv = tmp_path / "list.csv"
        csv.write_text(f"accession\n{SPECS[0].accession_number}\n")
        (row,) = finished(capsys, site, queue(capsys, site, csv))
    finally:
        pacs.stop()
    assert row["state"] == state, row
    if mode == "drop_first":
        assert (row["arrived"], row["expected"], row["attempts"]) == (15, 15, 2)
        assert pacs.moves == 2  # the whole study, then the dropped instance at image level
        # Both series counted (0020,1209), only the short one listed instance by instance.
        assert pacs.image_finds == 1
    else:
        assert (row["arrived"], row["expected"], row["attempts"]) == (0, 15, 3)
        assert row["reason"].startswith(
            "15 of 15 instances did not arrive after 3 C-MOVEs: PACS clinical answered with"
            " success but delivered nothing (does it send FIONA to this fiona's host and port?)"
        )
