"""The outbox worker: claims due transfers and runs each on its destination in a thread.

:meth:`OutboxWorker.tick` is what the scheduler calls every second: it claims as many due
transfers as each destination has free slots (its ``concurrency``, counted over every node of
the cluster) and starts them; it never waits for a send. A claim is a lease
(:mod:`engine.store.leases`): when another node took the transfer over (this node's lease ran
out), the send stops at its next confirmed instance and nothing of its outcome is written.
:meth:`OutboxWorker.run_due` does the same and waits, for commands and tests.
In the service (``follow_on``), a transfer that ends ``done`` also starts the next due ones at
once, so a destination's slot is not left idle until the next tick.

A transfer ends ``done`` only when its destination confirmed every instance and its ``verify``
passed. Anything else is a failed attempt (retried with backoff, a dead letter at the limit,
quarantining its study as ``transfer_failed``); the error text is kept for ``fiona transfers``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from engine import metrics
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.leases import LeaseLost
from engine.store.outage import OUTAGE
from engine.transfer.base import DeliveryError, Destination, InstanceResult
from engine.transfer.outbox import Outbox, RetryPolicy, TransferRecord, TransferState

__all__ = ["DestinationEntry", "OutboxWorker"]

log = logging.getLogger(__name__)

#: Called with (project, archived study UID, detail) when a transfer becomes a dead letter.
HoldStudy = Callable[[str, str, str], None]


@dataclass(frozen=True)
class DestinationEntry:
    """A configured destination with the outbox's settings for it."""

    destination: Destination
    retry: RetryPolicy
    concurrency: int = 1


