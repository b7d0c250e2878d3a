"""Group commit: adds from concurrent associations share one index transaction.

The queue (:class:`engine.store.group_commit.GroupCommit`) is tested with a batch function the
test holds, so which items share a batch is decided by the test, not by timing; the index's
add path (:class:`engine.store.index.SqliteIndex`) over a real SQLite file, with its lock held
by the test while the adds queue up.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest

from engine.dicom.header import InstanceHeader, parse_header
from engine.store.group_commit import GroupCommit
from engine.store.index import AddResult, Origin, SqliteIndex
from tests import synth

ORIGIN = Origin(via="dimse", calling_ae="SCANNER", called_ae="FIONA", peer_ip="127.0.0.1")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class HeldBatches:
    """A batch function whose first call blocks until released; records every batch."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.fail = fail or set()

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            assert self.release.wait(10)
        return [ValueError(f"item {i}") if i in self.fail else i * 10 for i in items]


def submit_in_threads(
    queue: GroupCommit[int, int], items: Sequence[int], results: dict[int, Any]
) -> list[threading.Thread]:
    def run(item: int) -> None:
        try:
            results[item] = queue.submit(item)
        except Exception as exc:
            results[item] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in items]
    for t in threads:
        t.start()
    return threads


def test_a_lone_submit_commits_at_once_in_its_own_batch() -> None:
    batches: list[list[int]] = []

    def batch(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        return [i + 1 for i in items]

    queue: GroupCommit[int, int] = GroupCommit(batch)
    assert [queue.submit(i) for i in (1, 2, 3)] == [2, 3, 4]
    assert batches == [[1], [2], [3]]


def test_items_submitted_during_a_commit_share_the_next_batch_and_each_gets_its_result() -> None:
    held = HeldBatches()
    queue: GroupCommit[int, int] = GroupCommit(held)
    results: dict[int, Any] = {}
    threads = submit_in_threads(queue, [1], results)
    wait_until(lambda: len(held.batches) == 1)  # item 1 is being committed, alone
    threads += submit_in_threads(queue, [2, 3, 4, 5], results)
    wait_until(lambda: queue.pending == 4)
    held.release.set()
    for t in threads:
        t.join(10)
    assert held.batches[0] == [1]
    assert sorted(held.batches[1]) == [2, 3, 4, 5]  # one batch: one commit for four adds
    assert len(held.batches) == 2 and queue.batches == 2
    assert results == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}


def test_a_failing_item_fails_alone() -> None:
    held = HeldBatches(fail={3})
    queue: GroupCommit[int, int] = GroupCommit(held)
    results: dict[int, Any] = {}
    threads = submit_in_threads(queue, [1], results)
    wait_until(lambda: len(held.batches) == 1)
    threads += submit_in_threads(queue, [2, 3, 4], results)
    wait_until(lambda: queue.pending == 3)
    held.release.set()
    for t in threads:
        t.join(10)
    assert isinstance(results[3], ValueError) and str(results[3]) == "item 3"
    assert {k: v for k, v in results.items() if k != 3} == {1: 10, 2: 20, 4: 40}


def test_the_queue_is_bounded_and_a_full_queue_holds_the_submitters_back() -> None:
    held = HeldBatches()
    queue: GroupCommit[int, int] = GroupCommit(held, max_pending=2, max_batch=2)
    results: dict[int, Any] = {}
    threads = submit_in_threads(queue, [1], results)
    wait_until(lambda: len(held.batches) == 1)
    threads += submit_in_threads(queue, [2, 3, 4, 5, 6], results)
    wait_until(lambda: queue.pending == 2)
    time.sleep(0.2)  # the other three submitters are blocked, not queued
    assert queue.pending == 2
    held.release.set()
    for t in threads:
        t.join(10)
    assert results == {i: i * 10 for i in range(1, 7)}
    assert all(len(b) <= 2 for b in held.batches)
    assert sorted(i for b in held.batches for i in b) == [1, 2, 3, 4, 5, 6]


# -- the index's add path ------------------------------------------------------------------


@pytest.fixture
def headers() -> list[InstanceHeader]:
    spec = synth.make_study_spec(11)
    datasets = synth.make_study(spec, [synth.MR_SERIES["t2_tse"]], size=8)
    return [parse_header(part10(ds)) for ds in datasets[:6]]


