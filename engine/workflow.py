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
        """One pass: route, label and complete; then run what is runnable."""
        now = time.time() if now is None else now
        try:
            if self.locks is None:
                self.tracker.scan(now)
            elif not self.locks.run("tracker", lambda: self.tracker.scan(now)):
                log.debug("tracker: another node runs it; skipped")
        except IndexUnavailable:
            raise  # fiona serve's WaitsForIndex waits for it, quietly
        except Exception:
            log.exception("routing and completeness scan failed; retrying next scan")
        try:
            self.runner.run_pending(now)
        except IndexUnavailable:
            raise
        except Exception:
            log.exception("pipeline scan failed; retrying next scan")
