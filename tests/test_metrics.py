"""`GET /metrics` of a running `fiona serve`: after a real `storescu` send (delivered to a folder)
and one C-STORE of bytes that are not DICOM, the Prometheus text parses with prometheus_client's
own parser, the counts match what was sent, and no label carries a UID, a patient value or a
sender's AE title.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pydicom
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests import synth
from tests.peers import dataset_part, send_raw_c_store
from tests.test_receive import store
from tests.test_status import NOT_DICOM, start_site, write_project
from tests.test_workflow import wait_for

MR = [synth.MR_SERIES["t1_mprage"]]
UID_LIKE = re.compile(r"\d+(\.\d+){3,}")


def scrape(port: int) -> tuple[str, list[Sample]]:
    """(Content-Type, every sample) of ``GET /metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        kind, text = response.headers["Content-Type"], response.read().decode()
    return kind, [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sample ``name`` whose labels include ``labels`` (None when there is none)."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def test_metrics_after_a_real_send(storescu: str, tmp_path: Path) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    share = tmp_path / "share"
    share.mkdir()
    write_project(projects, "sent", "SCANNER_A", {"type": "folder", "path": str(share)})
    running = start_site(tmp_path, projects)
    server = running.server
    try:
        spec = synth.make_study_spec(7)
        files = synth.write_study(synth.make_study(spec, MR, size=16), tmp_path / "study")
        assert store(storescu, server, files, aet="SCANNER_A").returncode == 0
        assert send_raw_c_store(server.port, NOT_DICOM, calling_ae="RAWSCU") == 0xC210

        def sent() -> bool:
            return running.status()[1]["projects"].get("sent", {}).get("sent") == 1

        wait_for("the study to be delivered", sent, 120, server)
        kind, samples = scrape(running.http_port)
    finally:
        server.stop()

    assert kind.startswith("text/plain") and "version=0.0.4" in kind
    n = len(files)
    # Receipt, by DIMSE status, and the dataset bytes of every C-STORE.
    assert value(samples, "fiona_instances_received_total", status="0x0000") == n
    assert value(samples, "fiona_instances_received_total", status="0xC210") == 1
    assert value(samples, "fiona_instances_rejected_total", status="0xC210") == 1
    assert value(samples, "fiona_instances_rejected_total", status="0x0000") is None
    sizes = sum(len(dataset_part(f.read_bytes())) for f in files) + len(NOT_DICOM)
    assert value(samples, "fiona_received_bytes_total") == sizes
    # Read from the index at scrape time.
    assert value(samples, "fiona_studies_completed_total", project="sent") == 1
    assert value(samples, "fiona_pipeline_runs", project="sent", state="done") == 1
    assert value(samples, "fiona_pipeline_runs", project="sent", state="failed") == 0
    out = {"project": "sent", "destination": "out"}
    assert value(samples, "fiona_transfers", **out, state="done") == 1
    assert value(samples, "fiona_transfers", **out, state="queued") == 0
    assert value(samples, "fiona_quarantine_held", reason="unparseable") == 1
    assert value(samples, "fiona_quarantine_held", reason="transfer_failed") == 0
    assert value(samples, "fiona_attention_items", kind="quarantine_held_items") == 1
    assert value(samples, "fiona_attention_items", kind="dead_letters") == 0
    # Counted as they happened.
    assert value(samples, "fiona_transfer_attempts_total", **out, type="folder") == 1
    assert value(samples, "fiona_transfer_failures_total", **out, type="folder") is None
    for step in ("anonymize", "send"):
        count = value(samples, "fiona_pipeline_step_duration_seconds_count", step=step)
        assert count == 1, step
    assert (value(samples, "fiona_disk_free_bytes") or 0) > 0
    assert (value(samples, "fiona_disk_total_bytes") or 0) > 0
    assert 0 <= (value(samples, "fiona_heartbeat_age_seconds") or -1) < 3600
    assert value(samples, "fiona_heartbeat_echo_ok") == 1
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0

    # No PHI, no UID, no sender AE in any label.
    sent_values = {"SCANNER_A", "RAWSCU", server.ae_title}
    for path in [*files, *share.rglob("*.dcm")]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
            sent_values.add(str(ds.get(keyword, "")))
        sent_values |= {str(ds.get("PatientName", "")), str(ds.get("PatientBirthDate", ""))}
    sent_values.discard("")
    labels = {(key, label) for s in samples for key, label in s.labels.items() if key != "le"}
    assert labels, "no labelled samples"
    for key, label in labels:
        assert not UID_LIKE.search(label), (key, label)
        assert not any(v in label for v in sent_values), (key, label)
