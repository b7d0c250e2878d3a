"""The index database's availability as this process sees it, said once each way in the log.

A PostgreSQL index can go away (a restart, a failover, the network): every statement then
raises :class:`~engine.store.db.IndexUnavailable` and nothing of its transaction is committed.
The receiver answers such instances 0xA700 (Out of Resources: the sender may try again), the
scheduled jobs back off (:class:`Backoff`) and the lease renewer waits. Each of them tells
:data:`OUTAGE`, which logs ONE warning line when the index goes away and ONE line when it is
back, however many callers fail meanwhile: no traceback, no header value, only the engine's
reason (a host and port at most).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["OUTAGE", "Backoff", "IndexOutage"]

log = logging.getLogger("fiona")


class IndexOutage:
    """Whether the index is away (since when), with its two log lines."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: Monotonic seconds when the outage began; None while the index answers.
        self.since: float | None = None
        #: When the last outage ended (a failure of a call begun before it is an old one).
        self.back_at = float("-inf")

    @property
    def away(self) -> bool:
        return self.since is not None

    def went_away(self, exc: BaseException, started: float | None = None) -> None:
        """A caller found the index unavailable (logged once per outage). ``started``
        (:meth:`now` when the caller began): a call begun before the index was last back
        failed in the outage that ended, and is ignored."""
        with self._lock:
            if self.since is not None or (started is not None and started < self.back_at):
                return
            self.since = self._clock()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning(
            "index unavailable (%s): waiting for it; instances received meanwhile are answered"
            " 0xA700 (Out of Resources), jobs resume when it is back",
            reason,
        )

    def now(self) -> float:
        """The clock :meth:`is_back` compares ``started`` with (monotonic seconds)."""
        return self._clock()

    def is_back(self, started: float | None = None) -> None:
        """A caller used the index again (logged once, when it was away). ``started``
        (:meth:`now` when the caller began): a call begun before the outage was noticed says
        nothing of the index now, and is ignored. Cheap when the index was not away: one
        attribute read."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None or (started is not None and started < self.since):
                return
            since, self.since = self.since, None
            self.back_at = self._clock()
        log.warning("index available again after %.1f s; resuming", self._clock() - since)


#: This process's view of its index.
OUTAGE = IndexOutage()


class Backoff:
    """When a job may try the index again: at once while it answers; after a failure 1 s,
    then doubling up to ``most`` seconds (monotonic clock)."""

    def __init__(
        self, first: float = 1.0, most: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.first = first
        self.most = most
        self._clock = clock
        self.delay = 0.0
        self._next = 0.0

    def due(self) -> bool:
        """Whether the job should try now."""
        return self._clock() >= self._next

    def failed(self) -> float:
        """The index was unavailable: the seconds until the next try."""
        self.delay = min(self.most, self.delay * 2) if self.delay else self.first
        self._next = self._clock() + self.delay
        return self.delay

    def succeeded(self) -> None:
        self.delay = 0.0
        self._next = 0.0
