"""The ``dicom`` destination against real peers: dcmtk's storescp and Orthanc (no mocks).

storescp runs with ``+B`` where the received bytes are compared: it then writes each data set
exactly as it came off the wire, so a file must arrive bit for bit after its meta header.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from jsonschema import Draft202012Validator
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
    UltrasoundImageStorage,
)

from engine.store.index import open_index
from engine.transfer import DESTINATIONS
from engine.transfer.base import (
    DeliveryError,
    InstanceResult,
    OutgoingInstance,
    StudyBatch,
    destination_schema_file,
)
from engine.transfer.dicom import CommitmentOptions, DicomDestination, DicomOptions, _plan
from engine.transfer.outbox import Outbox, RetryPolicy, TransferState
from engine.transfer.worker import DestinationEntry, OutboxWorker
from tests import synth
from tests.compressed import CODECS, Codec, compress
from tests.conftest import need_peer
from tests.outgoing import outgoing
from tests.peers import OrthancServer, PeerMissing, StorescpServer, dataset_part, free_port

SCHEMA = json.loads(destination_schema_file("dicom").read_text())
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.4242"  # no storescp knows it


# --------------------------------------------------------------------------- helpers


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(exc: PeerMissing) -> None:
    """A missing peer skips locally and fails under CI (as ``need_peer``)."""
    if in_ci():
        pytest.fail(str(exc))
    pytest.skip(str(exc))


def storescp(tmp_path: Path, *args: str, name: str = "out") -> StorescpServer:
    need_peer("storescp")
    return StorescpServer(tmp_path / name, args)


def batch_of(paths: Sequence[Path]) -> StudyBatch:
    """A first transfer of the study in ``paths``."""
    instances = tuple(outgoing(p) for p in paths)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return StudyBatch(1, "demo", study, "SUBJ01", "baseline", 0, instances)


def study(
    tmp_path: Path, seed: int = 1, names: Sequence[str] = ("localizer", "t2_tse")
) -> list[Path]:
    series = [synth.MR_SERIES[n] for n in names]
    return synth.write_study(synth.make_study(synth.make_study_spec(seed), series), tmp_path / "in")


def destination(port: int, tmp_path: Path, **options: Any) -> DicomDestination:
    entry = {"type": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "ANY", **options}
    return DicomDestination("peer", entry, tmp_path / "project.yaml")


def send(
    dest: DicomDestination, batch: StudyBatch, already: frozenset[str] = frozenset()
) -> list[InstanceResult]:
    results: list[InstanceResult] = []
    dest.send(batch, already, results.append)
    return results


def received(scp: StorescpServer) -> dict[str, Path]:
    """SOP Instance UID -> the file storescp wrote."""
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in scp.files()}


def rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> Path:
    """Apply ``change`` to the dataset of ``path`` and write it back."""
    ds = pydicom.dcmread(path)
    change(ds)
    synth.write_dataset(ds, path)
    return path


def to_rle(ds: pydicom.Dataset) -> None:
    ds.compress(RLELossless, generate_instance_uid=False)


# --------------------------------------------------------------------------- config


def test_registered_and_schema_defaults_are_the_option_defaults() -> None:
    assert DESTINATIONS["dicom"] is DicomDestination
    Draft202012Validator.check_schema(SCHEMA)
    props = SCHEMA["properties"]
    for f in fields(DicomOptions):
        if f.name in ("host", "port", "ae_title", "tls", "storage_commitment"):
            assert "default" not in props[f.name]
        else:
            assert props[f.name]["default"] == f.default, f.name
    assert all("description" in p for p in props.values())
    assert all("description" in p for p in props["tls"]["properties"].values())
    commitment = props["storage_commitment"]["properties"]
    for f in fields(CommitmentOptions):
        assert commitment[f.name].get("default", f.default) == f.default, f.name
        assert "description" in commitment[f.name]


BASE = {"type": "dicom", "host": "pacs", "port": 104, "ae_title": "PACS"}


@pytest.mark.parametrize(
    ("options", "valid"),
    [
        (BASE, True),
        ({**BASE, "calling_ae_title": "FIONA_1", "verify_count": True, "max_pdu": 0}, True),
        ({**BASE, "tls": {"ca_file": "ca.pem"}}, True),
        ({**BASE, "tls": {"cert_file": "c.pem", "key_file": "k.pem"}}, True),
        ({**BASE, "tls": {"key_file": "k.pem"}}, False),  # a key without its certificate
        ({**BASE, "ae_title": "A" * 17}, False),
        ({**BASE, "ae_title": "    "}, False),
        ({**BASE, "ae_title": "BACK\\SLASH"}, False),
        ({**BASE, "port": 0}, False),
        ({**BASE, "dimse_timeout": 0}, False),
        ({**BASE, "ae_titel": "PACS"}, False),
        ({**BASE, "verify_count": True, "repair_rounds": 0}, True),
        ({**BASE, "repair_rounds": -1}, False),
        ({**BASE, "storage_commitment": {"port": 11113}}, True),
        ({**BASE, "storage_commitment": {"port": 11113, "bind": "127.0.0.1", "timeout": 5}}, True),
        ({**BASE, "storage_commitment": {}}, False),  # the port is required
        ({**BASE, "storage_commitment": {"port": 11113, "timeout": 0}}, False),
        ({**BASE, "storage_commitment": True}, False),
        ({k: v for k, v in BASE.items() if k != "port"}, False),
    ],
)
def test_schema(options: dict[str, Any], valid: bool) -> None:
    assert Draft202012Validator(SCHEMA).is_valid(options) is valid


def test_check_reports_missing_and_unloadable_tls_files(tmp_path: Path) -> None:
    project = tmp_path / "project.yaml"
    options = {**BASE, "tls": {"ca_file": "tls/ca.pem", "cert_file": "/nowhere/c.pem"}}
    issues = DicomDestination.check(options, project, ("destinations", "pacs"))
    assert [(i.path, i.message) for i in issues] == [
        ("destinations.pacs.tls.ca_file", "file not found: tls/ca.pem"),
        ("destinations.pacs.tls.cert_file", "file not found: /nowhere/c.pem"),
    ]
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_text("not a certificate\n")
    issues = DicomDestination.check({**BASE, "tls": {"ca_file": "tls/ca.pem"}}, project, ())
    assert len(issues) == 1 and issues[0].message.startswith("cannot load")
    assert DicomDestination.check(BASE, project, ()) == []


def test_more_than_128_contexts_take_several_associations(tmp_path: Path) -> None:
    def instance(n: int) -> OutgoingInstance:
        uid = f"{PRIVATE_SOP_CLASS}.{n}"
        return OutgoingInstance(f"{uid}.1", uid, ExplicitVRLittleEndian, "1.2", tmp_path, 0)

    plans = _plan([instance(n) for n in range(70)])  # 2 contexts each: 140
    assert [len(p) for p, _ in plans] == [128, 12]
    assert [len(i) for _, i in plans] == [64, 6]


# --------------------------------------------------------------------------- storescp


@pytest.mark.parametrize("args", [(), ("-pdu", "4096")], ids=["default-pdu", "small-pdu"])
def test_study_arrives_bit_for_bit(tmp_path: Path, args: tuple[str, ...]) -> None:
    paths = study(tmp_path, names=("localizer", "t2_tse", "dwi"))
    batch = batch_of(paths)
    with storescp(tmp_path, "+B", *args) as scp:
        results = send(destination(scp.port, tmp_path), batch)
    assert [r.sop_instance_uid for r in results] == [i.sop_instance_uid for i in batch.instances]
    assert all(r.ok and r.status == 0 for r in results)
    got = received(scp)
    assert len(got) == len(batch.instances) == 31
    for instance in batch.instances:
        sent = dataset_part(instance.path.read_bytes())
        assert dataset_part(got[instance.sop_instance_uid].read_bytes()) == sent


def test_already_confirmed_instances_are_not_sent(tmp_path: Path) -> None:
    batch = batch_of(study(tmp_path))
    done = frozenset(i.sop_instance_uid for i in batch.instances[:10])
    with storescp(tmp_path) as scp:
        dest = destination(scp.port, tmp_path)
        results = send(dest, batch, done)
    rest = {i.sop_instance_uid for i in batch.instances[10:]}
    assert {r.sop_instance_uid for r in results} == rest == set(received(scp))
    # Nothing left to send: no association at all (the peer is gone by now).
    assert send(dest, batch, frozenset(i.sop_instance_uid for i in batch.instances)) == []


def test_peer_down_or_refusing_raises_delivery_error(tmp_path: Path) -> None:
    batch = batch_of(study(tmp_path, names=("localizer",)))
    with pytest.raises(DeliveryError, match="cannot connect"):
        send(destination(free_port(), tmp_path), batch)
    with storescp(tmp_path, "--refuse") as scp, pytest.raises(DeliveryError, match="rejected"):
        send(destination(scp.port, tmp_path), batch)


def test_failure_status_and_unaccepted_sop_class_fail_alone(tmp_path: Path) -> None:
    paths = study(tmp_path, names=("localizer",))

    def private_class(ds: pydicom.Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS

    rewrite(paths[2], private_class)
    batch = batch_of(paths)
    first, second, third = batch.instances
    with storescp(tmp_path) as scp:
        # storescp answers 0xA700 (out of resources) when it cannot create the file.
        (scp.out_dir / f"MR.{second.sop_instance_uid}").mkdir()
        results = send(destination(scp.port, tmp_path), batch)
    assert results == [
        InstanceResult(first.sop_instance_uid, True, 0x0000, ""),
        InstanceResult(
            second.sop_instance_uid, False, 0xA700, "status 0xA700 (Refused: Out of Resources)"
        ),
        InstanceResult(third.sop_instance_uid, False, None, "SOP class not accepted"),
    ]


def to_color(ds: pydicom.Dataset) -> None:
    """An 8-bit RGB ultrasound image of the same size instead of the MR one."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    y, x = np.mgrid[0:rows, 0:columns]
    arr = np.stack([(3 * x) % 256, (2 * y) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    ds.set_pixel_data(arr, "RGB", 8, generate_instance_uid=False)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.Modality = "US"


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_compressed_file_is_decompressed_for_an_uncompressed_peer(
    tmp_path: Path, codec: Codec
) -> None:
    """Files compressed by dcmtk and pydicom reach a peer that takes uncompressed syntaxes only
    (storescp's default): decoded, YCbCr as RGB, a lossy JPEG marked lossy, the rest kept."""
    paths = study(tmp_path, names=("localizer",))
    rewrite(paths[1], to_color)
    originals = [pydicom.dcmread(p) for p in paths[:2]]
    for path in paths[:2]:
        compress(path, path, codec)
    batch = batch_of(paths)
    assert [i.transfer_syntax for i in batch.instances[:2]] == [codec.syntax] * 2
    with storescp(tmp_path) as scp:
        results = send(destination(scp.port, tmp_path), batch)
    assert all(r.ok for r in results), results
    got = received(scp)
    for original, path in zip(originals, paths[:2], strict=True):
        sent = pydicom.dcmread(path)
        back = pydicom.dcmread(got[sent.SOPInstanceUID])  # dcmtk's lossy: a new UID
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(back.pixel_array, sent.pixel_array)  # as our decoder sees it
        if codec.lossless:
            assert np.array_equal(back.pixel_array, original.pixel_array)
        color = original.SamplesPerPixel == 3
        assert back.PhotometricInterpretation == ("RGB" if color else "MONOCHROME2")
        assert back.get("PlanarConfiguration", 0) == 0
        if codec.syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
            assert back.LossyImageCompression == "01"
        assert back.PatientID == original.PatientID and back.SOPClassUID == original.SOPClassUID


def test_compressed_file_goes_as_is_when_the_peer_takes_it(tmp_path: Path) -> None:
    paths = study(tmp_path, names=("localizer",))
    rewrite(paths[0], to_rle)
    batch = batch_of(paths)
    with storescp(tmp_path, "+B", "+xr") as scp:  # +xr: RLE Lossless accepted (preferred)
        results = send(destination(scp.port, tmp_path), batch)
    assert all(r.ok for r in results)
    got = received(scp)[batch.instances[0].sop_instance_uid]
    assert pydicom.dcmread(got).file_meta.TransferSyntaxUID == RLELossless
    assert dataset_part(got.read_bytes()) == dataset_part(paths[0].read_bytes())


def test_undecodable_file_fails_alone(tmp_path: Path) -> None:
    paths = study(tmp_path, names=("localizer",))

    def broken_rle(ds: pydicom.Dataset) -> None:
        to_rle(ds)
        ds.PixelData = encapsulate([b"\xff" * 64])  # an RLE header claiming 255 segments

    rewrite(paths[1], broken_rle)
    batch = batch_of(paths)
    with storescp(tmp_path) as scp:
        results = send(destination(scp.port, tmp_path), batch)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].detail.startswith("cannot convert RLE Lossless to Explicit VR Little")
    assert set(received(scp)) == {results[0].sop_instance_uid, results[2].sop_instance_uid}


def test_implicit_only_peer_gets_implicit_vr(tmp_path: Path) -> None:
    paths = study(tmp_path, names=("localizer",))
    with storescp(tmp_path, "+xi") as scp:
        results = send(destination(scp.port, tmp_path), batch_of(paths))
    assert all(r.ok for r in results)
    got = received(scp)
    for path in paths:
        sent = pydicom.dcmread(path)
        back = pydicom.dcmread(got[sent.SOPInstanceUID])
        assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert back == sent


def test_association_lost_mid_study_keeps_what_was_confirmed(tmp_path: Path) -> None:
    batch = batch_of(study(tmp_path))
    with storescp(tmp_path) as scp:
        assert scp.proc is not None
        proc = scp.proc
        results: list[InstanceResult] = []

        def confirm(result: InstanceResult) -> None:
            results.append(result)
            if len(results) == 3:  # the peer dies with the fourth instance on its way
                proc.send_signal(signal.SIGKILL)
                proc.wait()

        dest = destination(scp.port, tmp_path)
        with pytest.raises(DeliveryError, match=r"3 of 15 instance\(s\) answered before"):
            dest.send(batch, frozenset(), confirm)
    assert [r.ok for r in results] == [True] * 3


def test_many_small_files_never_stall(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom 3.0.4's reactor thread could take a C-STORE response meant for the sender,
    which then waited out the DIMSE timeout and aborted (see engine/transfer/dicom.py); small
    files with fast answers hit it in about 1 run of 4 like this one. Here: 8 x 200 64x64
    instances, each answered in time, and no thread besides the sender's while sending (so
    none that could take a response: the cause itself, checked every time)."""
    paths = synth.make_corpus(tmp_path / "in", 200, 64)
    batch = batch_of(paths)
    caplog.set_level(logging.WARNING)
    threads = threading.active_count()
    during: list[int] = []  # threads alive at each confirmation

    def confirm(result: InstanceResult) -> None:
        assert result.ok, result
        during.append(threading.active_count())

    with storescp(tmp_path, "-F") as scp:  # -F: data set only, less disk work
        dest = destination(scp.port, tmp_path, dimse_timeout=10, acse_timeout=10)
        for _ in range(8):
            dest.send(batch, frozenset(), confirm)  # a stall: DeliveryError after 10 s
    assert len(during) == 8 * 200 and set(during) == {threads}
    assert not [r for r in caplog.records if r.name.startswith(("engine", "pynetdicom"))]


# --------------------------------------------------------------------------- TLS


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A throw-away key and self-signed certificate for ``name`` and 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
             "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except FileNotFoundError:
        need(PeerMissing("openssl is not installed"))
    return key, cert


def test_mutual_tls(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path / "tls", "localhost")
    self_signed(tmp_path / "tls", "other")
    batch = batch_of(study(tmp_path, names=("localizer",)))
    tls = {"ca_file": "tls/localhost.pem", "cert_file": str(cert), "key_file": "tls/localhost.key"}
    # storescp requires and checks the client's certificate (its default, -rc).
    with storescp(tmp_path, "+tls", str(key), str(cert), "+cf", str(cert)) as scp:
        results = send(destination(scp.port, tmp_path, tls=tls), batch)
        assert len(results) == 3 and all(r.ok for r in results)
        # A CA that did not sign the peer's certificate: refused before any DICOM.
        untrusted = {**tls, "ca_file": "tls/other.pem"}
        with pytest.raises(DeliveryError, match=r"TLS with 127\.0\.0\.1:\d+ failed"):
            send(destination(scp.port, tmp_path, tls=untrusted), batch)
    assert len(received(scp)) == 3


# --------------------------------------------------------------------------- Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    try:
        server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    except PeerMissing as exc:
        need(exc)
    yield server
    server.stop()


def orthanc_instances(server: OrthancServer, study_uid: str) -> int:
    """Instances Orthanc holds for the study, by its REST API."""
    base = f"http://127.0.0.1:{server.http_port}"
    request = urllib.request.Request(f"{base}/tools/lookup", data=study_uid.encode())
    with urllib.request.urlopen(request, timeout=10) as answer:
        found = [x for x in json.load(answer) if x["Type"] == "Study"]
    if not found:
        return 0
    with urllib.request.urlopen(f"{base}/studies/{found[0]['ID']}/instances", timeout=10) as a:
        return len(json.load(a))


def test_orthanc_receives_and_verify_count_passes(tmp_path: Path, orthanc: OrthancServer) -> None:
    batch = batch_of(study(tmp_path, seed=21))
    dest = destination(orthanc.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
    report_only = destination(
        orthanc.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True, repair_rounds=0
    )
    assert report_only.verify(batch) == (
        "destination peer holds 0 instance(s) of the study, expected 15 (15 confirmed"
        " instance(s) missing)"
    )
    results = send(dest, batch)
    assert len(results) == 15 and all(r.ok for r in results)
    assert orthanc_instances(orthanc, batch.study_uid) == 15
    assert dest.verify(batch) is None
    # A follow-up transfer of the second series: the peer holds more than the batch.
    follow_up = replace(batch, follow_up=1, instances=batch.instances[3:])
    assert dest.verify(follow_up) is None


def test_verify_count_mismatch_and_refused_query(tmp_path: Path, orthanc: OrthancServer) -> None:
    batch = batch_of(study(tmp_path, seed=22))
    dest = destination(orthanc.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
    send(dest, replace(batch, instances=batch.instances[:10]))
    assert orthanc_instances(orthanc, batch.study_uid) == 10
    report_only = destination(
        orthanc.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True, repair_rounds=0
    )
    assert report_only.verify(batch) == (
        "destination peer holds 10 instance(s) of the study, expected 15 (5 confirmed"
        " instance(s) missing)"
    )
    assert orthanc_instances(orthanc, batch.study_uid) == 10  # repair_rounds 0: nothing sent
    # A calling AE title Orthanc does not know may store, but not query.
    options = {"ae_title": "ORTHANC", "calling_ae_title": "STRANGER", "verify_count": True}
    stranger = destination(orthanc.dicom_port, tmp_path, **options)
    assert "aborted" in (stranger.verify(batch) or "")
    with storescp(tmp_path) as scp:  # storescp answers no queries at all
        text = destination(scp.port, tmp_path, verify_count=True).verify(batch)
    assert text == (
        "C-FIND count at destination peer: the peer does not accept Study Root C-FIND queries"
        " from us"
    )
    assert destination(scp.port, tmp_path).verify(batch) is None  # verify_count off: no query


# --------------------------------------------------------------------------- repair


#: Orthanc acknowledges every instance, then deletes the first one numbered 2 (once).
DELETE_ONCE = """
deleted = false
function OnStoredInstance(instanceId, tags, metadata, origin)
   if not deleted and tags['InstanceNumber'] == '2' then
      deleted = true
      Delete(instanceId)
   end
end
"""

#: Orthanc answers Success to every C-STORE but never keeps instance 2 of the series numbered
#: 2 (a filtered instance is acknowledged and dropped, Orthanc 1.10); ``once``: the first time.
DROP = """
dropped = 0
function ReceivedInstanceFilter(dicom, origin, info)
   if dicom.SeriesNumber == '2' and dicom.InstanceNumber == '2' and dropped < {limit} then
      dropped = dropped + 1
      return false
   end
   return true
end
"""


@contextlib.contextmanager
def orthanc_with(tmp_path: Path, lua: str) -> Iterator[OrthancServer]:
    try:
        server = OrthancServer(tmp_path / "orthanc", lua=lua).start()
    except PeerMissing as exc:
        need(exc)
    try:
        yield server
    finally:
        server.stop()


def wait_for_count(server: OrthancServer, study_uid: str, count: int) -> None:
    """Until Orthanc holds ``count`` instances of the study (its Lua runs after the answer)."""
    deadline = time.monotonic() + 60
    while orthanc_instances(server, study_uid) != count:
        assert time.monotonic() < deadline, "Orthanc's Lua hook did not run"
        time.sleep(0.1)


def test_an_instance_lost_after_its_success_is_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc confirms all 15 instances and then deletes one: the count finds 14, the IMAGE
    level listing finds which, and exactly that one is sent again."""
    caplog.set_level(logging.INFO, logger="engine")
    batch = batch_of(study(tmp_path, seed=24))
    with orthanc_with(tmp_path, DELETE_ONCE) as server:
        dest = destination(server.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
        assert all(r.ok for r in send(dest, batch))
        wait_for_count(server, batch.study_uid, 14)
        assert dest.verify(batch) is None
        assert orthanc_instances(server, batch.study_uid) == 15
        assert dest.verify(batch) is None  # and nothing more to do
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "(repair round" in m] == [
        "transfer 1: destination peer lost 1 of 15 confirmed instance(s) (C-FIND count);"
        " sending them again (repair round 1 of 2)"
    ]
    assert any("holds the study again after 1 repair round(s)" in m for m in messages)


def test_an_instance_the_peer_never_keeps_fails_after_the_repair_rounds(tmp_path: Path) -> None:
    batch = batch_of(study(tmp_path, seed=25))
    with orthanc_with(tmp_path, DROP.replace("{limit}", "1000")) as server:
        dest = destination(server.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
        assert all(r.ok for r in send(dest, batch))
        assert dest.verify(batch) == (
            "destination peer holds 14 instance(s) of the study, expected 15 (1 confirmed"
            " instance(s) missing); still missing after 2 repair round(s)"
        )


def test_a_study_the_peer_lost_part_of_completes_through_the_outbox(tmp_path: Path) -> None:
    """The outbox's view: before repairs, a transfer whose study the research PACS lost part
    of failed verification on every attempt and ended a dead letter (``transfer_failed``);
    now it is done, after one attempt."""
    paths = study(tmp_path, seed=26)
    data = tmp_path / "data"
    data.mkdir()
    index = open_index("", data / "index.sqlite")
    outbox = Outbox(index, data)
    held: list[str] = []
    with orthanc_with(tmp_path, DROP.replace("{limit}", "1")) as server:
        dest = destination(server.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
        policy = RetryPolicy(max_attempts=1)
        worker = OutboxWorker(
            outbox, {("demo", "peer"): DestinationEntry(dest, policy)}, lambda *a: held.append(a[2])
        )
        batch = batch_of(paths)
        transfer = outbox.enqueue(
            project="demo", destination="peer", study_uid=batch.study_uid,
            export_uid=batch.study_uid, run_id=1, follow_up=0, subject="SUBJ01", event="",
            items=list(batch.instances),
        )  # fmt: skip
        try:
            assert worker.run_due(timeout=120) == 1
        finally:
            worker.close()
        assert orthanc_instances(server, batch.study_uid) == 15
    record = outbox.get(transfer)
    assert record is not None and record.state is TransferState.DONE, record
    assert held == []


# --------------------------------------------------------------------------- storage commitment


@contextlib.contextmanager
def committing_orthanc(tmp_path: Path, report_port: int, lua: str = "") -> Iterator[OrthancServer]:
    """An Orthanc that reports storage commitment results to FIONA at ``report_port``."""
    modalities = {"fiona": {"AET": "FIONA", "Host": "127.0.0.1", "Port": report_port}}
    try:
        server = OrthancServer(
            tmp_path / "orthanc", lua=lua, extra={"DicomModalities": modalities}
        ).start()
    except PeerMissing as exc:
        need(exc)
    try:
        yield server
    finally:
        server.stop()


def committing(
    server: OrthancServer, tmp_path: Path, port: int, **options: Any
) -> DicomDestination:
    commitment = {"port": port, "bind": "127.0.0.1", "timeout": 60, **options}
    return destination(
        server.dicom_port, tmp_path, ae_title="ORTHANC", storage_commitment=commitment
    )


def test_storage_commitment_confirms_a_study(tmp_path: Path) -> None:
    """Orthanc's N-EVENT-REPORT (on an association of its own) commits to all 15 instances;
    fiona listens for it only while it waits."""
    batch = batch_of(study(tmp_path, seed=27))
    port = free_port()
    with committing_orthanc(tmp_path, port) as server:
        dest = committing(server, tmp_path, port)
        assert all(r.ok for r in send(dest, batch))
        assert dest.verify(batch) is None
    with socket.socket() as s:  # the listener is gone: its port can be listened on again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT connections
        s.bind(("127.0.0.1", port))
        s.listen()


def test_storage_commitment_repairs_an_instance_the_peer_does_not_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Orthanc acknowledges an instance it drops: its report fails it (0x0112, no such
    instance), that instance is sent again, and the second request is committed in full."""
    caplog.set_level(logging.INFO, logger="engine")
    batch = batch_of(study(tmp_path, seed=28))
    port = free_port()
    with committing_orthanc(tmp_path, port, DROP.replace("{limit}", "1")) as server:
        dest = committing(server, tmp_path, port)
        assert all(r.ok for r in send(dest, batch))
        assert dest.verify(batch) is None
        assert orthanc_instances(server, batch.study_uid) == 15
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "(repair round" in m] == [
        "transfer 1: destination peer lost 1 of 15 confirmed instance(s) (storage commitment);"
        " sending them again (repair round 1 of 2)"
    ]


def test_storage_commitment_failures_and_their_messages(tmp_path: Path) -> None:
    batch = batch_of(study(tmp_path, seed=29))
    port = free_port()
    with committing_orthanc(tmp_path, port, DROP.replace("{limit}", "1000")) as server:
        dest = committing(server, tmp_path, port)
        assert all(r.ok for r in send(dest, batch))
        assert dest.verify(batch) == (
            "destination peer did not commit to 1 of 15 instance(s) (storage commitment,"
            " failure reason 0x0112); still missing after 2 repair round(s)"
        )
        # A report that never comes (the peer reports elsewhere): a clear reason, in time.
        deaf = committing(server, tmp_path, free_port(), timeout=1)
        assert deaf.verify(batch) == (
            "destination peer sent no storage commitment report within 1 s (it reports to"
            f" port {deaf.settings.storage_commitment.port})"  # type: ignore[union-attr]
        )
    with storescp(tmp_path) as scp:  # dcmtk's storescp has no Storage Commitment SCP
        plain = destination(scp.port, tmp_path, storage_commitment={"port": free_port()})
        assert plain.verify(batch) == (
            "storage commitment at destination peer: the peer does not accept Storage"
            " Commitment requests from us"
        )


def test_storage_commitment_over_tls(tmp_path: Path) -> None:
    """With ``tls``, the study, the request and the peer's report all go over TLS: Orthanc
    accepts TLS only, and reports to fiona's listener with its client certificate."""
    key, cert = self_signed(tmp_path / "tls", "localhost")  # both sides' certificate
    batch = batch_of(study(tmp_path, seed=30))
    port = free_port()
    modalities = {"fiona": {"AET": "FIONA", "Host": "127.0.0.1", "Port": port, "UseDicomTls": True}}
    extra = {
        "DicomModalities": modalities,
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key),
        "DicomTlsTrustedCertificates": str(cert),
        "DicomTlsRemoteCertificateRequired": True,
    }
    try:
        server = OrthancServer(tmp_path / "orthanc", extra=extra).start()
    except PeerMissing as exc:
        need(exc)
    try:
        tls = {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)}
        commitment = {"port": port, "bind": "127.0.0.1", "timeout": 60}
        options = {"ae_title": "ORTHANC", "tls": tls, "storage_commitment": commitment}
        dest = destination(server.dicom_port, tmp_path, **options)
        assert all(r.ok for r in send(dest, batch))
        assert dest.verify(batch) is None
    finally:
        server.stop()
    issues = DicomDestination.check(
        {**BASE, "tls": {"ca_file": str(cert)}, "storage_commitment": {"port": port}},
        tmp_path / "project.yaml",
        ("destinations", "pacs"),
    )
    assert [(i.path, i.message) for i in issues] == [
        (
            "destinations.pacs.tls",
            "cert_file is required with storage_commitment: the peer's report comes in over"
            " TLS, to fiona's certificate",
        )
    ]


UNCOMPRESSED_ONLY = {
    f"{name}TransferSyntaxAccepted": False
    for name in ("Deflated", "Jpeg", "Jpeg2000", "JpegLossless", "Jpip", "Mpeg2", "Rle")
}


def test_orthanc_restricted_to_uncompressed_gets_every_compressed_instance(
    tmp_path: Path,
) -> None:
    """The issue's case: a study compressed by dcmtk (JPEG baseline, extended and lossless,
    JPEG-LS, RLE) to an Orthanc that accepts uncompressed syntaxes only; every instance
    arrives, decoded (without the decoders, 13 of 15 were refused)."""
    paths = study(tmp_path, seed=31)
    codecs = [c for c in CODECS if c.name in (
        "dcmcjpeg-baseline", "dcmcjpeg-lossless", "dcmcjpeg-extended", "dcmcjpls-lossless",
        "dcmcjpls-near", "dcmcrle",
    )]  # fmt: skip
    for n, path in enumerate(paths):
        compress(path, path, codecs[n % len(codecs)])
    batch = batch_of(paths)
    try:
        server = OrthancServer(tmp_path / "orthanc", extra=UNCOMPRESSED_ONLY).start()
    except PeerMissing as exc:
        need(exc)
    try:
        dest = destination(server.dicom_port, tmp_path, ae_title="ORTHANC", verify_count=True)
        results = send(dest, batch)
        assert [r.detail for r in results if not r.ok] == []
        assert dest.verify(batch) is None
        base = f"http://127.0.0.1:{server.http_port}"
        with urllib.request.urlopen(f"{base}/instances?expand", timeout=10) as answer:
            ids = [i["ID"] for i in json.load(answer)]
        syntaxes = set()
        for orthanc_id in ids:
            url = f"{base}/instances/{orthanc_id}/metadata/TransferSyntax"
            with urllib.request.urlopen(url, timeout=10) as answer:
                syntaxes.add(answer.read().decode())
    finally:
        server.stop()
    assert len(ids) == 15
    assert syntaxes <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
