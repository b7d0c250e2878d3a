"""``fiona serve``: load config, open the store, start the SCP and the scheduled jobs."""

from __future__ import annotations

import argparse
import logging
import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config.loader import project_files
from engine.config.model import LogFile, ProjectConfig, SiteConfig
from engine.config.validate import open_to_any_sender, status_http_deprecated, web_in_clear
from engine.daemon import (
    BusyJobChatter,
    Signals,
    WaitsForIndex,
    prepare_install_secret,
    quiet_heartbeat_associations,
)
from engine.deid.verify import set_date_languages
from engine.manage.heartbeat import HeartbeatJob, mark_stopped
from engine.manage.pidfile import prune_node_dirs, remove_pid_file, write_pid_file
from engine.manage.retention import RetentionJob
from engine.net.scp import start_scp
from engine.pipeline.redcap_jobs import add_redcap_jobs
from engine.projects import load_enabled_projects
from engine.store.archive import Archive
from engine.store.audit import AuditLog
from engine.store.commands import load_site_or_exit
from engine.store.db import IndexUnavailable
from engine.store.index import IndexUnusable, SqliteIndex, open_index
from engine.store.leases import ClusterLocks, OncePerCluster, Renewer
from engine.store.nodes import Node, NodeStore, node_id, set_this_node
from engine.store.quarantine import Quarantine
from engine.store.quarantine_policy import Holder, policies_of
from engine.store.recovery import WriterMark, recover
from engine.store.summary import write_pending_summaries
from engine.transfer.config import destinations_of
from engine.transfer.outbox import Outbox
from engine.transfer.worker import OutboxWorker
from engine.web.server import start_for_site as start_web
from engine.web.status_port import start_status_port
from engine.workflow import Workflow, site_labeller

log = logging.getLogger("fiona")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, log_file: LogFile | None = None) -> None:
    """Log to stderr (the journal under systemd) and, when ``log_file.path`` is set, also to
    that file, rotated at ``log_file.max_mb`` MiB keeping ``log_file.backups`` old files.
    Raises OSError when the file cannot be opened."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and log_file.path is not None:
        from logging.handlers import RotatingFileHandler

        handlers.append(
            RotatingFileHandler(
                log_file.path,
                maxBytes=max(1, int(log_file.max_mb * 1024 * 1024)),
                backupCount=log_file.backups,
                encoding="utf-8",
            )
        )
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=LOG_FORMAT,
        handlers=handlers,
    )
    # pynetdicom logs every PDU, APScheduler every job run and paramiko every SFTP connection
    # (with remote paths at DEBUG); their warnings and errors are what operators need.
    for noisy in ("pynetdicom", "apscheduler", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # psycopg's pool warns at every reconnection attempt while PostgreSQL is away: the index
    # outage is said once by engine.store.outage instead.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("apscheduler.scheduler").addFilter(BusyJobChatter())


@dataclass
class Store:
    """The open storage layer: index plus archive."""

    site: SiteConfig
    index: SqliteIndex
    archive: Archive
    #: This process's mark as a writer of the data folder (removed by a clean close).
    mark: WriterMark | None = None

    def close(self) -> None:
        self.index.close()
        if self.mark is not None:
            self.mark.release()


def _check_writable(folder: Path) -> None:
    """Raise :class:`IndexUnusable` unless a file can be created in ``folder`` (made when
    missing): a read-only data folder is refused at start, not at the first receipt."""
    import os

    probe = folder / f".fiona-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise IndexUnusable(
            f"cannot write the data folder {folder} ({exc.strerror}): give the user fiona runs"
            " as write access to it, or choose another with --data or data_dir"
        ) from None


def open_store(site: SiteConfig) -> Store:
    """Open the index (created or upgraded as needed, with a log line) and the archive in
    the site's data dir; :class:`IndexUnusable` when the folder or the index cannot be used."""
    import sqlite3

    _check_writable(site.data_dir)
    try:
        index = open_index(site.index_url, site.data_dir / "index.sqlite")
    except sqlite3.Error as exc:
        raise IndexUnusable(f"cannot open the index in {site.data_dir}: {exc}") from None
    if index.upgraded_from == 0:
        log.info("index %s created (schema version %d)", index.location, index.schema_version)
    elif index.upgraded_from is not None:
        log.info(
            "index %s upgraded from schema version %d to %d",
            index.location,
            index.upgraded_from,
            index.schema_version,
        )
    archive = Archive(
        site.data_dir,
        index,
        duplicate_policy=site.duplicate_policy,
        min_free_disk_mb=site.limits.min_free_disk_mb,
        max_instance_mb=site.limits.max_instance_mb,
    )
    return Store(site, index, archive, WriterMark(site.data_dir))


