"""Process-level parts of ``fiona serve``: signals, the install secret, quiet heartbeats.

``fiona serve`` (:mod:`engine.service`) runs as a system service (``packaging/systemd/``):
SIGTERM/SIGINT stop it cleanly, SIGHUP reloads the project files at once; at start it creates
the per-install secret the shipped example project de-identifies with; and the receiver's INFO
line for each heartbeat association is logged at DEBUG so the journal shows real peers.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from engine.config.model import SiteConfig
from engine.deid.keys import SecretError, load_secret
from engine.store.db import IndexUnavailable
from engine.store.outage import OUTAGE, Backoff
from engine.store.secrets import ensure_install_secret

log = logging.getLogger("fiona")

#: Seconds the main thread sleeps at most between looks at the signal flags.
WAKE_SECONDS = 0.5

__all__ = [
    "BusyJobChatter",
    "HeartbeatChatter",
    "Signals",
    "WaitsForIndex",
    "prepare_install_secret",
    "quiet_heartbeat_associations",
]


def prepare_install_secret(site: SiteConfig) -> bool:
    """Create the per-install secret (``<data>/secrets/install.key``) when missing and check
    it; False after logging why it cannot be used (the service does not start then)."""
    try:
        path, created = ensure_install_secret(site.data_dir)
        load_secret(path)
    except OSError as exc:
        log.error("cannot create the install secret in %s: %s", site.data_dir, exc.strerror)
        return False
    except SecretError as exc:
        log.error("%s", exc)
        return False
    if created:
        log.info(
            "created the install secret %s: back it up (a lost secret means new "
            "pseudonyms and UIDs for the same patients)",
            path.resolve(),
        )
        if site.index_path.exists():
            log.warning(
                "the install secret was missing although this data folder has an index: if "
                "this install had one before, stop fiona and restore it from the backup, or "
                "studies de-identified with it get new pseudonyms and UIDs from now on"
            )
    else:
        log.info("install secret: %s", path.resolve())
    return True


class HeartbeatChatter(logging.Filter):
    """Logs the receiver's INFO line for the heartbeat's own association (calling AE
    ``calling_ae`` from loopback, every interval) at DEBUG: the journal keeps real peers."""

    LOOPBACK = frozenset(("127.0.0.1", "::1"))

    def __init__(self, calling_ae: str) -> None:
        super().__init__()
        self.calling_ae = calling_ae

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (
            record.levelno == logging.INFO
            and str(record.msg).startswith("association from %s (%s)")
            and isinstance(args, tuple)
            and len(args) >= 2
            and args[0] == self.calling_ae
            and str(args[1]).split(":")[0] in self.LOOPBACK
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def quiet_heartbeat_associations(site: SiteConfig) -> None:
    """Install :class:`HeartbeatChatter` on the receiver's logger for the heartbeat's AE."""
    calling_ae = site.heartbeat.calling_ae or site.ae_title
    logging.getLogger("engine.net.upper").addFilter(HeartbeatChatter(calling_ae))


class WaitsForIndex:
    """A scheduled job that rides out an index outage: when the job raises
    :class:`IndexUnavailable`, the outage is logged once (:data:`OUTAGE`) and the job's next
    ticks are skipped for 1 s, then doubling up to 30 s (:class:`Backoff`); its first tick that
    returns says the index is back. Attributes the service reads of the job (``interval``,
    ``request_reload``) are the wrapped job's."""

    def __init__(self, job: Callable[[], object], backoff: Backoff | None = None) -> None:
        self.job = job
        self.backoff = Backoff() if backoff is None else backoff

    def __getattr__(self, name: str) -> Any:
        return getattr(self.job, name)

    def __call__(self) -> None:
        if not self.backoff.due():
            return
        started = OUTAGE.now()
        try:
            self.job()
        except IndexUnavailable as exc:
            OUTAGE.went_away(exc, started)
            log.debug("index unavailable: next try in %g s", self.backoff.failed())
            return
        self.backoff.succeeded()
        OUTAGE.is_back(started)


class BusyJobChatter(logging.Filter):
    """APScheduler's warning that a tick was skipped because the job still runs, at DEBUG: a
    job waiting for the index (or a long pipeline) would repeat it every tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "maximum number of running instances reached" in str(record.msg):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload the projects), turned into flags the main
    thread acts on: a handler only sets flags, so it never takes a lock a job may hold."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()

    def install(self) -> None:
        def on_stop(*_: object) -> None:
            self.stop.set()
            self.wake.set()

        def on_reload(*_: object) -> None:
            self.reload.set()
            self.wake.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def serve(self, scheduler: Any, tick: Callable[[], None]) -> None:
        """Until a stop signal: on SIGHUP, have the workflow job reload the project files and
        run it at once; ``tick`` runs every ``WAKE_SECONDS`` (work jobs leave to the main
        thread)."""
        from datetime import UTC, datetime

        while not self.stop.is_set():
            # With a timeout: a signal the kernel gives another thread does not interrupt this
            # wait, and Python runs the handler only when the main thread runs again.
            self.wake.wait(WAKE_SECONDS)
            self.wake.clear()
            if self.reload.is_set() and not self.stop.is_set():
                self.reload.clear()
                log.info("SIGHUP: reloading the project files now")
                job = scheduler.get_job("workflow")
                job.func.request_reload()
                job.modify(next_run_time=datetime.now(UTC))
            if not self.stop.is_set():
                try:
                    tick()
                except Exception:
                    log.exception("applying reloaded projects failed; trying again next reload")
