"""End to end: `fiona serve` as a subprocess, real DICOM clients over real sockets.

dcmtk's storescu and echoscu are the scanner; bad input that storescu refuses to send goes
through a pynetdicom client that puts the bytes on the wire as they are.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests import synth
from tests.conftest import need_peer
from tests.dbutil import connect_index
from tests.peers import (
    REPO,
    FionaServer,
    archived_path,
    dataset_part,
    nodelay_env,
    send_raw_c_store,
)


def echo(
    echoscu: str, server: FionaServer, aet: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [echoscu, "-aet", aet, "-aec", server.ae_title, "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def store(
    storescu: str, server: FionaServer, files: list[Path], aet: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            storescu,
            "-aet",
            aet,
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=nodelay_env(),
    )


def index_rows(server: FionaServer, sql: str) -> list[tuple[object, ...]]:
    with connect_index(server.data_dir / "index.sqlite") as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def mr_ct_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A two-modality study: MR series at 64x64 and a CT series at 512x512 (0.5 MB each)."""
    out = tmp_path_factory.mktemp("study")
    spec = synth.make_study_spec(11, modalities=("MR", "CT"))
    mr = synth.make_study(spec, [synth.MR_SERIES["localizer"], synth.MR_SERIES["t1_mprage"]])
    ct = synth.make_study(spec, [synth.CT_SERIES["ct_head"]], size=512)
    # Keep the CT series short: 512x512 instances are for the size, not the count.
    ct = ct[:8]
    for ds in ct:
        ds.SeriesNumber = 3
    return synth.write_study(mr + ct, out)


def test_echo(echoscu: str, fiona: FionaServer) -> None:
    result = echo(echoscu, fiona)
    assert result.returncode == 0, result.stderr


def test_study_is_stored_byte_identical_indexed_and_viewable(
    storescu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    result = store(storescu, fiona, mr_ct_study)
    assert result.returncode == 0, result.stderr
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in mr_ct_study]
    for path, ds in zip(mr_ct_study, datasets, strict=True):
        stored = archived_path(fiona.data_dir, ds)
        assert dataset_part(stored.read_bytes()) == dataset_part(path.read_bytes()), path
    rows = index_rows(
        fiona, "SELECT sop_instance_uid, calling_ae, called_ae, peer_ip, via FROM instances"
    )
    assert sorted(r[0] for r in rows) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert {r[1:] for r in rows} == {("SCANNER", "FIONA", "127.0.0.1", "dimse")}
    st = datasets[0]
    series_uids = {str(ds.SeriesInstanceUID) for ds in datasets}
    raw = fiona.data_dir / "raw" / st.StudyInstanceUID
    assert {p.name for p in raw.iterdir() if p.is_dir()} == series_uids
    (participant,) = (fiona.data_dir / "participants" / st.PatientID).iterdir()
    assert participant.resolve() == raw.resolve()


