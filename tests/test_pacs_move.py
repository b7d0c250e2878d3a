"""C-MOVE from a real PACS (Orthanc, dcmtk's dcmqrscp) into a running ``fiona serve``, by the
SCU of engine.net; and ``fiona retrieve`` jobs over it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from engine.config.loader import load_site
from engine.net.scu import STUDY_ROOT_MOVE
from engine.retrieve.peer import QUERY_PROPOSALS, open_association
from tests import synth
from tests.conftest import need_peer
from tests.peers import DcmqrscpServer, FionaServer, OrthancServer, PeerMissing, free_port
from tests.test_pacs_query import SERIES, SPECS, UID
from tests.test_transfer_dicom import need

MOVE_PROPOSALS = (*QUERY_PROPOSALS, (STUDY_ROOT_MOVE, QUERY_PROPOSALS[1][1]))


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
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, port=fiona_port)
    server.start()
    yield server
    server.stop()


def site_with(tmp_path: Path, ae: str, port: int, fiona: FionaServer) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        f"data_dir: {fiona.data_dir}\nprojects_dir: {fiona.projects_dir}\nport: {fiona.port}\n"
        f"pacs:\n  - {{name: clinical, ae_title: {ae}, host: 127.0.0.1, port: {port}}}\n"
    )
    return path


def held(fiona: FionaServer, study_uid: str) -> int:
    db = sqlite3.connect(f"file:{fiona.data_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute(
            "SELECT count(*) FROM instances i JOIN series se ON se.id = i.series_ref"
            " JOIN studies st ON st.id = se.study_ref WHERE st.study_uid=?",
            (study_uid,),
        ).fetchone()
        return int(row[0])
    finally:
        db.close()


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
