"""The durable outbox: queue, deliver, retry with backoff, dead letters, resume, follow-ups.

The index is a real SQLite index and the destination a real ``folder`` destination; an outage
is its folder missing (an unmounted share), which it reports as a DeliveryError.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from engine.store.audit import AuditLog
from engine.store.index import open_index
from engine.store.quarantine import Quarantine
from engine.transfer.base import OutgoingInstance
from engine.transfer.folder import FolderDestination
from engine.transfer.outbox import Outbox, RetryPolicy, TransferState
from engine.transfer.worker import DestinationEntry, OutboxWorker
from tests import synth
from tests.outgoing import outgoing

T0 = 1_900_000_000.0  # a fixed "now" (seconds since the epoch) for deterministic schedules


class Rig:
    """An index, an outbox, a worker with one folder destination, and a synthetic study."""

    def __init__(self, tmp: Path, *, max_attempts: int = 3, concurrency: int = 1) -> None:
        self.data = tmp / "data"
        self.data.mkdir()
        self.index = open_index("", self.data / "index.sqlite")
        self.outbox = Outbox(self.index, self.data)
        self.share = tmp / "share"
        self.project_file = tmp / "projects" / "neuro.yaml"
        self.destination = FolderDestination(
            "share", {"type": "folder", "path": str(self.share)}, self.project_file
        )
        self.policy = RetryPolicy(max_attempts=max_attempts, backoff_seconds=10, jitter=0.0)
        self.quarantine = Quarantine(self.data, self.index)
        self.worker = OutboxWorker(
            self.outbox,
            {("neuro", "share"): DestinationEntry(self.destination, self.policy, concurrency)},
            self._hold,
            AuditLog(self.data),
            clock=lambda: self.now,
        )
        self.now = T0
        spec = synth.make_study_spec(5)
        series = [synth.MR_SERIES["t1_mprage"], synth.MR_SERIES["flair"]]
        datasets = synth.make_study(spec, series, size=16)
        self.files = synth.write_study(datasets, self.data / "work" / "study")
        self.study_uid = datasets[0].StudyInstanceUID

    def _hold(self, project: str, study_uid: str, detail: str) -> None:
        self.quarantine.hold_study(study_uid, "transfer_failed", detail, project=project)

    def items(self, files: list[Path] | None = None) -> list[OutgoingInstance]:
        return [outgoing(path) for path in files or self.files]

    def enqueue(self, run_id: int = 1, follow_up: int = 0, files: list[Path] | None = None) -> int:
        return self.outbox.enqueue(
            project="neuro",
            destination="share",
            study_uid=self.study_uid,
            export_uid=self.study_uid,
            run_id=run_id,
            follow_up=follow_up,
            subject="NEU0001",
            event="",
            items=self.items(files),
            now=T0,
        )

    def run_due(self, now: float) -> int:
        """Run what is due at ``now`` (the worker's clock reads it too)."""
        self.now = now
        return self.worker.run_due(now)

    def delivered(self) -> list[Path]:
        return sorted(self.share.rglob("*.dcm")) if self.share.is_dir() else []

    def close(self) -> None:
        self.worker.close()
        self.index.close()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r  # type: ignore[misc]
    r.close()


def test_a_queued_transfer_is_delivered_confirmed_and_audited(rig: Rig) -> None:
    rig.share.mkdir()
    tid = rig.enqueue()
    assert rig.run_due(T0) == 1
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.DONE
    assert (record.n_sent, record.n_items, record.attempts) == (len(rig.files), len(rig.files), 0)
    sent = {p.name: p.read_bytes() for p in rig.delivered()}
    assert sent == {f"{pydicom.dcmread(f).SOPInstanceUID}.dcm": f.read_bytes() for f in rig.files}
    [entry] = [e for e in AuditLog(rig.data).entries() if e["event"] == "sent"]
    assert entry["destination"] == "share" and entry["instances"] == len(rig.files)
    assert rig.study_uid not in json.dumps(entry)  # UIDs only as tokens


def test_queueing_the_same_run_twice_gives_one_transfer(rig: Rig) -> None:
    assert rig.enqueue(run_id=7) == rig.enqueue(run_id=7)
    assert len(rig.outbox.find()) == 1


def test_an_outage_is_retried_with_backoff_until_the_destination_is_back(rig: Rig) -> None:
    tid = rig.enqueue()  # the share is not mounted yet
    rig.run_due(T0)
    record = rig.outbox.get(tid)
    assert record is not None
    assert (record.state, record.attempts) == (TransferState.QUEUED, 1)
    assert "does not exist" in record.last_error
    assert record.next_try_at == pytest.approx(T0 + 10, abs=1.0)
    assert rig.run_due(T0 + 5) == 0  # not due before its backoff
    rig.run_due(T0 + 11)
    record = rig.outbox.get(tid)
    assert record is not None and record.attempts == 2
    assert record.next_try_at > T0 + 11 + 19  # doubled: 20 s after the second failure
    rig.share.mkdir()
    rig.run_due(T0 + 100)
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.DONE
    assert len(rig.delivered()) == len(rig.files)


def test_used_up_attempts_make_a_dead_letter_and_quarantine_the_study(rig: Rig) -> None:
    tid = rig.enqueue()
    for n in range(3):
        rig.run_due(T0 + 10_000 * n)
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.FAILED
    [held] = rig.index.list_quarantine()
    assert (held.reason, held.study_uid) == ("transfer_failed", rig.study_uid)
    assert "does not exist" in held.detail and "share" in held.detail
    assert rig.run_due(T0 + 100_000) == 0  # a dead letter is not retried on its own
    # The operator fixes the share and retries: delivered, with a fresh count of attempts.
    rig.share.mkdir()
    assert rig.outbox.retry(tid, now=T0 + 100_000).state is TransferState.QUEUED
    rig.run_due(T0 + 100_000)
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.DONE


def test_a_restart_resumes_and_does_not_resend_confirmed_instances(rig: Rig) -> None:
    rig.share.mkdir()
    tid = rig.enqueue()
    # An engine claimed the transfer and had two instances delivered and confirmed when it
    # was killed.
    [claimed] = rig.outbox.claim_due(T0, {("neuro", "share"): 1})
    batch = rig.outbox.batch(claimed)
    early = replace(batch, instances=batch.instances[:2])
    rig.destination.send(early, frozenset(), lambda r: rig.outbox.confirm(tid, r))
    stamps = {p: p.stat().st_mtime_ns for p in rig.delivered()}
    assert len(stamps) == 2
    assert rig.run_due(T0) == 0  # 'sending', leased: nobody else takes it
    # The engine starts again under the same node name: it takes its leftover back at once.
    assert rig.outbox.take_back_own() == 1
    rig.run_due(T0)
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.DONE, record.last_error
    assert len(rig.delivered()) == len(batch.instances)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not written again
    # ... and the study's manifest lists every instance, the early ones included.
    [manifest] = list(rig.share.rglob("manifest.json"))
    text = manifest.read_text()
    assert all(i.sop_instance_uid in text for i in batch.instances)


def test_a_follow_up_waits_for_the_transfer_before_it(rig: Rig) -> None:
    rig.share.mkdir()
    first = rig.enqueue(run_id=1, files=rig.files[:3])
    second = rig.enqueue(run_id=2, follow_up=1, files=rig.files[3:])
    claimed = rig.outbox.claim_due(T0, {("neuro", "share"): 2})
    assert [c.id for c in claimed] == [first]  # the follow-up waits, though a slot is free
    rig.outbox.finish(first)
    assert [c.id for c in rig.outbox.claim_due(T0, {("neuro", "share"): 2})] == [second]


def test_concurrency_limits_transfers_per_destination(tmp_path: Path) -> None:
    rig = Rig(tmp_path, concurrency=1)
    try:
        # Two different studies (different archived UIDs) queued together.
        for run_id, uid in ((1, "1.2.3.1"), (2, "1.2.3.2")):
            rig.outbox.enqueue(
                project="neuro", destination="share", study_uid=uid, export_uid=uid,
                run_id=run_id, follow_up=0, subject="S", event="", items=rig.items(), now=T0,
            )
        assert len(rig.outbox.claim_due(T0, {("neuro", "share"): 1})) == 1
        assert rig.outbox.claim_due(T0, {("neuro", "other"): 5}) == []  # not configured
    finally:
        rig.close()


@pytest.mark.parametrize("follow_on", [True, False])
def test_a_finished_transfer_starts_the_next_at_once_with_follow_on(
    tmp_path: Path, follow_on: bool
) -> None:
    """The service's worker (``follow_on``) does not leave a destination's one slot idle until
    the next tick: one tick delivers three queued studies one after the other."""
    rig = Rig(tmp_path, concurrency=1)
    rig.worker.follow_on = follow_on
    rig.share.mkdir()
    try:
        ids = []
        for seed in (6, 7, 8):
            datasets = synth.make_study(
                synth.make_study_spec(seed), [synth.MR_SERIES["flair"]], size=8
            )
            files = synth.write_study(datasets, rig.data / "work" / f"study{seed}")
            uid = str(datasets[0].StudyInstanceUID)
            ids.append(
                rig.outbox.enqueue(
                    project="neuro", destination="share", study_uid=uid, export_uid=uid,
                    run_id=seed, follow_up=0, subject="S", event="", items=rig.items(files),
                    now=T0,
                )
            )  # fmt: skip
        (first,) = rig.worker.tick(T0)
        assert first.result(timeout=60) is TransferState.DONE

        def done() -> list[bool]:
            return [rig.outbox.state_of(i) is TransferState.DONE for i in ids]

        deadline = time.monotonic() + 60  # the followers run in the worker's threads
        while follow_on and not all(done()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done() == ([True, True, True] if follow_on else [True, False, False])
    finally:
        rig.close()


def test_a_cancelled_transfer_stays_put_until_retried(rig: Rig) -> None:
    rig.share.mkdir()
    tid = rig.enqueue()
    assert rig.outbox.cancel(tid, now=T0).state is TransferState.CANCELLED
    assert rig.run_due(T0) == 0
    with pytest.raises(ValueError):
        rig.outbox.cancel(tid)
    rig.outbox.retry(tid, now=T0)
    rig.run_due(T0)
    assert rig.outbox.state_of(tid) is TransferState.DONE
    with pytest.raises(ValueError):
        rig.outbox.retry(tid)  # done: nothing to retry


def test_missing_source_files_fail_the_attempt_with_a_clear_error(rig: Rig) -> None:
    rig.share.mkdir()
    tid = rig.enqueue()
    rig.files[0].unlink()
    rig.run_due(T0)
    record = rig.outbox.get(tid)
    assert record is not None and record.state is TransferState.QUEUED
    assert record.last_error == "1 files to send are missing"
    assert rig.delivered() == []


def test_backoff_doubles_up_to_its_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(max_attempts=50, backoff_seconds=30, max_backoff_seconds=600, jitter=0.2)
    rng = random.Random(1)
    for attempts, base in ((1, 30), (2, 60), (3, 120), (5, 480), (6, 600), (30, 600)):
        delays = [policy.delay(attempts, rng) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert max(delays) - min(delays) > 0  # spread, so a crowd does not retry in step


def test_the_transfers_command_lists_shows_retries_and_cancels(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    tid = rig.enqueue()
    for n in range(3):  # the share is missing: a dead letter after 3 attempts
        rig.run_due(T0 + 10_000 * n)
    data = ["--data", str(rig.data)]
    assert main(["transfers", "list", *data]) == 0
    out = capsys.readouterr().out
    assert "share" in out and "failed" in out and f"0/{len(rig.files)}" in out
    assert main(["transfers", "show", str(tid), "--json", *data]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "failed" and len(shown["items"]) == len(rig.files)
    assert "does not exist" in shown["last_error"]
    assert main(["transfers", "retry", "--failed", *data]) == 0
    assert capsys.readouterr().out.strip() == f"transfer {tid}: queued"
    assert main(["transfers", "cancel", str(tid), *data]) == 0
    assert main(["transfers", "cancel", str(tid), *data]) == 1  # already cancelled
    assert "nothing to cancel" in capsys.readouterr().err
    assert main(["transfers", "show", "999", *data]) == 1
    events = [e["event"] for e in AuditLog(rig.data).entries()]
    assert "transfer_retry" in events and "transfer_cancel" in events