class OutboxWorker:
    """Runs the outbox's due transfers on the configured destinations."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Mapping[tuple[str, str], DestinationEntry],
        hold: HoldStudy,
        audit: AuditLog | None = None,
        max_threads: int = 8,
        clock: Callable[[], float] = time.time,
        follow_on: bool = False,
    ) -> None:
        """``follow_on`` (the service): a transfer that ends ``done`` starts the next due ones
        at once instead of at the next tick (with a destination's ``concurrency`` of 1 and a
        tick a second, one node delivered at most a study a second; bench/e2e.py). A failed
        one does not, so a dead destination is not retried faster than the ticks."""
        self.follow_on = follow_on
        self._closed = False
        self.outbox = outbox
        #: Seconds since the epoch; the outbox's schedule follows it (tests set their own).
        self.clock = clock
        self.hold = hold
        self.audit = audit
        self._lock = threading.Lock()
        self._destinations: dict[tuple[str, str], DestinationEntry] = dict(destinations)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="outbox")

    def configure(self, destinations: Mapping[tuple[str, str], DestinationEntry]) -> None:
        """New destinations (project files changed); transfers in flight finish on the old."""
        with self._lock:
            self._destinations = dict(destinations)

    def tick(self, now: float | None = None) -> list[Future[TransferState]]:
        """Start every due transfer there is a free slot for; returns their futures."""
        now = self.clock() if now is None else now
        with self._lock:
            slots = {key: entry.concurrency for key, entry in self._destinations.items()}
            claimed = self.outbox.claim_due(now, slots)
            started = []
            for record in claimed:
                entry = self._destinations[(record.project, record.destination)]
                started.append(self._pool.submit(self._run, record, entry))
        return started

    def run_due(self, now: float | None = None, timeout: float | None = None) -> int:
        """Start the due transfers and wait for them; returns how many ran."""
        futures = self.tick(now)
        wait(futures, timeout=timeout)
        return len(futures)

    def close(self, wait_for: bool = True) -> None:
        self._closed = True
        self._pool.shutdown(wait=wait_for, cancel_futures=True)
        for entry in self._destinations.values():
            try:
                entry.destination.close()
            except Exception:
                log.exception("closing destination %s", entry.destination.name)

    # -- one transfer ---------------------------------------------------------------------------

    def _run(self, record: TransferRecord, entry: DestinationEntry) -> TransferState:
        state = self._run_once(record, entry)
        if self.follow_on and state is TransferState.DONE:
            self._start_next()
        return state

    def _start_next(self) -> None:
        """Start the due transfers a slot is free for now (see ``follow_on``)."""
        if self._closed:
            return
        try:
            self.tick()
        except IndexUnavailable as exc:  # the scheduled tick waits for the index
            OUTAGE.went_away(exc)
        except Exception:  # in a pool thread nobody waits on: said here, the tick tries again
            if not self._closed:  # else the pool was shut down meanwhile (the service stops)
                log.exception("starting the next transfer failed; the next tick tries again")

    def _run_once(self, record: TransferRecord, entry: DestinationEntry) -> TransferState:
        metrics.transfer_attempt(record.project, record.destination, entry.destination.type)
        try:
            return self._attempt(record, entry)
        except LeaseLost:
            log.warning("transfer %d: another node holds it now; stopped here", record.id)
            return TransferState.SENDING
        except IndexUnavailable as exc:
            # Not the peer's failure: no attempt counted. The transfer stays sending; its lease
            # runs out and it is claimed again (here or elsewhere) once the index is back;
            # what the peer confirmed and was recorded is not sent again.
            OUTAGE.went_away(exc)
            return TransferState.SENDING
        except Exception as exc:  # a bug, not the peer: counted as a failed attempt all the same
            log.exception("transfer %d to %s failed unexpectedly", record.id, record.destination)
            try:
                return self._failed(record, entry, f"internal error: {type(exc).__name__}")
            except LeaseLost:
                return TransferState.SENDING
        finally:
            try:
                self.outbox.release(record.id)
            except IndexUnavailable:
                pass  # its lease runs out instead
            except Exception as exc:  # its lease runs out instead
                log.error("transfer %d: could not release it (%s)", record.id, type(exc).__name__)

    def _attempt(self, record: TransferRecord, entry: DestinationEntry) -> TransferState:
        batch = self.outbox.batch(record)
        missing = [i for i in batch.instances if not i.path.is_file()]
        if missing:
            return self._failed(record, entry, f"{len(missing)} files to send are missing")
        already = self.outbox.already_sent(record)

        def confirm(result: InstanceResult) -> None:
            self.outbox.confirm(record.id, result, self.clock())
            if self.outbox.leases.lost(record.id):
                raise LeaseLost(f"transfer {record.id} is held by another node now")

        started = time.monotonic()
        try:
            entry.destination.send(batch, already, confirm)
        except DeliveryError as exc:
            return self._failed(record, entry, str(exc) or type(exc).__name__)
        if self.outbox.state_of(record.id) is TransferState.CANCELLED:
            return TransferState.CANCELLED
        left = self.outbox.unconfirmed(record.id)
        if left:
            statuses = sorted({f"0x{i.status:04X}" for i in left if i.status is not None})
            detail = next((i.detail for i in left if i.detail), "")
            why = f"{len(left)} of {len(batch.instances)} instances not accepted"
            extra = ", ".join(x for x in (", ".join(statuses), detail) if x)
            return self._failed(record, entry, f"{why} ({extra})" if extra else why)
        problem = entry.destination.verify(batch)
        if problem:
            return self._failed(record, entry, f"verification failed: {problem}")
        self.outbox.finish(record.id, self.clock())
        seconds = time.monotonic() - started
        log.info(
            "transfer %d: %d instances to %s/%s in %.1f s",
            record.id,
            len(batch.instances) - len(already),
            record.project,
            record.destination,
            seconds,
        )
        self._audit("sent", record, instances=len(batch.instances))
        return TransferState.DONE

    def _failed(self, record: TransferRecord, entry: DestinationEntry, error: str) -> TransferState:
        state = self.outbox.fail_attempt(record.id, error, entry.retry, self.clock())
        metrics.transfer_failed(record.project, record.destination, entry.destination.type)
        if state is TransferState.FAILED:
            log.error(
                "transfer %d to %s/%s given up after %d attempts: %s",
                record.id,
                record.project,
                record.destination,
                entry.retry.max_attempts,
                error,
            )
            self._audit("transfer_failed", record, error=error)
            self.hold(
                record.project,
                record.study_uid,
                f"transfer {record.id} to destination '{record.destination}' failed"
                f" {entry.retry.max_attempts} times; last error: {error}",
            )
        else:
            log.warning(
                "transfer %d to %s/%s failed (%s); will retry",
                record.id,
                record.project,
                record.destination,
                error,
            )
        return state

    def _audit(self, event: str, record: TransferRecord, **fields: object) -> None:
        if self.audit is None:
            return
        try:
            self.audit.write(
                event,
                project=record.project,
                destination=record.destination,
                transfer=record.id,
                study=uid_token(record.study_uid),
                subject=record.subject,
                follow_up=record.follow_up,
                **fields,
            )
        except OSError:
            log.exception("could not write the audit log")
