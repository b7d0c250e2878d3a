"""Receiving at scale: concurrent senders, a receiver killed under load, two receivers on one
port (``reuse_port``, SO_REUSEPORT) sharing one data folder and index.

Real ``fiona serve`` processes; the senders are dcmtk's storescu, and a pynetdicom SCU where
the test must know which instances were answered Success before the receiver died.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from tests import synth
from tests.dbutil import connect_index
from tests.peers import FionaServer, free_port, nodelay_env


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def index_rows(data: Path, sql: str) -> list[tuple[object, ...]]:
    db = connect_index(data / "index.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def storescu_all(storescu: str, port: int, batches: Sequence[Sequence[Path]]) -> None:
    """One storescu association per batch, all at once; each must succeed."""
    args = [storescu, "-aec", "FIONA", "-aet", "SCANNER", "127.0.0.1", str(port)]
    pipe = subprocess.PIPE
    procs = [
        subprocess.Popen([*args, *map(str, b)], env=nodelay_env(), stdout=pipe, stderr=pipe)
        for b in batches
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


# -- kill -9 under load: nothing acknowledged is lost ---------------------------------------


class Sender(threading.Thread):
    """One association sending ``files`` with pynetdicom; ``acked`` holds the SOP Instance UIDs
    answered Success (0x0000), in order; a dead receiver ends the thread quietly."""

    def __init__(self, port: int, files: Sequence[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.acked: list[str] = []

    def run(self) -> None:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FIONA")
        if not assoc.is_established:
            return
        try:
            for path in self.files:
                ds = pydicom.dcmread(path)
                status = assoc.send_c_store(ds)
                if not assoc.is_established or "Status" not in status:
                    return
                if status.Status == 0x0000:
                    self.acked.append(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()


def test_kill_9_under_four_senders_loses_no_instance_answered_success(
    tmp_path: Path, empty_projects: Path
) -> None:
    data = tmp_path / "data"
    files = synth.make_corpus(tmp_path / "corpus", 160, 32, seed=5)
    server = FionaServer(data, empty_projects).start()
    senders = [Sender(server.port, files[i::4]) for i in range(4)]
    for s in senders:
        s.start()
    # Killed mid-stream: some instances answered, others in flight, the rest never sent.
    wait_until(lambda: sum(len(s.acked) for s in senders) >= 40)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    for s in senders:
        s.join(60)
    acked = {uid for s in senders for uid in s.acked}
    assert 40 <= len(acked) < len(files)
    # The restart sweeps what the kill left (temp files, files not yet indexed), then serves.
    again = FionaServer(data, empty_projects).start()
    again.stop()
    rows = dict(
        index_rows(data, "SELECT sop_instance_uid, path FROM instances")  # type: ignore[arg-type]
    )
    missing = acked - rows.keys()
    assert not missing, f"{len(missing)} instances answered Success are not in the index"
    assert all((data / str(rows[uid])).is_file() for uid in acked)


# -- two receivers on one port ---------------------------------------------------------------


def serving(server: FionaServer) -> bool:
    return "fiona serving AE" in server.log_text()


def test_two_receivers_share_one_port_and_one_index_and_a_split_study_stays_one_study(
    tmp_path: Path, storescu: str, empty_projects: Path
) -> None:
    data = tmp_path / "data"
    site = tmp_path / "site.yaml"
    site.write_text("reuse_port: true\n")
    port = free_port()
    one = FionaServer(data, empty_projects, port=port, config=site, log_path=tmp_path / "1.log")
    two = FionaServer(data, empty_projects, port=port, config=site, log_path=tmp_path / "2.log")
    one.start()
    try:
        two.start()
        wait_until(lambda: serving(two) or not two.alive())
        assert two.alive(), two.log_text()[-2000:]  # not refused the port
        # One study of 64 instances (two series) split over many associations, plus others.
        study = synth.make_corpus(tmp_path / "study", 64, 16, seed=21)
        others = synth.make_corpus(tmp_path / "others", 64, 16, seed=40)
        rounds = 0
        # The kernel spreads connections over both listeners by a hash of the addresses;
        # send in rounds of 8 associations until each receiver has had some.
        while rounds < 5 and not (received(one) and received(two)):
            chunk = slice(rounds * 8, (rounds + 1) * 8)
            part = study[chunk] + others[chunk]
            storescu_all(storescu, port, [part[i::8] for i in range(8)])
            rounds += 1
        assert received(one) and received(two), "the kernel gave every association to one"
        rest = study[rounds * 8 :] + others[rounds * 8 :]
        storescu_all(storescu, port, [rest[i::8] for i in range(8)])
    finally:
        one.stop()
        two.stop()
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study + others]
    rows = index_rows(data, "SELECT sop_instance_uid, path FROM instances")
    assert sorted(str(r[0]) for r in rows) == sorted(uids)  # every instance, once
    assert all((data / str(path)).is_file() for _, path in rows)
    study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID)
    assert index_rows(
        data, f"SELECT count(*), sum(n_instances) FROM studies WHERE study_uid = '{study_uid}'"
    ) == [(1, len(study))]
    assert index_rows(data, "SELECT count(*) FROM quarantine") == [(0,)]
    for server in (one, two):
        assert "Traceback" not in server.log_text()


def received(server: FionaServer) -> bool:
    return "association from SCANNER" in server.log_text()