def part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def add_in_threads(
    index: SqliteIndex, headers: Sequence[InstanceHeader], results: dict[str, Any]
) -> list[threading.Thread]:
    def run(h: InstanceHeader) -> None:
        try:
            path = f"archive/{h.sop_instance_uid}.dcm"
            results[h.sop_instance_uid] = index.add_instance(h, path, 1, ORIGIN)
        except Exception as exc:
            results[h.sop_instance_uid] = exc

    threads = [threading.Thread(target=run, args=(h,)) for h in headers]
    for t in threads:
        t.start()
    return threads


def indexed(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()


def test_concurrent_adds_share_one_transaction_and_a_bad_row_fails_only_itself(
    tmp_path: Path, headers: list[InstanceHeader]
) -> None:
    index = SqliteIndex(tmp_path / "index.sqlite")
    first, *rest = headers
    # A row that cannot be written: its attributes are not JSON (json.dumps raises).
    bad = replace(rest[1], attrs={"x": object()})
    rest[1] = bad
    results: dict[str, Any] = {}
    with index.reading():  # the test holds the connection: the first add waits, the rest queue
        threads = add_in_threads(index, [first], results)
        wait_until(lambda: index.adds.pending == 0 and index.adds.batches == 1)
        threads += add_in_threads(index, rest, results)
        wait_until(lambda: index.adds.pending == len(rest))
    for t in threads:
        t.join(10)
    assert index.adds.batches == 2  # the first alone, then every waiting add in one batch
    assert isinstance(results[bad.sop_instance_uid], TypeError)
    good = [h.sop_instance_uid for h in [first, *rest] if h is not bad]
    assert all(isinstance(results[uid], AddResult) for uid in good), results
    assert results[first.sop_instance_uid] == AddResult(new_study=True, new_series=True)
    assert all(not results[uid].new_study for uid in good[1:])
    assert indexed(tmp_path / "index.sqlite") == set(good)
    index.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    (n_study,) = db.execute("SELECT n_instances FROM studies").fetchone()
    (n_series,) = db.execute("SELECT n_instances FROM series").fetchone()
    db.close()
    assert n_study == n_series == len(good)  # the failed row's counts were rolled back


def test_an_instance_indexed_meanwhile_by_another_process_is_a_duplicate_not_an_error(
    tmp_path: Path, headers: list[InstanceHeader]
) -> None:
    one = SqliteIndex(tmp_path / "index.sqlite")
    two = SqliteIndex(tmp_path / "index.sqlite")  # a second receiver on the same index
    h = headers[0]
    assert one.add_instance(h, "archive/a.dcm", 1, ORIGIN) == AddResult(True, True)
    assert two.add_instance(h, "archive/a.dcm", 1, ORIGIN) == AddResult(False, False, True)
    # The other receiver's study and series rows are counted in, not inserted again.
    assert two.add_instance(headers[1], "archive/b.dcm", 1, ORIGIN) == AddResult(False, False)
    counts = two.counts()
    assert counts["studies"] == 1 and counts["series"] == 1 and counts["instances"] == 2
    with two.reading() as db:
        assert db.execute("SELECT n_instances FROM studies").fetchone()[0] == 2
    one.close()
    two.close()


def test_a_receiver_losing_the_race_for_one_uid_answers_success_and_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two receivers (two processes on one port) get the same instance at once: both look it
    up before either commits. The second to commit finds the row there: a duplicate, answered
    Success, and the archived file (at the path both wrote) stays."""
    from engine.store.archive import Archive, Status

    ds = synth.make_study(synth.make_study_spec(3), [synth.MR_SERIES["t2_tse"]], size=8)[0]
    blob = part10(ds)
    first = Archive(tmp_path, SqliteIndex(tmp_path / "index.sqlite"))
    second = Archive(tmp_path, SqliteIndex(tmp_path / "index.sqlite"))
    assert first.receive(blob, ORIGIN).action == "stored"
    # The second receiver's look-up ran before the first one's commit.
    monkeypatch.setattr(second.index, "find_instance", lambda uid: None)
    outcome = second.receive(blob, ORIGIN)
    assert (outcome.action, outcome.status) == ("duplicate", Status.SUCCESS)
    stored = first.index.find_instance(str(ds.SOPInstanceUID))
    assert stored is not None and (tmp_path / stored.path).read_bytes() == blob
    assert first.index.counts()["instances"] == 1
    with first.index.reading() as db:
        assert db.execute("SELECT n_instances FROM series").fetchone()[0] == 1


def test_adds_wait_for_the_writers_lock_other_processes_hold(
    tmp_path: Path, headers: list[InstanceHeader]
) -> None:
    """Receivers in other processes take turns by an flock on ``index.sqlite-writer``: while
    another holds it, an add waits (and is committed as soon as it is released)."""
    import fcntl
    import os

    index = SqliteIndex(tmp_path / "index.sqlite")
    other = os.open(tmp_path / "index.sqlite-writer", os.O_RDWR)  # another process's turn
    fcntl.flock(other, fcntl.LOCK_EX)
    results: dict[str, Any] = {}
    (thread,) = add_in_threads(index, headers[:1], results)
    thread.join(0.5)
    assert thread.is_alive() and not results  # waiting for its turn
    fcntl.flock(other, fcntl.LOCK_UN)
    os.close(other)
    thread.join(10)
    assert isinstance(results[headers[0].sop_instance_uid], AddResult)
    index.close()


def test_shutdown_waits_for_what_is_queued() -> None:
    held = HeldBatches()
    queue: GroupCommit[int, int] = GroupCommit(held)
    results: dict[int, Any] = {}
    threads = submit_in_threads(queue, [1], results)
    wait_until(lambda: len(held.batches) == 1)
    threads += submit_in_threads(queue, [2, 3], results)
    wait_until(lambda: queue.pending == 2)
    assert not queue.wait_idle(0.1)  # a batch runs, two wait
    held.release.set()
    assert queue.wait_idle(10)
    assert sorted(i for b in held.batches for i in b) == [1, 2, 3]  # all committed
    for t in threads:
        t.join(10)
    assert results == {1: 10, 2: 20, 3: 30}


def test_two_processes_receiving_one_instance_take_turns(tmp_path: Path) -> None:
    """The archive keeps two receipts of one SOP Instance UID apart across processes too: while
    another process holds the UID's stripe (a byte of ``archive.lock``), a receipt waits."""
    import subprocess
    import sys

    from engine.store.archive import Archive
    from engine.store.uid_locks import stripe_of

    ds = synth.make_study(synth.make_study_spec(4), [synth.MR_SERIES["t2_tse"]], size=8)[0]
    archive = Archive(tmp_path, SqliteIndex(tmp_path / "index.sqlite"))
    stripe = stripe_of(str(ds.SOPInstanceUID))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(tmp_path / 'archive.lock')!r}, os.O_RDWR)\n"
         f"fcntl.lockf(fd, fcntl.LOCK_EX, 1, {stripe})\n"
         "print('held', flush=True)\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        outcome: list[Any] = []
        blob = part10(ds)
        receipt = threading.Thread(target=lambda: outcome.append(archive.receive(blob, ORIGIN)))
        receipt.start()
        receipt.join(0.5)
        assert receipt.is_alive() and not outcome  # waiting for the other process
    finally:
        holder.communicate("\n", timeout=10)
    receipt.join(10)
    assert outcome[0].action == "stored"


