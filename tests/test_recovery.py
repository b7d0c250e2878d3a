"""What a crash leaves in the data folder is put right when `fiona serve` starts again.

A planted case (temp files of a dead and of a live process, unindexed archive files readable and
not) pins each decision; SIGKILL trials against a real `fiona serve` receiving from dcmtk's
`storescu` check the invariants after every restart: no temp file left, every archived file
indexed and every indexed file on disk, and nothing the sender saw acknowledged lost.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom

from engine.store.recovery import RUN_DIR, WriterMark
from tests import synth
from tests.dbutil import connect_index
from tests.peers import FionaServer, archived_path, nodelay_env
from tests.test_receive import store
from tests.test_workflow import wait_for

TEMP = re.compile(r"^\.tmp-\d+-\d+$")


def _rows(data: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with connect_index(data / "index.sqlite") as db:
        return db.execute(sql, args).fetchall()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def _temp_files(data: Path) -> list[Path]:
    return [p for p in data.rglob(".tmp-*") if TEMP.match(p.name)]


def _check_invariants(data: Path, server: FionaServer) -> None:
    """No temp file left by a dead process (the running ``server`` writes its own as it
    works: status file, series summaries); every archived .dcm indexed; every indexed
    instance's file present."""
    assert server.proc is not None
    own = f".tmp-{server.proc.pid}-"
    assert [p for p in _temp_files(data) if not p.name.startswith(own)] == []
    on_disk = {str(p.relative_to(data)) for p in (data / "archive").rglob("*.dcm")}
    indexed = {str(r[0]) for r in _rows(data, "SELECT path FROM instances")}
    assert on_disk == indexed, (sorted(on_disk - indexed), sorted(indexed - on_disk))


def test_start_sweeps_temp_files_and_files_orphans(
    tmp_path: Path, empty_projects: Path, storescu: str
) -> None:
    spec = synth.make_study_spec(41)
    study = synth.make_study(spec, [synth.MR_SERIES["localizer"]], size=8)
    sent, held_back = study[:-1], study[-1]
    server = FionaServer(tmp_path / "data", empty_projects).start()
    try:
        files = synth.write_study(sent, tmp_path / "in")
        assert store(storescu, server, files, aet="SCANNER").returncode == 0
    finally:
        assert server.stop() == 0
    data = server.data_dir

    # What a SIGKILL leaves: temp files (header bytes) beside their targets and in work/ ...
    series_dir = archived_path(data, held_back).parent
    dead = _dead_pid()
    stale = [series_dir / f".tmp-{dead}-3", data / "work" / "p" / "run-1" / f".tmp-{dead}-9"]
    live = series_dir / f".tmp-{os.getpid()}-1"  # a running writer's (this test's): kept
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 128 + b"DICM")
    # ... and files renamed into the archive whose index commit never happened: one of the
    # series above, one of a study nothing else of is indexed, one unreadable.
    synth.write_dataset(held_back, archived_path(data, held_back))
    other = synth.make_study(synth.make_study_spec(42), [synth.MR_SERIES["localizer"]], size=8)
    synth.write_dataset(other[0], archived_path(data, other[0]))
    garbage = series_dir / "1.2.826.0.1.3680043.8.498.999.dcm"
    garbage.write_bytes(b"not dicom at all" * 8)
    # The crashed process's writer mark, which its clean stop would have removed.
    (data / RUN_DIR / str(dead)).write_text("1\n")

    server.start()
    try:

        def sweeps() -> list[str]:
            return [s for s in server.log_text().splitlines() if "start-up sweep" in s]

        wait_for("the second start's sweep", lambda: len(sweeps()) == 2, 30, server)
        line = sweeps()[-1]
        assert "2 temp files removed (1 of running processes kept)" in line, line
        assert "2 unindexed archive files indexed, 1 quarantined, 0 left" in line, line
        assert not any(p.exists() for p in stale) and live.exists()
        live.unlink()
        assert not garbage.exists()
        _check_invariants(data, server)
        # Filed as received: the orphan of a known series takes its series' origin.
        origin = _rows(
            data,
            "SELECT via, calling_ae, called_ae FROM instances WHERE sop_instance_uid = ?",
            held_back.SOPInstanceUID,
        )
        assert origin == [("dimse", "SCANNER", "FIONA")]
        lone = _rows(
            data, "SELECT via FROM instances WHERE sop_instance_uid = ?", other[0].SOPInstanceUID
        )
        assert lone == [("recovery",)]
        assert _rows(data, "SELECT reason FROM quarantine") == [("unparseable",)]
        assert not (data / RUN_DIR / str(dead)).exists(), "a swept writer's mark is forgotten"
        assert server.alive()
    finally:
        server.stop()


