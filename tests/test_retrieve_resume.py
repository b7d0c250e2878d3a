"""A retrieval killed (SIGKILL) or stopped (SIGTERM) mid-way, while two lanes of ``fiona serve``
are moving or getting from Orthanc, and resumed by the next start: every row ends done, every
instance is held once, nothing is fetched twice. A stop queues the rows under way again after
their current request, cleanly."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.dbutil import connect_index
from tests.peers import DcmqrscpServer, FionaServer, OrthancServer, PeerMissing, free_port
from tests.synth import make_corpus
from tests.test_pacs_move import finished, queue
from tests.test_transfer_dicom import need

FILES = 800  # four studies of four series of 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("resume-corpus")
    files = make_corpus(folder, FILES, 16)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    return folder, sorted(uids)


@pytest.fixture
def orthanc(
    tmp_path: Path, corpus: tuple[Path, list[str]], fiona_port: int
) -> Iterator[OrthancServer]:
    try:
        server = OrthancServer(
            tmp_path / "orthanc",
            extra={"DicomModalities": {"fiona": ["FIONA", "127.0.0.1", fiona_port]}},
        ).start()
    except PeerMissing as exc:
        need(exc)
    try:
        DcmqrscpServer.load(server.ae_title, server.dicom_port, corpus[0])
        yield server
    finally:
        server.stop()


@pytest.fixture
def fiona_port() -> int:
    return free_port()


def _count(data: Path, sql: str) -> Any:
    db = connect_index(data / "index.sqlite")
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("how", ["kill", "stop"])
@pytest.mark.parametrize("method", ["move", "get"])
def test_an_interrupted_retrieval_resumes_with_no_duplicate_and_no_loss(
    how: str,
    method: str,
    orthanc: OrthancServer,
    corpus: tuple[Path, list[str]],
    fiona_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    data = tmp_path / "data"
    site = tmp_path / "site.yaml"
    site.write_text(
        f"data_dir: {data}\nprojects_dir: {projects}\nport: {fiona_port}\n"
        f"pacs:\n  - {{name: clinical, ae_title: {orthanc.ae_title}, host: 127.0.0.1,"
        f" port: {orthanc.dicom_port}, retrieve: {method}, limits: {{max_associations: 2}}}}\n"
    )
    fiona = FionaServer(data_dir=data, projects_dir=projects, port=fiona_port, config=site)
    fiona.start()
    try:
        csv = tmp_path / "list.csv"
        csv.write_text("study_uid\n" + "".join(f"{u}\n" for u in corpus[1]))
        job = queue(capsys, site, csv)
        deadline = time.monotonic() + 60
        while _count(data, "SELECT count(*) FROM instances") < 100:
            assert time.monotonic() < deadline, "nothing arrived"
            time.sleep(0.01)
        assert fiona.proc is not None
        if how == "kill":
            fiona.proc.send_signal(signal.SIGKILL)
            fiona.proc.wait()
        else:
            assert fiona.stop() == 0
        at_stop = _count(data, "SELECT count(*) FROM instances")
        assert at_stop < FILES, "the retrieval finished before it was interrupted"
        under_way = _count(
            data, "SELECT count(*) FROM retrieve_rows WHERE state IN ('querying', 'retrieving')"
        )
        first_log = fiona.log_text()
        if how == "kill":
            assert under_way >= 1
        else:  # rows under way finished or were queued again; the ticks never waited
            assert under_way == 0
            assert "Traceback" not in first_log
            assert "maximum number of running instances reached" not in first_log
        fiona.proc = None
        fiona.start()
        rows = finished(capsys, site, job)
    finally:
        fiona.stop()
    assert [r["state"] for r in rows] == ["done"] * len(corpus[1]), rows
    assert sum(r["arrived"] for r in rows) == FILES
    assert sum(r["expected"] for r in rows) == FILES
    assert _count(data, "SELECT count(*) FROM instances") == FILES
    assert _count(data, "SELECT count(DISTINCT sop_instance_uid) FROM instances") == FILES
    assert _count(data, "SELECT count(*) FROM duplicates") == 0
    if how == "kill":  # the new process (a new node) took the dead one's rows at once
        assert "leases of nodes gone from this host taken over at once" in fiona.log_text()
