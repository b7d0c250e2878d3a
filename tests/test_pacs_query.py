"""``fiona pacs list|echo`` and ``fiona query`` against real PACS: Orthanc and dcmtk's dcmqrscp,
each loaded with the same synthetic studies by dcmtk's storescu."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli import main
from engine.retrieve.query import BadFilter, date_range
from tests import synth
from tests.conftest import need_peer
from tests.peers import DcmqrscpServer, OrthancServer, PeerMissing, nodelay_env
from tests.test_transfer_dicom import need

# Three studies: two MR (seeds 1, 2) and one CT (seed 3).
SPECS = [
    synth.make_study_spec(1, study_date="20210310"),
    synth.make_study_spec(2, study_date="20220615"),
    synth.make_study_spec(3, study_date="20230920", modalities=("CT",)),
]
SERIES = {
    1: [synth.MR_SERIES["localizer"], synth.MR_SERIES["t2_tse"]],
    2: [synth.MR_SERIES["localizer"]],
    3: [synth.CT_SERIES["ct_head"]],
}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("studies")
    for spec in SPECS:
        synth.write_study(
            synth.make_study(spec, SERIES[spec.seed], size=16), folder / str(spec.seed)
        )
    return folder


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, studies: Path) -> Iterator[OrthancServer]:
    try:
        server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    except PeerMissing as exc:
        need(exc)
    storescu = need_peer("storescu")
    subprocess.run(
        [
            storescu,
            "-aec",
            server.ae_title,
            "+sd",
            "+r",
            "127.0.0.1",
            str(server.dicom_port),
            str(studies),
        ],
        check=True,
        capture_output=True,
        env=nodelay_env(),
        timeout=120,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, studies: Path) -> Iterator[DcmqrscpServer]:
    need_peer("dcmqrscp")
    server = DcmqrscpServer(tmp_path_factory.mktemp("dcmqrscp")).start()
    server.store(studies)
    yield server
    server.stop()


@pytest.fixture(params=["orthanc", "dcmqrscp"])
def pacs_site(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A site file whose PACS 'clinical' is one of the two peers."""
    if request.param == "orthanc":
        server = request.getfixturevalue("orthanc")
        ae, port = server.ae_title, server.dicom_port
    else:
        server = request.getfixturevalue("dcmqrscp")
        ae, port = server.ae_title, server.port
    return site_file(tmp_path, f"{{name: clinical, ae_title: {ae}, host: 127.0.0.1, port: {port}}}")