def _projects_signature(site: SiteConfig) -> tuple[tuple[str, int], ...]:
    """Names and modification times of the project files (and their folder)."""
    folder = site.projects_dir
    try:
        files = project_files(folder)
        stamps = [(f.name, f.stat().st_mtime_ns) for f in files]
        return ((str(folder), folder.stat().st_mtime_ns), *stamps)
    except OSError:
        return ()


class WorkflowJob:
    """The scheduled scan; rebuilds the workflow when a project file is added or changed.

    Coordinators drop project files into ``projects/`` while the service runs: the next scan
    picks them up (an invalid one is logged and left out, as at start).
    """

    def __init__(
        self,
        store: Store,
        projects: list[ProjectConfig],
        on_reload: Callable[[list[ProjectConfig]], None] | None = None,
        locks: ClusterLocks | None = None,
    ) -> None:
        self.store = store
        self.on_reload = on_reload
        self.locks = locks
        #: Set by SIGHUP (:meth:`request_reload`): the next scan reloads even unchanged files.
        self.reload_requested = False
        self.labeller = site_labeller(store.site)
        self.signature = _projects_signature(store.site)
        self.workflow = Workflow(
            store.index, store.site, projects, labeller=self.labeller, locks=locks
        )

    def request_reload(self) -> None:
        """Reload the project files at the next scan, changed or not (SIGHUP)."""
        self.reload_requested = True

    def __call__(self) -> None:
        signature = _projects_signature(self.store.site)
        if signature != self.signature or self.reload_requested:
            why = "reload requested" if self.reload_requested else "project files changed"
            self.signature, self.reload_requested = signature, False
            log.info("%s; reloading projects", why)
            projects = load_enabled_projects(self.store.site)
            self.workflow = Workflow(
                self.store.index,
                self.store.site,
                projects,
                labeller=self.labeller,
                locks=self.locks,
            )
            if self.on_reload is not None:
                self.on_reload(projects)
        self.workflow.scan()


class OutboxJob:
    """The scheduled outbox tick: starts due transfers on the projects' destinations.

    At start, transfers this node's name left half-sent are claimed again at once (other nodes'
    once their leases run out; confirmed instances are not sent twice).
    """

    def __init__(self, store: Store, projects: list[ProjectConfig]) -> None:

        data_dir = store.site.data_dir
        quarantine = Quarantine(data_dir, store.index)
        # The projects' quarantine policy decides whether a dead letter holds its study.
        self.holder = Holder(quarantine, policies_of(projects), AuditLog(data_dir))

        def hold(project: str, study_uid: str, detail: str) -> None:
            self.holder.hold(study_uid, "transfer_failed", detail, project)

        outbox = Outbox(store.index, data_dir)
        resumed = outbox.take_back_own()
        if resumed:
            log.info("taking back %d transfers this node left unfinished", resumed)
        self.worker = OutboxWorker(
            outbox, destinations_of(projects), hold, AuditLog(data_dir), follow_on=True
        )

    def configure(self, projects: list[ProjectConfig]) -> None:

        self.worker.configure(destinations_of(projects))
        self.holder.policies = policies_of(projects)

    def __call__(self) -> None:
        try:
            self.worker.tick()
        except IndexUnavailable:
            raise  # WaitsForIndex waits for it
        except Exception:
            log.exception("outbox scan failed; retrying next scan")