def test_after_clean_stops_the_sweep_is_skipped_unless_asked(
    tmp_path: Path, empty_projects: Path
) -> None:
    """The walk costs minutes on a large archive: a start after clean stops skips it."""
    server = FionaServer(tmp_path / "data", empty_projects).start()
    assert server.stop() == 0
    data = server.data_dir
    assert list((data / RUN_DIR).iterdir()) == [], "a clean stop removes the writer's mark"
    stale = data / "work" / f".tmp-{_dead_pid()}-1"  # not a crash's: planted, so left alone
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x")

    def sweeps() -> list[str]:
        return [s for s in server.log_text().splitlines() if "start-up sweep" in s]

    server.start()
    try:
        wait_for("the second start's sweep line", lambda: len(sweeps()) == 2, 30, server)
        assert "start-up sweep skipped" in sweeps()[-1]
        assert stale.exists()
    finally:
        assert server.stop() == 0
    server.extra_args = ["--sweep"]
    server.start()
    try:
        wait_for("the forced sweep", lambda: len(sweeps()) == 3, 30, server)
        assert "1 temp files removed" in sweeps()[-1], sweeps()[-1]
        assert not stale.exists()
    finally:
        assert server.stop() == 0


def test_a_writer_mark_tells_a_crash_from_a_clean_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    first = WriterMark(data)
    assert first.sweep_needed and first.first, "a folder without marks is swept once"
    first.forget_unclean()
    first.release()
    clean = WriterMark(data)
    assert not clean.sweep_needed
    clean.release()
    # A crashed process's mark; and a mark under a live pid written by an earlier process of
    # that pid (other start time): both are crashes.
    (data / RUN_DIR / str(_dead_pid())).write_text("5\n")
    (data / RUN_DIR / str(os.getppid())).write_text("0\n")
    after_crash = WriterMark(data)
    assert after_crash.sweep_needed and not after_crash.first
    assert len(after_crash.unclean) == 2
    after_crash.forget_unclean()
    assert sorted(p.name for p in (data / RUN_DIR).iterdir()) == [after_crash.path.name]
    after_crash.release()
    assert list((data / RUN_DIR).iterdir()) == []
    # Another host's node writing to a shared data folder: its process is not visible here,
    # so its mark is no crash (a dead pid here may be a live one there).
    (data / RUN_DIR / f"{_dead_pid()}@another-host").write_text("7\n")
    shared = WriterMark(data)
    assert not shared.sweep_needed
    assert shared.path.name == f"{os.getpid()}@{socket.gethostname()}"
    shared.release()


def _acknowledged(output: str, files: list[Path]) -> list[Path]:
    """The files storescu (-v, one association, files in order) saw answered Success."""
    n = len(re.findall(r"Received Store Response \(Success\)", output))
    return files[:n]


def test_sigkill_trials_leave_nothing_behind_and_lose_nothing_acknowledged(
    tmp_path: Path, empty_projects: Path, storescu: str
) -> None:
    server = FionaServer(tmp_path / "data", empty_projects)
    rng = random.Random(1318)
    acknowledged: list[Path] = []
    for trial in range(6):
        spec = synth.make_study_spec(100 + trial)
        files = synth.write_study(
            synth.make_study(spec, [synth.MR_SERIES["t1_mprage"]], size=64),
            tmp_path / f"study{trial}",
        )
        server.start()
        if trial:
            _check_invariants(server.data_dir, server)
        before = _rows(server.data_dir, "SELECT count(*) FROM instances")[0][0]
        sender = subprocess.Popen(
            [storescu, "-v", "-aec", "FIONA", "127.0.0.1", str(server.port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=nodelay_env(),
        )
        target = before + rng.randint(1, len(files) - 2)

        def received(target: int = target) -> bool:
            count = _rows(server.data_dir, "SELECT count(*) FROM instances")[0][0]
            return int(str(count)) >= target

        wait_for(f"instance {target} of trial {trial}", received, 60, server)
        time.sleep(rng.random() * 0.02)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        output, _ = sender.communicate(timeout=60)
        acknowledged += _acknowledged(output, files)
    server.start()
    try:
        wait_for("the last sweep", lambda: server.log_text().count("start-up sweep") == 7)
        _check_invariants(server.data_dir, server)
        indexed = {
            str(r[0]) for r in _rows(server.data_dir, "SELECT sop_instance_uid FROM instances")
        }
        for path in acknowledged:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in indexed, f"acknowledged instance lost: {path}"
        assert acknowledged
    finally:
        server.stop()