def site_file(tmp_path: Path, *entries: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "site.yaml"
    lines = "".join(f"  - {e}\n" for e in entries)
    path.write_text(f"data_dir: data\npacs:\n{lines}")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def rows(capsys: pytest.CaptureFixture[str], site: Path, *args: str) -> list[dict[str, str]]:
    status, out, err = run(capsys, "query", "clinical", "--config", str(site), "--json", *args)
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


def uids(found: list[dict[str, str]]) -> set[str]:
    return {r["StudyInstanceUID"] for r in found}


UID = {spec.seed: synth.study_uid(spec) for spec in SPECS}


# --------------------------------------------------------------------------- matching


def test_by_accession(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    found = rows(capsys, pacs_site, "--accession", SPECS[0].accession_number)
    assert uids(found) == {UID[1]}
    assert found[0]["PatientID"] == SPECS[0].patient_id
    assert found[0]["StudyDate"] == "20210310"


def test_patient_id_wildcard(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    assert uids(rows(capsys, pacs_site, "--patient-id", "SYNPID0000000*")) == set(UID.values())
    assert uids(rows(capsys, pacs_site, "--patient-id", "SYNPID0000000?")) == set(UID.values())
    assert uids(rows(capsys, pacs_site, "--patient-id", SPECS[1].patient_id)) == {UID[2]}


@pytest.mark.parametrize(
    ("dates", "seeds"),
    [
        ("20210101-20221231", {1, 2}),
        ("20220101-", {2, 3}),
        ("-20211231", {1}),
        ("2023-09-20", {3}),
        ("2021-03-10..2022-06-15", {1, 2}),
    ],
)
def test_study_date_ranges(
    capsys: pytest.CaptureFixture[str], pacs_site: Path, dates: str, seeds: set[int]
) -> None:
    found = rows(capsys, pacs_site, "--patient-id", "SYNPID*", "--study-date", dates)
    assert uids(found) == {UID[s] for s in seeds}


def test_modality(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    assert uids(rows(capsys, pacs_site, "--modality", "CT")) == {UID[3]}
    assert uids(rows(capsys, pacs_site, "--modality", "MR")) == {UID[1], UID[2]}


def test_series_level(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    found = rows(capsys, pacs_site, "--accession", SPECS[0].accession_number, "--level", "series")
    assert [r["SeriesNumber"] for r in found] == ["1", "2"]
    assert {r["Modality"] for r in found} == {"MR"}
    assert {r["StudyInstanceUID"] for r in found} == {UID[1]}
    assert [r["SeriesInstanceUID"] for r in found] == [
        synth.series_uid(SPECS[0], SERIES[1][0], 1),
        synth.series_uid(SPECS[0], SERIES[1][1], 2),
    ]
    ct = rows(capsys, pacs_site, "--modality", "CT", "--level", "series")
    assert [r["StudyInstanceUID"] for r in ct] == [UID[3]]


def test_nothing_matched(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    assert rows(capsys, pacs_site, "--accession", "NO-SUCH-ACC") == []
    status, out, _ = run(
        capsys, "query", "clinical", "--config", str(pacs_site), "--accession", "X"
    )
    assert (status, out) == (0, "no study matched\n")


def test_table_shows_patients_to_the_operator_only(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    orthanc: OrthancServer,
    tmp_path: Path,
) -> None:
    site = site_file(
        tmp_path,
        f"{{name: clinical, ae_title: ORTHANC, host: 127.0.0.1, port: {orthanc.dicom_port}}}",
    )
    caplog.set_level(logging.DEBUG)
    status, out, _ = run(
        capsys, "query", "clinical", "--config", str(site), "--patient-id", "SYNPID*"
    )
    assert status == 0
    header, *lines, summary = out.splitlines()
    assert header.split()[:3] == ["patient", "ID", "patient"]
    assert summary == "3 studies matched"
    assert {line.split()[0] for line in lines} == {s.patient_id for s in SPECS}
    assert SPECS[0].patient_name in out
    assert "C-FIND on PACS clinical at study level: 3 matched" in caplog.text
    audit = "".join(p.read_text() for p in (tmp_path / "data" / "audit").glob("*.jsonl"))
    assert '"event":"pacs_query"' in audit and '"matched":3' in audit
    for spec in SPECS:
        for phi in (spec.patient_id, spec.patient_name, spec.accession_number):
            assert phi not in caplog.text
            assert phi not in audit


# --------------------------------------------------------------------------- peers that fail


def test_echo_and_list(capsys: pytest.CaptureFixture[str], pacs_site: Path) -> None:
    status, out, _ = run(capsys, "pacs", "echo", "clinical", "--config", str(pacs_site))
    assert status == 0 and "answered the C-ECHO" in out
    status, out, _ = run(capsys, "pacs", "list", "--config", str(pacs_site), "--json")
    assert status == 0
    listed = json.loads(out)
    assert (listed["name"], listed["retrieve"], listed["move_destination"]) == (
        "clinical",
        "move",
        "FIONA",
    )
    assert listed["on_get_refused"] == "fail"


def test_refused_association(
    capsys: pytest.CaptureFixture[str], dcmqrscp: DcmqrscpServer, tmp_path: Path
) -> None:
    site = site_file(
        tmp_path, f"{{name: clinical, ae_title: NOTME, host: 127.0.0.1, port: {dcmqrscp.port}}}"
    )
    status, out, err = run(capsys, "query", "clinical", "--config", str(site))
    assert status == 1 and out == ""
    assert err.startswith("fiona: query failed: PACS clinical: association rejected by the peer")
    status, _, err = run(capsys, "pacs", "echo", "clinical", "--config", str(site))
    assert status == 1 and "association rejected by the peer" in err


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


def test_silent_pacs_times_out(
    capsys: pytest.CaptureFixture[str], silent_port: int, tmp_path: Path
) -> None:
    site = site_file(
        tmp_path,
        f"{{name: clinical, ae_title: PACS, host: 127.0.0.1, port: {silent_port},"
        " timeouts: {acse: 0.5}}",
    )
    status, _, err = run(capsys, "query", "clinical", "--config", str(site))
    assert status == 1
    assert "PACS clinical: timed out after 0.5 s negotiating the association" in err


def test_unreachable_pacs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        site = site_file(
            tmp_path, f"{{name: clinical, ae_title: PACS, host: 127.0.0.1, port: {port}}}"
        )
        status, _, err = run(capsys, "pacs", "echo", "clinical", "--config", str(site))
    assert status == 1
    assert f"PACS clinical: cannot connect to 127.0.0.1:{port}" in err


def test_unknown_name_and_bad_filters(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    site = site_file(tmp_path, "{name: clinical, ae_title: PACS, host: 127.0.0.1, port: 104}")
    status, _, err = run(capsys, "query", "nope", "--config", str(site))
    assert status == 2 and "no PACS named 'nope' (configured: clinical)" in err
    status, _, err = run(capsys, "query", "clinical", "--config", str(site), "--study-date", "2023")
    assert status == 2 and "expected a study date YYYYMMDD or a range FROM-TO" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20230101", "20230101"),
        ("20230101-20231231", "20230101-20231231"),
        ("20230101-", "20230101-"),
        ("-20231231", "-20231231"),
        ("2023-01-01", "20230101"),
        ("2023-01-01..2023-12-31", "20230101-20231231"),
        ("..2023-12-31", "-20231231"),
        ("", ""),
    ],
)
def test_date_range(text: str, expected: str) -> None:
    assert date_range(text) == expected


@pytest.mark.parametrize("text", ["2023", "20231301", "20231231-20230101", "yesterday", "-"])
def test_bad_date_range(text: str) -> None:
    with pytest.raises(BadFilter):
        date_range(text)