def _start_jobs(
    store: Store, projects: list[ProjectConfig]
) -> tuple[Any, OutboxJob, Callable[[], None]]:
    """The scheduler with every job, started paused: run_serve resumes it once the SCP
    listens, so no job (the first heartbeat echoes the SCP) runs before the service is up.
    The callable, run by the main thread, applies project reloads to the scheduler."""
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(timezone="UTC")
    data_dir = store.site.data_dir
    outbox = OutboxJob(store, projects)
    locks = ClusterLocks(store.index)

    def once(name: str, job: Any) -> WaitsForIndex:
        return WaitsForIndex(OncePerCluster(name, job, locks))

    reloaded: queue.SimpleQueue[list[ProjectConfig]] = queue.SimpleQueue()

    def reload(changed: list[ProjectConfig]) -> None:
        """Project files changed: new destinations at once; the REDCap jobs they now need are
        set by the main thread (``apply_reloads``), because a job calling the scheduler while
        it shuts down waits for ever (APScheduler 3 holds its job store lock meanwhile)."""
        outbox.configure(changed)
        reloaded.put(changed)

    def apply_reloads() -> None:
        latest = None
        while not reloaded.empty():
            latest = reloaded.get_nowait()
        if latest is not None:
            add_redcap_jobs(scheduler, store.index, store.site.data_dir, latest, once)

    scheduler.add_job(
        WaitsForIndex(WorkflowJob(store, projects, reload, locks)),
        "interval",
        seconds=store.site.scan_interval,
        id="workflow",
        name="route, label and complete studies; run pipelines",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        once("series-summaries", lambda: write_pending_summaries(store.index, data_dir, 2.0)),
        "interval",
        seconds=2,
        id="series-summaries",
        name="write series summaries",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        WaitsForIndex(outbox),
        "interval",
        seconds=1,
        id="outbox",
        name="deliver due transfers",
        max_instances=1,
        coalesce=True,
    )
    if store.site.pacs:
        from engine.retrieve.worker import RetrieveWorker

        # On every node: rows are claimed under leases, and a PACS's limits count the rows
        # under way on every node (the worker's share), so lanes and C-GET filing spread.
        scheduler.add_job(
            WaitsForIndex(
                RetrieveWorker(store.site, store.index, store.archive, scheduler=scheduler)
            ),
            "interval",
            seconds=0.5,  # a queued list starts at once; an idle tick is one index query
            id="retrieve",
            name="retrieve queued list rows from the PACS, within their limits",
            max_instances=1,
            coalesce=True,
        )
    _add_watch_jobs(scheduler, store, once)
    add_redcap_jobs(scheduler, store.index, store.site.data_dir, projects, once)
    scheduler.start(paused=True)
    return scheduler, outbox, apply_reloads


def _add_watch_jobs(
    scheduler: Any, store: Store, once: Callable[[str, Any], WaitsForIndex]
) -> None:
    """The service watching itself: the node's heartbeat (first beat at once, so the status
    file exists from the start) and retention (once per cluster)."""
    from datetime import UTC, datetime

    site = store.site
    scheduler.add_job(
        WaitsForIndex(HeartbeatJob(site, store.index, scheduler)),
        "interval",
        seconds=site.heartbeat.interval,
        next_run_time=datetime.now(UTC),
        id="heartbeat",
        name="echo our own SCP; record disk, queues and last receipt/send",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        once(
            "retention",
            RetentionJob(
                site.data_dir, site.projects_dir, store.index, site.retention.min_free_percent
            ),
        ),
        "interval",
        seconds=site.retention.interval,
        id="retention",
        name="delete finished studies past keep_days or under the disk watermark",
        max_instances=1,
        coalesce=True,
    )