def test_two_processes_waiting_for_each_others_stripes_are_not_told_deadlock(
    tmp_path: Path,
) -> None:
    """Thread 1 here holds stripe A; the other process holds B and waits for A; thread 2 here
    asks for B. Nothing is stuck (thread 1 lets A go without needing B), but classic fcntl
    locks belong to the process, so the kernel would see a cycle and fail thread 2 with
    EDEADLK: an instance answered 0xA700 for nothing. The UID locks must just wait."""
    import subprocess
    import sys

    from engine.store.uid_locks import UidLocks, stripe_of
    from tests.peers import REPO

    a = "1.2.3.1"
    b = next(f"1.2.3.{n}" for n in range(2, 99) if stripe_of(f"1.2.3.{n}") != stripe_of(a))
    locks = UidLocks(tmp_path / "archive.lock")
    release_a = threading.Event()
    a_held = threading.Event()

    def hold_a() -> None:
        with locks.hold(a):
            a_held.set()
            release_a.wait(10)

    first = threading.Thread(target=hold_a)
    first.start()
    assert a_held.wait(10)
    other = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path\n"
         "from engine.store.uid_locks import UidLocks\n"
         f"locks = UidLocks(Path({str(tmp_path / 'archive.lock')!r}))\n"
         f"with locks.hold({b!r}):\n"
         "    print('b', flush=True)\n"
         f"    with locks.hold({a!r}):\n"
         "        print('a', flush=True)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert other.stdout is not None and other.stdout.readline() == "b\n"
    errors: list[BaseException] = []

    def take_b() -> None:
        try:
            with locks.hold(b):
                pass
        except BaseException as exc:
            errors.append(exc)

    second = threading.Thread(target=take_b)
    second.start()
    time.sleep(0.3)  # the other process waits for A, thread 2 for B
    release_a.set()
    first.join(10)
    assert other.stdout.readline() == "a\n"
    other.wait(10)
    second.join(10)
    assert not second.is_alive() and errors == []
    locks.close()
