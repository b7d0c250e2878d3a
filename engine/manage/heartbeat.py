"""The heartbeat: the service checks itself every ``heartbeat.interval_seconds``.

Each beat C-ECHOes our own Storage SCP (a real association over the socket peers use), measures
the free disk of the data folder, counts the queues (pipeline runs, transfers, held quarantine
items) and finds the last receipt and the last delivery per project. The result goes to three
places: a row in the index's ``heartbeats`` table (the last ``heartbeat.keep`` are kept, each
naming the node that took it; the node's row in ``nodes`` gets its ``last_heartbeat``), the
status file ``<data_dir>/status.json`` (written atomically, with the scheduler's jobs and their
next run times) and, when ``heartbeat.url`` is set, an HTTP POST. Nothing here raises into the
scheduler: a failed echo is a recorded result, a failed POST a log line.

The report carries counts, times and project names only: no UIDs, no header values.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.config.model import SiteConfig
from engine.manage.pidfile import node_dir
from engine.store.activity import project_last_times
from engine.store.db import IndexUnavailable
from engine.store.fsio import write_durable
from engine.store.index import Index
from engine.store.nodes import Node, NodeStore, this_node

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_FILE",
    "HeartbeatJob",
    "away_report",
    "beat",
    "disk_usage",
    "echo_self",
    "iso",
    "mark_stopped",
    "parse_iso",
    "scheduler_jobs",
]

#: The status file's name in the data folder.
STATUS_FILE = "status.json"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: Seconds to wait for the scheduler's job list (see :func:`scheduler_jobs`).
JOBS_TIMEOUT = 5.0


def iso(seconds: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC (``2026-01-31T12:00:00Z``); None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> float | None:
    """The inverse of :func:`iso`: seconds since the epoch, or None."""
    if not text:
        return None
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class EchoResult:
    """One C-ECHO to our own SCP; ``seconds``: how long it took."""

    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class Disk:
    """Space in the data folder's file system: bytes available to the service, and in percent."""

    free_bytes: int
    total_bytes: int
    free_percent: float


def disk_usage(path: Path) -> Disk:
    """Free space of the file system holding ``path`` (blocks available to unprivileged users,
    which is what the receiver's writes get)."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return Disk(free, total, round(100.0 * free / total, 2) if total else 0.0)


def _loopback(bind: str) -> str:
    """Where to reach a server bound to ``bind``: the wildcard addresses mean loopback."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(bind, bind)


def _client_tls(site: SiteConfig) -> ssl.SSLContext | None:
    """TLS for talking to ourselves: we check liveness, not identity, so the certificate is not
    verified; our own certificate (``tls.cert_file``/``key_file``) is offered as the client
    certificate, which an SCP with ``require_client_cert`` accepts when ``tls.ca_file`` holds
    it or the CA that signed it."""
    if not site.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if site.tls.cert_file and site.tls.key_file:
        ctx.load_cert_chain(str(site.tls.cert_file), str(site.tls.key_file))
    return ctx