def _node_in_use(row: dict[str, Any], node: Node, site: SiteConfig, now: float) -> bool:
    """Whether the ``nodes`` row of ``node``'s name belongs to another process that runs:
    not stopped, a heartbeat within the last 3 intervals, and another host, or this host
    with another live process id."""
    import os

    if row["stopped_at"] is not None or now - row["last_heartbeat"] > 3 * site.heartbeat.interval:
        return False
    if row["host"] != node.host:
        return True
    if row["pid"] == node.pid:
        return False
    try:
        os.kill(row["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def join_cluster(store: Store) -> Node | None:
    """This process as a node of the index's cluster: its id (``node.name``, else
    ``<host>/<pid>``) made this process's and its row written; what it held under that name
    before is claimable again at once. None (logged) when a running node has the name."""
    import time

    from engine import __version__

    site = store.site
    node = Node(node_id(site.node.name), site.node.lease_seconds)
    nodes = NodeStore(store.index)
    row = nodes.get(node.id)
    if row is not None and _node_in_use(row, node, site, time.time()):
        log.error(
            "node name %s is in use by a running node (host %s, pid %d): give each node its"
            " own node.name",
            node.id,
            row["host"],
            row["pid"],
        )
        return None
    set_this_node(node)
    nodes.register(node, __version__)
    log.info("node %s (lease %g s)", node.id, node.lease_seconds)
    taken = nodes.take_over_dead_here(node)
    if taken:
        log.info("node: %d leases of nodes gone from this host taken over at once", taken)
    return node


def run_serve(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    try:
        setup_logging(site.log_level, site.log_file)
    except OSError as exc:
        print(
            f"fiona: cannot open the log file {site.log_file.path}: {exc.strerror}", file=sys.stderr
        )
        return 2
    quiet_heartbeat_associations(site)
    # The gate's written birth dates, in the site's languages (checked by the loader).
    set_date_languages(site.deidentification.date_languages)
    # Handlers first: a SIGTERM while the jobs start (once the SCP listens, senders may already
    # be sending) must still end in the clean shutdown below, not in Python's default exit.
    signals = Signals()
    signals.install()
    try:
        _check_writable(site.data_dir)  # one message for a read-only folder, before the secret
    except IndexUnusable as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    if not prepare_install_secret(site):
        return 2
    projects = load_enabled_projects(site)
    store = open_store(site)
    node = join_cluster(store)
    if node is None:
        store.close()
        return 2
    # What a crash left (temp files, archived but unindexed files), when a writer crashed.
    recover(store.archive, store.mark, force=args.sweep)
    # Everything is set up before the port opens, so a sender never competes with start-up;
    # the jobs start paused and run once the SCP listens (the first heartbeat echoes it).
    scheduler, outbox, apply_reloads = _start_jobs(store, projects)
    try:
        server, _ = start_scp(site, store.archive)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", site.bind_address, site.port, exc.strerror)
        scheduler.shutdown(wait=False)
        outbox.worker.close()
        NodeStore(store.index).stopped(node)
        store.close()
        return 1
    write_pid_file(site.data_dir, node=node.id)  # `fiona status` checks this process is alive
    prune_node_dirs(site.data_dir, keep=node.id)
    scheduler.resume()
    status_page = start_status_port(site)  # deprecated: the web serves the same
    web = start_web(site, load_enabled_projects)
    open_network = open_to_any_sender(site)
    if open_network is not None:
        log.warning("%s", open_network)
    clear = web_in_clear(site)
    if clear is not None:
        log.warning("%s", clear)
    deprecated = status_http_deprecated(site)
    if deprecated is not None:
        log.warning("%s", deprecated)
    log.info(
        "fiona serving AE %s on %s:%d, data in %s",
        site.ae_title,
        site.bind_address,
        site.port,
        site.data_dir.resolve(),
    )
    signals.serve(scheduler, apply_reloads)
    log.info("shutting down")
    # No new job runs from here on: a heartbeat would record the SCP we are stopping as down;
    # retrieval lanes stop after their current request (the worker listens for the pause).
    scheduler.pause()
    server.shutdown()
    scheduler.shutdown(wait=True)
    if status_page is not None:
        status_page.stop()
    if web is not None:
        web.stop()
    mark_stopped(site.data_dir, node.id)
    remove_pid_file(site.data_dir, node.id)
    outbox.worker.close()
    Renewer.shared().stop()
    try:
        write_pending_summaries(store.index, site.data_dir, 0.0)
        NodeStore(store.index).stopped(node)  # what it still held is free for the other nodes
    except IndexUnavailable:
        log.warning(
            "index unavailable at shutdown: what this node held is free once its leases run out"
        )
    store.close()
    return 0
