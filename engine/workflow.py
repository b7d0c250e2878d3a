"""The engine behind the receiver: routing, labels, completeness and pipelines, wired once.

:class:`Workflow` is what the scheduler calls every ``scan_interval`` seconds: the tracker turns
new instances into complete studies and pipeline runs, then the runner works through the runs.
Both keep all state in the index, so a restart resumes. In a cluster the tracker runs on one node
at a time (the lock ``tracker``, :class:`~engine.store.leases.ClusterLocks`); every node's runner
claims runs with leases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from engine.config.model import ProjectConfig, SiteConfig
from engine.pipeline.runner import PipelineRunner
from engine.pipeline.store import RunRecord, RunStore
from engine.pipeline.validate import build_pipeline
from engine.route.tracker import Tracker, site_labeller
from engine.rules import RuleSet
from engine.store.audit import AuditLog
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.leases import ClusterLocks
from engine.store.quarantine import Quarantine
from engine.store.quarantine_policy import Holder, policies_of

__all__ = ["Workflow", "site_labeller"]

log = logging.getLogger(__name__)


class Workflow:
    """Tracker plus pipeline runner over one index and data dir."""

    def __init__(
        self,
        index: Index,
        site: SiteConfig,
        projects: Sequence[ProjectConfig],
        *,
        labeller: RuleSet | None = None,
        locks: ClusterLocks | None = None,
    ) -> None:
        self.index = index
        self.locks = locks
        self.data_dir = site.data_dir
        self.scan_interval = site.scan_interval
        self._tracked_at = float("-inf")
        self.quarantine = Quarantine(site.data_dir, index)
        self.runs = RunStore(index)
        enabled = [p for p in projects if p.enabled]
        audit = AuditLog(site.data_dir)
        self.holder = Holder(self.quarantine, policies_of(enabled), audit)
        self.tracker = Tracker(
            index,
            site.data_dir,
            site,
            enabled,
            labeller if labeller is not None else site_labeller(site),
            self.runs,
        )
        pipelines = {
            p.name: build_pipeline(list(p.raw.get("pipeline", [])), p.source)  # type: ignore[call-overload]
            for p in enabled
        }
        self.runner = PipelineRunner(
            self.runs, index, site.data_dir, pipelines, self._hold, audit=audit
        )

    def _hold(self, run: RunRecord, reason: str, detail: str) -> bool:
        """Hold the study, or drop it when the project's quarantine policy says so (False)."""
        return self.holder.hold(run.study_uid, reason, detail, run.project)

    def scan(self, now: float | None = None) -> None:
        """One pass: route, label and complete; then run what is runnable.

        On the clock (``now`` not given, as ``fiona serve`` calls it), the tracker also runs
        between two runs once ``scan_interval`` has passed since it last ran: while this node
        works through a long queue of runs, studies still complete on time and their runs
        are there for the other nodes to take. Before, completeness waited for the whole
        queue, and other nodes waited with it."""
        live = now is None
        now = time.time() if now is None else now
        self._track(now)
        try:
            self.runner.run_pending(now, between=self._track_if_due if live else None)
        except IndexUnavailable:
            raise
        except Exception:
            log.exception("pipeline scan failed; retrying next scan")

    def _track(self, now: float) -> None:
        """The tracker's pass (on the node holding its lock, in a cluster)."""
        self._tracked_at = time.monotonic()
        try:
            if self.locks is None:
                self.tracker.scan(now)
            elif not self.locks.run("tracker", lambda: self.tracker.scan(now)):
                log.debug("tracker: another node runs it; skipped")
        except IndexUnavailable:
            raise  # fiona serve's WaitsForIndex waits for it, quietly
        except Exception:
            log.exception("routing and completeness scan failed; retrying next scan")

    def _track_if_due(self) -> None:
        if time.monotonic() - self._tracked_at >= self.scan_interval:
            self._track(time.time())
