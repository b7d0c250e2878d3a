"""The scheduled scan that turns received instances into complete studies with pipeline runs.

Each scan (an APScheduler job, one at a time) does three things, with all state in the index so
a restart carries on where the last scan stopped:

1. **see new instances**: every instance with an id above its study's ``routed_upto`` is read
   (header only) and labelled with the site's rule sets (series labels accumulate, series-level
   rules included); the first new instance of each series is routed to the projects that claim
   it. Only that first one is read whole: the others are read for the tags the labelling rules
   name (``RuleSet.header_tags``; the whole header when a rule uses JMESPath), which labels them
   as the whole header would at a fraction of the cost; with no rule sets they are not read.
   A study whose routes were complete gets them reopened: a follow-up. A study still arriving
   is read once it pauses for :data:`SETTLE_SECONDS`, so a sender's burst is not slowed by
   labelling it.
2. **complete**: an open route completes after its project's quiet time, or once every expected
   label has arrived and the series quiet time passed, or at the force-complete deadline. A
   pipeline run is created for the series not handed to an earlier run.
3. **judge the unclaimed**: a study no project claimed, quiet for the site's
   ``unrouted_after``, goes to quarantine as ``unrouted`` (or is let be, by site policy).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config.issues import ConfigError
from engine.config.model import AmbiguousPolicy, ProjectConfig, SiteConfig, UnroutedPolicy
from engine.config.rulesets import resolve_rulesets
from engine.dicom.dataset import read_header_dataset
from engine.pipeline.store import RunStore
from engine.route.assign import is_assigned
from engine.route.config import Completeness, completeness_of
from engine.route.router import Router, SeriesFacts
from engine.rules import RuleSet, SeriesLabels, load_rulesets
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index
from engine.store.mpps import MppsStore
from engine.store.quarantine import Quarantine, Reason

log = logging.getLogger(__name__)


#: A study that received an instance in the last SETTLE_SECONDS is read, labelled and routed
#: by a later scan, once it pauses: the receiver and the workflow share one interpreter, and
#: reading a burst while it arrives costs the sender a large part of its rate. Nothing waits
#: on it: completeness needs a quiet study anyway. One arriving for longer than
#: MAX_DEFER_SECONDS (say, a long transfer) is read as it comes, so routes open in time.
SETTLE_SECONDS = 1.0
MAX_DEFER_SECONDS = 30.0


def _still_arriving(now: float, first_at: float, last_at: float) -> bool:
    return now - last_at < SETTLE_SECONDS and now - first_at < MAX_DEFER_SECONDS


@dataclass(frozen=True)
class _NewInstance:
    id: int
    path: str
    series_id: int
    series_uid: str
    first_of_series: bool
    calling_ae: str
    called_ae: str
    peer_ip: str
    n_instances: int


class Tracker:
    """Routes, labels and completes studies; creates pipeline runs (see the module doc)."""

    def __init__(
        self,
        index: Index,
        data_dir: Path,
        site: SiteConfig,
        projects: Sequence[ProjectConfig],
        labeller: RuleSet | None,
        runs: RunStore,
    ) -> None:
        self.index = index
        self.data_dir = data_dir
        self.site = site
        self.router = Router(projects)
        self.completeness: dict[str, Completeness] = {
            p.name: completeness_of(p) for p in projects if p.enabled
        }
        self.labeller = labeller
        self.runs = runs
        self.quarantine = Quarantine(data_dir, index)
        self.audit = AuditLog(data_dir)
        self.mpps = MppsStore(index)
        self._received: dict[str, str] = {}  # study UID -> day of its last 'received' entry
        self._next_mark = 0

    def scan(self, now: float | None = None) -> None:
        """One pass of the three stages."""
        now = time.time() if now is None else now
        for study_id, study_uid, accession, upto in self._studies_with_new_instances(now):
            self._see_new_instances(study_id, study_uid, accession, upto, now)
        self._advance_mark()
        self._complete_routes(now)
        self._judge_unclaimed(now)

    # -- 1. new instances ---------------------------------------------------------------------

    def _studies_with_new_instances(self, now: float) -> list[tuple[int, str, str, int]]:
        """Studies with instances beyond their ``routed_upto``, found from the scan mark.

        The mark (the highest instance id any scan has seen) keeps this query on the newest
        instances, whatever the size of the archive. A study still arriving is left for a
        later scan (see :data:`SETTLE_SECONDS`); the mark stays below its unseen instances.
        """
        with self.index.reading() as db:
            row = db.execute("SELECT value FROM engine_state WHERE key='tracker_mark'").fetchone()
            mark = int(row[0]) if row else 0
            top = int(db.execute("SELECT coalesce(max(id), 0) FROM instances").fetchone()[0])
            rows = db.execute(
                "SELECT st.id, st.study_uid, st.accession_number, st.routed_upto,"
                " st.first_received_at, st.last_received_at, new.first_id FROM studies st"
                " JOIN (SELECT se.study_ref AS study_ref, min(i.id) AS first_id FROM instances i"
                " JOIN series se ON se.id = i.series_ref WHERE i.id > ? AND i.id <= ?"
                " GROUP BY se.study_ref) new ON new.study_ref = st.id"
                " WHERE st.routed_upto < ?",
                (mark, top, top),
            ).fetchall()
            # Studies whose routing was reset (fiona quarantine release of an unrouted or
            # ambiguous study) lie below the mark: found through the unjudged-studies index.
            rows += db.execute(
                "SELECT st.id, st.study_uid, st.accession_number, st.routed_upto,"
                " st.first_received_at, st.last_received_at, NULL FROM studies st"
                " WHERE st.judged_at IS NULL AND st.routed_upto = 0"
            ).fetchall()
        self._next_mark = top
        ready: dict[int, tuple[int, str, str, int]] = {}
        for study_id, uid, accession, upto, first_at, last_at, first_new in rows:
            if _still_arriving(now, first_at, last_at):
                if first_new is not None:
                    self._next_mark = min(self._next_mark, int(first_new) - 1)
                continue
            ready[int(study_id)] = (int(study_id), str(uid), str(accession), int(upto))
        return list(ready.values())

    def _advance_mark(self) -> None:
        with self.index.transaction() as db:
            db.execute(
                "INSERT INTO engine_state(key, value) VALUES ('tracker_mark', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(self._next_mark),),
            )

    def _new_instances(self, study_id: int, upto: int) -> list[_NewInstance]:
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT i.id, i.path, se.id, se.series_uid,"
                " NOT EXISTS (SELECT 1 FROM instances j WHERE j.series_ref = se.id AND j.id <= ?),"
                " i.calling_ae, i.called_ae, i.peer_ip, se.n_instances"
                " FROM instances i JOIN series se ON se.id = i.series_ref"
                " WHERE se.study_ref = ? AND i.id > ? ORDER BY i.id",
                (upto, study_id, upto),
            ).fetchall()
        found: list[_NewInstance] = []
        routed: set[int] = set()
        for r in rows:
            first = bool(r[4]) and int(r[2]) not in routed
            routed.add(int(r[2]))
            found.append(_NewInstance(int(r[0]), str(r[1]), int(r[2]), str(r[3]), first, *r[5:]))
        return found

    def _see_new_instances(
        self, study_id: int, study_uid: str, accession: str, upto: int, now: float
    ) -> None:
        new = self._new_instances(study_id, upto)
        if not new:
            return
        self._audit_received(study_uid, new, first=upto == 0, now=now)
        with self.index.reading() as db:
            assigned = is_assigned(db, study_uid)  # given to a project: criteria not applied
        labels: dict[int, SeriesLabels] = {}
        claims: dict[str, tuple[str, str, list[str]]] = {}
        for inst in new:
            route = inst.first_of_series and not assigned
            if not route and self.labeller is None:
                continue  # nothing reads this instance's header
            # Routing reads the whole header; labelling only the tags its rules name.
            tags = None if route or self.labeller is None else self.labeller.header_tags
            try:
                dataset = read_header_dataset(self.data_dir / inst.path, tags)
            except Exception as exc:  # archived files were checked on receipt; be safe anyway
                log.error("cannot read archived instance %d: %s", inst.id, type(exc).__name__)
                continue
            facts = SeriesFacts(
                study_uid,
                accession,
                dataset,
                inst.calling_ae,
                inst.called_ae,
                inst.peer_ip,
                inst.n_instances,
            )
            if self.labeller is not None:
                acc = labels.get(inst.series_id) or self._label_state(inst.series_id)
                acc.add(self.labeller.classify(facts.rule_input()))
                labels[inst.series_id] = acc
            if route:
                for match in self.router.match(facts):
                    subject, event, reasons = claims.get(match.project, (match.subject, "", []))
                    claims[match.project] = (
                        subject or match.subject,
                        event or match.event,
                        sorted(set(reasons) | set(match.reasons)),
                    )
        self._save(study_uid, study_id, max(i.id for i in new), labels, claims, now)

    def _audit_received(
        self, study_uid: str, new: Sequence[_NewInstance], *, first: bool, now: float
    ) -> None:
        """One ``received`` entry when a study is first seen, then at most one a day (a study
        arriving over minutes is seen by many scans; the C-STORE path writes none)."""
        day = time.strftime("%Y%m%d", time.gmtime(now))
        if not first and self._received.get(study_uid) == day:
            return
        if len(self._received) > 10000:
            self._received.clear()  # a bound on memory; at worst one more entry a day
        self._received[study_uid] = day
        self.audit.try_write(
            "received",
            study=uid_token(study_uid),
            instances=len(new),
            series=len({i.series_id for i in new}),
            first=first,
        )

    def _label_state(self, series_id: int) -> SeriesLabels:
        assert self.labeller is not None
        with self.index.reading() as db:
            row = db.execute("SELECT label_state FROM series WHERE id=?", (series_id,)).fetchone()
        if row and row[0]:
            try:
                return SeriesLabels.from_json(json.loads(row[0]))
            except ValueError:
                log.warning("series %d: stored label state unreadable; labelling afresh", series_id)
        return self.labeller.series_labels()

    def _save(
        self,
        study_uid: str,
        study_id: int,
        upto: int,
        labels: Mapping[int, SeriesLabels],
        claims: Mapping[str, tuple[str, str, list[str]]],
        now: float,
    ) -> None:
        with self.index.transaction() as db:
            known = {
                str(r[0])
                for r in db.execute(
                    "SELECT project FROM study_routes WHERE study_uid=?", (study_uid,)
                )
            }
            for series_id, acc in labels.items():
                db.execute(
                    "UPDATE series SET labels=?, label_state=?, summary_written_at=NULL WHERE id=?",
                    (json.dumps(sorted(acc.labels)), json.dumps(acc.to_json()), series_id),
                )
            for project, (subject, event, reasons) in claims.items():
                db.execute(
                    "INSERT INTO study_routes(study_uid, project, subject, event, reasons,"
                    " opened_at) VALUES (?,?,?,?,?,?) ON CONFLICT(study_uid, project) DO NOTHING",
                    (study_uid, project, subject, event, json.dumps(reasons), now),
                )
            # New instances reopen a completed route: the next run is a follow-up.
            db.execute(
                "UPDATE study_routes SET state='open', opened_at=? WHERE study_uid=?"
                " AND state='complete' AND done_upto < ?",
                (now, study_uid, upto),
            )
            # A claimed study is judged; an unclaimed one (again) awaits judgement.
            db.execute(
                "UPDATE studies SET routed_upto=?, judged_at=CASE WHEN EXISTS"
                " (SELECT 1 FROM study_routes WHERE study_uid=?) THEN ? ELSE NULL END WHERE id=?",
                (upto, study_uid, now, study_id),
            )
        for project in claims:
            log.info("study routed to project %s", project)
        new_routes = sorted(set(claims) - known)
        if new_routes:
            self.audit.try_write("routed", study=uid_token(study_uid), projects=new_routes)

    # -- 2. completeness ----------------------------------------------------------------------

    def _complete_routes(self, now: float) -> None:
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT r.study_uid, r.project, r.subject, r.event, r.opened_at, r.runs,"
                " r.done_upto, st.first_received_at, st.last_received_at, st.id,"
                " (SELECT count(*) FROM study_routes o WHERE o.study_uid = r.study_uid),"
                " (SELECT max(o.assigned) FROM study_routes o WHERE o.study_uid = r.study_uid),"
                " st.routed_upto"
                " FROM study_routes r JOIN studies st ON st.study_uid = r.study_uid"
                " WHERE r.state = 'open' AND st.routed_upto > r.done_upto"
            ).fetchall()
        held: set[str] = set()
        for row in rows:
            study_uid, project, subject, event, opened_at, _, done_upto = row[:7]
            if study_uid in held:
                continue
            first_at, last_at, study_id, n_routes, assigned, seen_upto = row[7:]
            rule = self.completeness.get(project)
            if rule is None:
                continue  # the project was removed or disabled; its route waits
            mpps = self._mpps_complete(rule, study_uid, seen_upto, now)
            if mpps is None:
                why = self._why_complete(
                    rule, study_id, done_upto, first_at, last_at, opened_at, now
                )
            elif mpps:
                why = "MPPS completed, every instance it references arrived"
            else:  # a completed step's instances are missing: only the force deadline decides
                why = self._forced(rule, first_at, opened_at, now)
            if why is None:
                continue
            ambiguous = n_routes > 1 and not assigned  # an operator's choice is not ambiguous
            if ambiguous and self.site.routing.ambiguous is AmbiguousPolicy.QUARANTINE:
                self._hold_ambiguous(study_uid, study_id, now)
                held.add(study_uid)
                continue
            run_id, follow_up = self._start_run(
                study_uid, project, subject, event, done_upto, study_id, now, why
            )
            log.info(
                "study complete for project %s (%s); run %d created (follow-up %d)",
                project,
                why,
                run_id,
                follow_up,
            )

    def _why_complete(
        self,
        rule: Completeness,
        study_id: int,
        done_upto: int,
        first_at: float,
        last_at: float,
        opened_at: float,
        now: float,
    ) -> str | None:
        quiet = now - last_at
        if quiet >= rule.study_quiet:
            return "quiet"
        early = rule.expected_labels and quiet >= rule.series_quiet
        if early and rule.expected_labels <= self._study_labels(study_id):
            return "expected labels arrived"
        return self._forced(rule, first_at, opened_at, now)

    @staticmethod
    def _forced(rule: Completeness, first_at: float, opened_at: float, now: float) -> str | None:
        if rule.force_complete and now - min(first_at, opened_at) >= rule.force_complete:
            return "forced"
        return None

    def _mpps_complete(
        self, rule: Completeness, study_uid: str, seen_upto: int, now: float
    ) -> bool | None:
        """What the study's MPPS steps say: True when a step COMPLETED within the last
        ``mpps_wait`` seconds and every instance of every such step has been seen (ids up to
        ``seen_upto``); False while one of them waits for instances; None when no such step
        speaks (the quiet-time rule decides)."""
        if rule.mpps_wait <= 0:
            return None
        missing = self.mpps.missing_of_completed(study_uid, seen_upto, now - rule.mpps_wait)
        if not missing:
            return None
        return not any(missing)

    def _study_labels(self, study_id: int) -> frozenset[str]:
        with self.index.reading() as db:
            rows = db.execute("SELECT labels FROM series WHERE study_ref=?", (study_id,)).fetchall()
        return frozenset(label for (text,) in rows for label in json.loads(text or "[]"))

    def _start_run(
        self,
        study_uid: str,
        project: str,
        subject: str,
        event: str,
        done_upto: int,
        study_id: int,
        now: float,
        why: str = "",
    ) -> tuple[int, int]:
        """Create the pipeline run of the completed route: its id, as the index and the
        runner's log lines name it, and its follow-up number. ``why`` (the rule that completed it)
        goes into the audit entry."""
        with self.index.reading() as db:
            series = [
                str(r[0])
                for r in db.execute(
                    "SELECT se.series_uid FROM series se WHERE se.study_ref=? AND EXISTS"
                    " (SELECT 1 FROM instances i WHERE i.series_ref = se.id AND i.id > ?)"
                    " ORDER BY se.series_number, se.series_uid",
                    (study_id, done_upto),
                )
            ]
            upto = int(
                db.execute(
                    "SELECT max(i.id) FROM instances i JOIN series se ON se.id = i.series_ref"
                    " WHERE se.study_ref=?",
                    (study_id,),
                ).fetchone()[0]
            )
        # The run and the route's mark in one transaction: both or neither.
        with self.index.transaction() as db:
            run_id, follow_up = self.runs.add_next_run(
                db, study_uid, project, subject, event, series
            )
            db.execute(
                "UPDATE study_routes SET state='complete', completed_at=?, runs=?,"
                " done_upto=? WHERE study_uid=? AND project=?",
                (now, follow_up + 1, upto, study_uid, project),
            )
        self.audit.try_write(
            "completed",
            study=uid_token(study_uid),
            project=project,
            follow_up=follow_up,
            series=len(series),
            **({"why": why} if why else {}),
        )
        return run_id, follow_up

    def _hold_ambiguous(self, study_uid: str, study_id: int, now: float) -> None:
        with self.index.reading() as db:
            upto = int(
                db.execute("SELECT routed_upto FROM studies WHERE id=?", (study_id,)).fetchone()[0]
            )
            names = [
                str(r[0])
                for r in db.execute(
                    "SELECT project FROM study_routes WHERE study_uid=? ORDER BY project",
                    (study_uid,),
                )
            ]
        self.audit.try_write(
            "routed", study=uid_token(study_uid), projects=names, outcome="ambiguous"
        )
        self.quarantine.hold_study(
            study_uid, Reason.AMBIGUOUS, f"claimed by {len(names)} projects: {', '.join(names)}"
        )
        with self.index.transaction() as db:
            db.execute(
                "UPDATE study_routes SET state='complete', completed_at=?, done_upto=?"
                " WHERE study_uid=?",
                (now, upto, study_uid),
            )

    # -- 3. unclaimed studies -----------------------------------------------------------------

    def _judge_unclaimed(self, now: float) -> None:
        policy = self.site.routing
        with self.index.reading() as db:
            rows = db.execute(
                "SELECT st.id, st.study_uid FROM studies st WHERE st.judged_at IS NULL"
                " AND st.routed_upto > 0 AND st.last_received_at <= ?"
                " AND NOT EXISTS (SELECT 1 FROM series se JOIN instances i"
                " ON i.series_ref = se.id WHERE se.study_ref = st.id AND i.id > st.routed_upto)",
                (now - policy.unrouted_after,),
            ).fetchall()
        for study_id, study_uid in rows:
            self.audit.try_write(
                "routed", study=uid_token(study_uid), projects=[], outcome="unrouted"
            )
            if policy.unrouted is UnroutedPolicy.QUARANTINE:
                self.quarantine.hold_study(
                    study_uid, Reason.UNROUTED, "no project's routing claims this study"
                )
            else:
                log.info("study left in the archive: no project claims it (policy 'ignore')")
            with self.index.transaction() as db:
                db.execute("UPDATE studies SET judged_at=? WHERE id=?", (now, study_id))


def labeller_for(paths: Sequence[Path]) -> RuleSet | None:
    """The site's labelling rule set, or None when there are no rule sets at all."""
    if not paths:
        return None
    return load_rulesets(paths)


def site_labeller(site: SiteConfig) -> RuleSet | None:
    """The rule sets that label every series on arrival (``routing.classify_rulesets``)."""
    base = site.source.parent if site.source is not None else Path.cwd()
    try:
        return labeller_for(resolve_rulesets(site.routing.classify_rulesets, base))
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("series labelling disabled: %s", issue)
        return None
