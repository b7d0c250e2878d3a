"""Group commit: concurrent writers share one index transaction and one durable flush.

Each receiving association runs on its own thread and, once its instance's file is fsynced,
must have the instance's index row committed before it may answer Success. Committed one by
one, every instance pays a flush of the index (an fsync of SQLite's WAL), and the flushes
queue behind each other. :class:`GroupCommit` lets them share: a thread that submits while
another is committing waits in a bounded queue; when that commit is done, the first waiter
becomes the leader, takes every waiting item (up to ``max_batch``), hands them to the batch
function in one call (one transaction, one commit) and wakes each waiter with its own result.

Leader/follower, no committer thread: a lone submitter commits at once on its own thread (no
timer, no hand-off), and there is no thread to stop at shutdown: every submitter waits for its
own item, and :meth:`GroupCommit.wait_idle` lets the index wait for what is queued before it
closes. The queue
holds at most ``max_pending`` items; a submitter finding it full waits for room (back-pressure
on the associations, memory bounded).

The batch function returns one result per item, in order: a value, or the exception that item
alone raised (it is raised in that item's thread, and only there).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")

class _Waiter(Generic[T, R]):
    """One submitted item and what its thread waits for: its result, or its turn to lead."""

    __slots__ = ("error", "event", "item", "lead", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.event = threading.Event()
        self.lead = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Runs ``batch`` over items submitted by many threads, one batch at a time.

    ``max_pending``: items queued at most (submitters beyond it wait for room);
    ``max_batch``: items per call of ``batch`` at most (1: every item alone, no grouping).
    ``batches`` counts the calls and ``items`` the items, for tests, the log and the
    benchmark (items / batches is the mean batch size).
    """

    def __init__(
        self,
        batch: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_pending: int = 256,
        max_batch: int = 64,
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError("max_pending and max_batch must be at least 1")
        self._batch = batch
        self._max_pending = max_pending
        self.max_batch = max_batch
        self._queue: deque[_Waiter[T, R]] = deque()
        self._room = threading.Condition()
        self._leading = False
        self.batches = 0
        self.items = 0

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch."""
        with self._room:
            return len(self._queue)

    def submit(self, item: T) -> R:
        """Commit ``item`` (with whatever else is waiting) and return its result, or raise
        the exception its own part of the batch raised."""
        waiter: _Waiter[T, R] = _Waiter(item)
        with self._room:
            while len(self._queue) >= self._max_pending:
                self._room.wait()
            self._queue.append(waiter)
            lead = not self._leading
            self._leading = True
        if not lead:
            waiter.event.wait()
        if not waiter.event.is_set() or waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]  # set with the event

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no batch runs and none is queued (at shutdown, before the index
        closes); False when ``timeout`` seconds passed first."""
        with self._room:
            return self._room.wait_for(lambda: not self._leading, timeout)

    def _lead(self) -> None:
        """Take the waiting items, commit them as one batch, release each, pass the lead on."""
        with self._room:
            n = min(len(self._queue), self.max_batch)
            taken = [self._queue.popleft() for _ in range(n)]
            self._room.notify_all()
        try:
            results = self._run(taken)
            for waiter, result in zip(taken, results, strict=True):
                if isinstance(result, BaseException):
                    waiter.error = result
                else:
                    waiter.result = result
                waiter.lead = False
                waiter.event.set()
        finally:
            with self._room:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.event.set()
                else:
                    self._leading = False
                    self._room.notify_all()  # for wait_idle

    def _run(self, taken: list[_Waiter[T, R]]) -> Sequence[R | BaseException]:
        self.batches += 1
        self.items += len(taken)
        try:
            results = self._batch([w.item for w in taken])
        except BaseException as exc:  # the batch function's own failure is every item's
            return [exc] * len(taken)
        if len(results) != len(taken):
            error = RuntimeError("the batch function returned a wrong number of results")
            return [error] * len(taken)
        return results
