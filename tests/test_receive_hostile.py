"""Hostile and faulty input to a running `fiona serve`: mismatched and deeply nested datasets,
oversized and never-ending PDUs and messages, and slow clients holding association slots.

Each attack comes over a real socket (pynetdicom's client putting bytes on the wire as they
are, or a raw socket speaking the upper layer by hand); after each, a real dcmtk client must
still be served.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pydicom
import pytest

from tests import synth
from tests.peers import FionaServer, dataset_part, send_raw_c_store
from tests.test_header import nest_sequences
from tests.test_receive import echo

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def index_rows(server: FionaServer, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(server.data_dir / "index.sqlite") as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def mr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic 64x64 MR instance, explicit VR little endian."""
    spec = synth.make_study_spec(13)
    (ds,) = synth.make_study(spec, [synth.MR_SERIES["localizer"]])[:1]
    return synth.write_dataset(ds, tmp_path_factory.mktemp("mr") / "mr.dcm")


def test_mismatched_sop_class_and_instance_are_quarantined_with_0xA900(
    echoscu: str, fiona: FionaServer, mr_file: Path
) -> None:
    ds = pydicom.dcmread(mr_file, stop_before_pixels=True)
    assert ds.SOPClassUID == MR
    body = dataset_part(mr_file.read_bytes())
    # An MR dataset on a CT presentation context, announced with its own instance UID.
    assert send_raw_c_store(fiona.port, body, sop_class=CT, sop_instance=ds.SOPInstanceUID) == (
        0xA900
    )
    # The right context, but the command names another instance than the dataset holds.
    other = "1.2.826.0.1.3680043.8.498.99"
    assert send_raw_c_store(fiona.port, body, sop_class=MR, sop_instance=other) == 0xA900
    assert echo(echoscu, fiona).returncode == 0
    rows = index_rows(fiona, "SELECT reason, detail FROM quarantine ORDER BY reason")
    assert [r[0] for r in rows] == ["sop_class_mismatch", "sop_instance_mismatch"]
    assert "presentation context" in str(rows[0][1]) and "Affected SOP Instance" in str(rows[1][1])
    assert index_rows(fiona, "SELECT count(*) FROM instances") == [(0,)]
    # The matching C-STORE is still a plain success.
    ok = send_raw_c_store(fiona.port, body, sop_class=MR, sop_instance=ds.SOPInstanceUID)
    assert ok == 0x0000
    assert index_rows(fiona, "SELECT sop_instance_uid FROM instances") == [(ds.SOPInstanceUID,)]


def test_deeply_nested_sequences_are_unparseable_without_a_traceback(
    echoscu: str, fiona: FionaServer, mr_file: Path
) -> None:
    ds = pydicom.dcmread(mr_file, stop_before_pixels=True)
    nested = nest_sequences(mr_file.read_bytes(), 300)
    status = send_raw_c_store(
        fiona.port, dataset_part(nested), sop_class=MR, sop_instance=ds.SOPInstanceUID
    )
    assert status == 0xC210
    assert echo(echoscu, fiona).returncode == 0
    assert index_rows(fiona, "SELECT reason, detail FROM quarantine") == [
        ("unparseable", "sequences nested deeper than 64 levels")
    ]
    log = fiona.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert fiona.alive()


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxL", kind, len(body)) + body