def echo_self(site: SiteConfig) -> EchoResult:
    """C-ECHO our own SCP (``bind_address``/``port``, called AE ``ae_title``) with pynetdicom.

    Never raises: every failure (refused, rejected, timed out, a failure status) is a result.
    """
    from pynetdicom import AE

    hb = site.heartbeat
    start = time.monotonic()

    def result(ok: bool, detail: str) -> EchoResult:
        return EchoResult(ok, detail, round(time.monotonic() - start, 3))

    try:
        ae = AE(ae_title=hb.calling_ae or site.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = hb.echo_timeout
        ae.connection_timeout = hb.echo_timeout
        ae.add_requested_context(VERIFICATION_SOP_CLASS)
        ctx = _client_tls(site)
        host = _loopback(site.bind_address)
        # The server name must not be empty (ssl refuses ""); it is not checked (see above).
        tls_args = (ctx, host) if ctx is not None else None
        assoc = ae.associate(host, site.port, ae_title=site.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted or unreachable"
            return result(False, f"association {why} (port {site.port})")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
    except Exception as exc:  # a heartbeat reports, it never crashes the job
        return result(False, f"{type(exc).__name__}: {exc}")
    code = getattr(status, "Status", None)
    if code is None:
        return result(False, "no C-ECHO response (timeout or aborted)")
    if int(code) != 0:
        return result(False, f"C-ECHO answered status 0x{int(code):04X}")
    return result(True, "")


def queue_depths(index: Index) -> dict[str, Any]:
    """Pipeline runs pending/running, transfers queued/sending/failed, held quarantine items."""
    with index.reading() as db:
        runs = dict(db.execute("SELECT state, count(*) FROM pipeline_runs GROUP BY state"))
        transfers = dict(db.execute("SELECT state, count(*) FROM transfers GROUP BY state"))
        held = db.execute("SELECT count(*) FROM quarantine WHERE state='held'").fetchone()[0]
    return {
        "pipeline": {s: int(runs.get(s, 0)) for s in ("pending", "running")},
        "transfers": {s: int(transfers.get(s, 0)) for s in ("queued", "sending", "failed")},
        "quarantine_held": int(held),
    }


def project_activity(index: Index) -> dict[str, dict[str, str | None]]:
    """Per project: the last instance received for a study routed to it, and its last finished
    transfer (ISO 8601 UTC, None when there was none)."""
    return {
        project: {"last_receipt": iso(received), "last_send": iso(sent)}
        for project, (received, sent) in project_last_times(index).items()
    }


def beat(
    site: SiteConfig,
    index: Index,
    now: float | None = None,
    echo: EchoResult | None = None,
    node: Node | None = None,
) -> dict[str, Any]:
    """Take one heartbeat of ``node`` (default: this process's) and record it in the index
    (pruned to ``heartbeat.keep`` rows).

    ``echo`` replaces the C-ECHO (tests); the report is returned.
    """
    now = time.time() if now is None else now
    node = this_node() if node is None else node
    result = echo_self(site) if echo is None else echo
    if not result.ok:
        log.error("heartbeat: our own SCP did not answer C-ECHO: %s", result.detail)
    else:
        log.debug("heartbeat: C-ECHO to our own SCP answered in %.3f s", result.seconds)
    disk = disk_usage(site.data_dir)
    report = {
        "at": iso(now),
        "node": node.id,
        "echo": asdict(result),
        "disk": asdict(disk),
        "queues": queue_depths(index),
        "projects": project_activity(index),
    }
    with index.transaction() as db:
        db.execute(
            "INSERT INTO heartbeats(at, echo_ok, echo_detail, free_bytes, total_bytes, report,"
            " node) VALUES (?,?,?,?,?,?,?)",
            (
                now,
                int(result.ok),
                result.detail,
                disk.free_bytes,
                disk.total_bytes,
                json.dumps(report, sort_keys=True),
                node.id,
            ),
        )
        db.execute(
            "DELETE FROM heartbeats WHERE id <= (SELECT max(id) FROM heartbeats) - ?",
            (site.heartbeat.keep,),
        )
    NodeStore(index).beat(node, now)
    return report


def write_status_file(
    data_dir: Path,
    report: dict[str, Any],
    jobs: list[dict[str, Any]],
    *,
    running: bool = True,
    shared: bool = True,
) -> None:
    """``<data_dir>/status.json``: the last heartbeat and the scheduler's jobs, atomically; the
    same in the folder of the report's node (``nodes/<node>/status.json``, see
    :func:`engine.manage.pidfile.node_dir`): the folder's file is the last node's to write
    (not written when ``shared`` is False)."""
    doc = {
        "written_at": iso(time.time()),
        "running": running,
        "pid": os.getpid(),
        "heartbeat": report,
        "jobs": jobs,
    }
    body = json.dumps(doc, indent=2, sort_keys=True).encode()
    node = report.get("node")
    if isinstance(node, str) and node:
        write_durable(node_dir(data_dir, node) / STATUS_FILE, body)
    if shared:
        write_durable(data_dir / STATUS_FILE, body)


def post(url: str, report: dict[str, Any], timeout: float) -> None:
    """POST the heartbeat as JSON; a failure is logged, never raised (monitoring is optional)."""
    body = json.dumps(report, sort_keys=True).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except Exception as exc:
        log.warning("heartbeat: could not POST to the monitoring URL: %s", type(exc).__name__)


def scheduler_jobs(scheduler: Any) -> list[dict[str, Any]]:
    """The APScheduler jobs as ``{"id", "name", "next_run_time"}`` (ISO 8601 UTC; None: paused).

    Empty when the scheduler is shutting down: APScheduler 3's ``shutdown(wait=True)`` holds the
    job store lock while it waits for running jobs, so a job calling ``get_jobs`` then would wait
    for ever. The call is made in a helper thread and given up after ``JOBS_TIMEOUT`` seconds
    (the helper finishes once the shutdown releases the lock).
    """
    found: list[Any] = []
    helper = threading.Thread(target=lambda: found.append(scheduler.get_jobs()), daemon=True)
    helper.start()
    helper.join(JOBS_TIMEOUT)
    if not found:
        return []
    out = []
    for job in found[0]:
        when = getattr(job, "next_run_time", None)
        out.append(
            {
                "id": job.id,
                "name": job.name,
                "next_run_time": iso(when.timestamp()) if when else None,
            }
        )
    return sorted(out, key=lambda j: str(j["id"]))


class HeartbeatJob:
    """The scheduled heartbeat: :func:`beat`, the status file (with ``scheduler``'s jobs) and the
    optional POST."""

    def __init__(self, site: SiteConfig, index: Index, scheduler: Any) -> None:
        self.site = site
        self.index = index
        self.scheduler = scheduler
        self.last: dict[str, Any] = {}

    def __call__(self) -> None:
        try:
            self.last = beat(self.site, self.index)
            write_status_file(self.site.data_dir, self.last, scheduler_jobs(self.scheduler))
        except IndexUnavailable as exc:
            self._index_away(f"{self.index.location}: {exc}")
            raise  # fiona serve's WaitsForIndex waits for it, quietly
        except Exception:
            log.exception("heartbeat failed; trying again next interval")
            return
        if self.site.heartbeat.url:
            post(self.site.heartbeat.url, self.last, self.site.heartbeat.url_timeout)


    def _index_away(self, error: str) -> None:
        """While the index cannot be used: the status file and the monitoring POST still say
        that this node runs, what its C-ECHO and disk say, and that the index is unavailable
        (``index.available`` false), instead of falling silent until it is back."""
        try:
            report = away_report(self.site, error)
            write_status_file(self.site.data_dir, report, scheduler_jobs(self.scheduler))
        except Exception as exc:  # the outage is what matters; it is logged by the wrapper
            log.warning("heartbeat: could not write the status file: %s", type(exc).__name__)
            return
        if self.site.heartbeat.url:
            post(self.site.heartbeat.url, report, self.site.heartbeat.url_timeout)


def away_report(
    site: SiteConfig, error: str, now: float | None = None, echo: EchoResult | None = None
) -> dict[str, Any]:
    """A heartbeat taken while the index is unavailable: the C-ECHO and the disk, no queues
    or projects (they are in the index), and ``index`` saying why (``error`` names the index
    by its redacted location, never a password)."""
    now = time.time() if now is None else now
    result = echo_self(site) if echo is None else echo
    return {
        "at": iso(now),
        "node": this_node().id,
        "echo": asdict(result),
        "disk": asdict(disk_usage(site.data_dir)),
        "index": {"available": False, "error": error},
    }


def _written_by_me(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("pid") == os.getpid())
    except (OSError, ValueError, AttributeError):
        return True


def mark_stopped(data_dir: Path, node: str | None = None) -> None:
    """Rewrite the status file (``node``'s own when given) as written by a stopped service
    (``fiona serve`` at shutdown), so ``fiona status`` says so at once instead of after three
    intervals."""
    path = (data_dir if node is None else node_dir(data_dir, node)) / STATUS_FILE
    try:
        doc = json.loads(path.read_text())
        # The folder's file too, unless another node has written it since (it runs on).
        shared = node is None or _written_by_me(data_dir / STATUS_FILE)
        write_status_file(data_dir, doc.get("heartbeat", {}), [], running=False, shared=shared)
    except (OSError, ValueError) as exc:
        log.warning("could not mark the status file stopped: %s", type(exc).__name__)