def test_series_summaries_are_written_for_received_series(
    storescu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    assert store(storescu, fiona, mr_ct_study).returncode == 0
    fiona.stop()  # a clean shutdown writes every pending summary
    ds = pydicom.dcmread(mr_ct_study[0], stop_before_pixels=True)
    summaries = list((fiona.data_dir / "archive" / ds.StudyInstanceUID).glob("*.json"))
    assert len(summaries) == 3
    import json

    counts = sorted(json.loads(p.read_text())["NumFiles"] for p in summaries)
    per_series: dict[str, int] = {}
    for path in mr_ct_study:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        per_series[uid] = per_series.get(uid, 0) + 1
    assert counts == sorted(per_series.values())


def test_resend_is_acknowledged_and_stored_once(
    storescu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    files = mr_ct_study[:5]
    assert store(storescu, fiona, files).returncode == 0
    assert store(storescu, fiona, files).returncode == 0
    assert index_rows(fiona, "SELECT count(*) FROM instances") == [(5,)]
    assert index_rows(fiona, "SELECT count(*) FROM duplicates WHERE identical=1") == [(5,)]


def test_calling_ae_allow_list(
    tmp_path: Path, storescu: str, echoscu: str, empty_projects: Path, mr_ct_study: list[Path]
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("allowed_calling_aes: [SCANNER]\n")
    server = FionaServer(tmp_path / "data", empty_projects, config=site).start()
    try:
        refused = store(storescu, server, mr_ct_study[:2], aet="INTRUDER")
        assert refused.returncode != 0
        assert index_rows(server, "SELECT count(*) FROM instances") == [(0,)]
        assert "INTRUDER" in server.log_text() and "allow-list" in server.log_text()
        assert echo(echoscu, server, aet="SCANNER").returncode == 0
        accepted = store(storescu, server, mr_ct_study[:2], aet="SCANNER")
        assert accepted.returncode == 0, accepted.stderr
        assert index_rows(server, "SELECT count(*) FROM instances") == [(2,)]
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_input_is_quarantined_and_the_daemon_keeps_serving(
    tmp_path: Path, echoscu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    good = mr_ct_study[0].read_bytes()
    body = dataset_part(good)
    src = pydicom.dcmread(mr_ct_study[0])
    bad_uid = synth.write_dataset(
        synth.dataset_with_bad_uid(src, "SOPInstanceUID", "1.2.3.abc/../../etc"),
        tmp_path / "bad_uid.dcm",
    )
    cases = {
        "garbage": (synth.write_garbage(tmp_path / "g.bin", 6000, seed=5).read_bytes(), 0xC210),
        "truncated_pixels": (body[: len(body) - 1000], 0xC210),
        "truncated_header": (body[:300], 0xC210),
        "bad_uid": (dataset_part(bad_uid.read_bytes()), 0xA900),
    }
    for name, (payload, expected) in cases.items():
        status = send_raw_c_store(fiona.port, payload)
        assert status == expected, name
        assert echo(echoscu, fiona).returncode == 0, f"no C-ECHO after {name}"
    assert fiona.alive()
    rows = index_rows(fiona, "SELECT reason FROM quarantine")
    assert sorted(r[0] for r in rows) == [
        "invalid_uid",
        "unparseable",
        "unparseable",
        "unparseable",
    ]
    assert index_rows(fiona, "SELECT count(*) FROM instances") == [(0,)]
    stored = sorted(p.read_bytes() for p in (fiona.data_dir / "quarantine").rglob("*.dcm"))
    assert sorted(dataset_part(b) for b in stored) == sorted(p for p, _ in cases.values())
    assert not list((fiona.data_dir / "archive").iterdir())


def test_several_associations_at_once(
    storescu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    halves = [mr_ct_study[0::3], mr_ct_study[1::3], mr_ct_study[2::3]]
    procs = [
        subprocess.Popen(
            [
                storescu,
                "-aet",
                f"SCU{i}",
                "-aec",
                "FIONA",
                "127.0.0.1",
                str(fiona.port),
                *map(str, files),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=nodelay_env(),
        )
        for i, files in enumerate(halves)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert index_rows(fiona, "SELECT count(*) FROM instances") == [(len(mr_ct_study),)]
    assert {r[0] for r in index_rows(fiona, "SELECT DISTINCT calling_ae FROM instances")} == {
        "SCU0",
        "SCU1",
        "SCU2",
    }


def serve_once(tmp_path: Path, projects: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fiona serve`` with data in ``tmp_path`` and ``args``, for a start that must fail."""
    command = [sys.executable, "-m", "engine.cli", "serve", "--data", str(tmp_path / "data")]
    return subprocess.run(
        [*command, "--projects", str(projects), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_serve_refuses_an_invalid_site_config(tmp_path: Path, empty_projects: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("ae_title: FIONA\nport: 99999\n")
    result = serve_once(tmp_path, empty_projects, "--config", str(site))
    assert result.returncode == 2
    assert f"{site}:2 port: expected at most 65535, found 99999" in result.stderr
    assert "not starting" in result.stderr


def test_serve_exits_when_its_port_is_taken(tmp_path: Path, empty_projects: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = serve_once(tmp_path, empty_projects, "--bind", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout + result.stderr


def test_an_invalid_project_is_disabled_and_the_others_run(tmp_path: Path, echoscu: str) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "good.yaml").write_text("name: good\n")
    (projects / "broken.yaml").write_text("name: broken\nenabeld: true\n")
    server = FionaServer(tmp_path / "data", projects).start()
    try:
        assert echo(echoscu, server).returncode == 0
        log = server.log_text()
        assert "project disabled" in log and "'enabeld' is not allowed" in log
        assert "projects: good" in log
    finally:
        server.stop()


def test_compressed_data_is_stored_as_it_comes(
    tmp_path: Path, storescu: str, fiona: FionaServer, mr_ct_study: list[Path]
) -> None:
    dcmcjpeg = need_peer("dcmcjpeg")
    jpeg = tmp_path / "jpeg-lossless.dcm"
    subprocess.run([dcmcjpeg, "+e1", str(mr_ct_study[0]), str(jpeg)], check=True, timeout=60)
    sent = subprocess.run(
        [storescu, "--propose-lossless", "-aec", "FIONA", "127.0.0.1", str(fiona.port), str(jpeg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    ds = pydicom.dcmread(jpeg, stop_before_pixels=True)
    stored = archived_path(fiona.data_dir, ds)
    assert dataset_part(stored.read_bytes()) == dataset_part(jpeg.read_bytes())
    assert index_rows(fiona, "SELECT transfer_syntax FROM instances") == [
        ("1.2.840.10008.1.2.4.70",)
    ]


def test_pynetdicom_client(fiona: FionaServer, mr_ct_study: list[Path]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    ae = AE("PYSCU")
    for sop_class in (MRImageStorage, CTImageStorage, Verification):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", fiona.port, ae_title="FIONA")
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in mr_ct_study[:4]]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0]
    assert index_rows(fiona, "SELECT count(*) FROM instances WHERE calling_ae='PYSCU'") == [(4,)]
