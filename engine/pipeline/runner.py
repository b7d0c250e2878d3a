"""The pipeline interpreter: runs each runnable run's steps, in order, recording every outcome.

For each runnable run (claimed one at a time, with a lease other nodes respect:
:meth:`RunStore.claim_next`) the runner starts at the first step not yet done (a restart resumes
there; a finished step is never repeated) and, after each step, records its outcome durably
(with the steps' shared state) before the next one starts:

* ``Done``: on to the next step; after the last one the run is ``done``;
* ``Quarantined(reason, detail)``: the run stops, ``quarantine_hook(run, reason, detail)`` files
  the study in the quarantine, and the run is ``quarantined`` (or ``failed`` when the hook
  returns False: the project's quarantine policy drops that reason instead of holding it);
* ``Retry(reason, after)``: the run waits ``after`` seconds and then resumes at this step;
* an exception: a retry with exponential backoff (``backoff * 2**attempts``, at most
  ``max_backoff``; ``attempts`` counts the step's unfinished tries) and reason
  ``step_error: <ExceptionType>`` (never the message: it may quote a header value); after
  ``max_attempts`` unfinished tries of the step, the study is quarantined with reason
  ``step_failed``.

Log lines name the run id, project and step only: never a UID, name or header value. The
``classify`` and ``anonymize`` steps' results are audit entries (``classified``, ``anonymized``,
``verified``) with counts and the study as a token.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from engine import metrics
from engine.pipeline.context import DEIDENTIFIED, RunContext
from engine.pipeline.outcome import Done, Outcome, Quarantined, Retry, is_outcome
from engine.pipeline.steps import Step
from engine.pipeline.store import RunRecord, RunState, RunStore
from engine.store.audit import AuditLog, uid_token
from engine.store.db import IndexUnavailable
from engine.store.index import Index
from engine.store.leases import LeaseLost
from engine.store.quarantine import Reason

__all__ = ["MAX_ATTEMPTS", "PipelineRunner", "QuarantineHook"]

log = logging.getLogger(__name__)

#: Tries of a step that raises before its study is quarantined as ``step_failed``.
MAX_ATTEMPTS = 5

#: Files a held study in the quarantine: (run, reason code, detail); False: dropped by policy.
QuarantineHook = Callable[[RunRecord, str, str], bool | None]

#: Audit events for steps that finished (step type -> event).
_AUDITED_STEPS = {"classify": "classified", "anonymize": "anonymized"}


class PipelineRunner:
    """Runs the pipelines of ``pipelines`` (project name -> compiled steps) over ``store``.

    ``data_dir`` is the engine's data folder (archive paths and relative step paths are under
    it). Runs of a project not in ``pipelines`` (disabled or removed) wait untouched.
    """

    def __init__(
        self,
        store: RunStore,
        index: Index,
        data_dir: Path,
        pipelines: Mapping[str, Sequence[Step]],
        quarantine_hook: QuarantineHook,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: float = 60.0,
        max_backoff: float = 3600.0,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.data_dir = data_dir
        self.pipelines = {name: tuple(steps) for name, steps in pipelines.items()}
        self.quarantine_hook = quarantine_hook
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.audit = audit
        self._waiting: set[int] = set()  # runs of unknown projects, logged once

    def run_pending(
        self, now: float | None = None, between: Callable[[], None] | None = None
    ) -> int:
        """Work through every runnable run, claiming one at a time (other nodes claim the
        others); the number of runs worked on. ``between`` is called after each run (the
        workflow's tracker, when due)."""
        now = time.time() if now is None else now
        names = sorted(self.pipelines)
        for other in self.store.waiting(now, names):
            if other.id not in self._waiting:
                self._waiting.add(other.id)
                log.warning(
                    "run %d: project %s has no pipeline here; waiting", other.id, other.project
                )
        count = 0
        after = 0
        while (run := self.store.claim_next(now, names, after)) is not None:
            after = run.id
            count += 1
            try:
                self.run_one(run, self.pipelines[run.project], now)
            except LeaseLost:
                log.warning(
                    "run %d (project %s): another node holds it now; stopped here",
                    run.id,
                    run.project,
                )
            except IndexUnavailable:
                raise  # the run stays runnable; the scan waits for the index
            except Exception as exc:  # the store failed: the run stays runnable
                log.error(
                    "run %d (project %s): could not record progress (%s); retrying next scan",
                    run.id,
                    run.project,
                    type(exc).__name__,
                )
            finally:
                self._release(run)
            if between is not None:
                between()
        return count

    def _release(self, run: RunRecord) -> None:
        try:
            self.store.release(run.id)
        except IndexUnavailable:
            pass  # its lease runs out instead (said once by the scan's wait)
        except Exception as exc:  # its lease runs out instead
            log.error("run %d: could not release it (%s)", run.id, type(exc).__name__)

    def run_one(self, run: RunRecord, steps: Sequence[Step], now: float) -> RunState:
        """Run ``run`` from its first step not done until it finishes, waits or is held."""
        self.store.start(run.id, now)
        ctx = RunContext(
            run_id=run.id,
            project=run.project,
            study_uid=run.study_uid,
            subject=run.subject,
            event=run.event,
            follow_up=run.follow_up,
            series=self.store.series_inputs(run, self.data_dir),
            data_dir=self.data_dir,
            state=json.loads(json.dumps(run.step_state)),
            index=self.index,
        )
        done = self.store.done_steps(run.id)
        attempts = run.attempts
        for idx, step in enumerate(steps):
            if idx in done:
                continue
            outcome, error = self._call(step, ctx, attempts)
            where = (run.id, run.project, idx, step.name)
            if isinstance(outcome, Done):
                self.store.record_step(run.id, idx, step.name, outcome, state=ctx.state, now=now)
                log.info("run %d (project %s) step %d %s: done (%s)", *where, outcome.detail)
                self._audit_step(run, step.name, outcome, ctx)
                attempts = 0
                continue
            if isinstance(outcome, Quarantined):
                self.store.record_step(run.id, idx, step.name, outcome, now=now)
                log.warning(
                    "run %d (project %s) step %d %s: quarantined (%s)", *where, outcome.reason
                )
                return self._hold(run, outcome.reason, outcome.detail, now)
            if error and attempts + 1 >= self.max_attempts:
                failed = Quarantined(Reason.STEP_FAILED.value, self._failed(step, idx, outcome))
                self.store.record_step(run.id, idx, step.name, outcome, error=True, now=now)
                log.error("run %d (project %s) step %d %s: failed %d times", *where, attempts + 1)
                return self._hold(run, failed.reason, failed.detail, now)
            self.store.record_step(run.id, idx, step.name, outcome, error=error, now=now)
            log.warning(
                "run %d (project %s) step %d %s: retry in %g s (%s)",
                *where,
                outcome.after,
                outcome.reason,
            )
            return RunState.PENDING
        self.store.finish(run.id, RunState.DONE, "", f"{len(steps)} steps done", now=now)
        log.info("run %d (project %s): done", run.id, run.project)
        return RunState.DONE

    def _call(self, step: Step, ctx: RunContext, attempts: int) -> tuple[Outcome, bool]:
        """(the step's outcome, whether it raised): an exception or a wrong return value becomes
        a Retry after ``backoff * 2**attempts`` seconds (``attempts``: earlier unfinished tries).
        ``ctx.state`` is restored when the step does not finish."""
        saved = json.dumps(ctx.state)
        started = time.monotonic()
        try:
            outcome = step.run(ctx)
            if not is_outcome(outcome):
                raise TypeError(
                    f"step {step.name} returned {type(outcome).__name__}, not an outcome"
                )
            json.dumps(ctx.state)  # the state must stay JSON
        except IndexUnavailable:
            raise  # not the step's failure: no attempt is counted, the run waits for the index
        except Exception as exc:
            ctx.state.clear()
            ctx.state.update(json.loads(saved))
            delay = min(self.max_backoff, self.backoff * 2**attempts)
            return Retry(f"step_error: {type(exc).__name__}", delay), True
        finally:
            metrics.step_finished(step.name, time.monotonic() - started)
        if not isinstance(outcome, Done):
            ctx.state.clear()
            ctx.state.update(json.loads(saved))
        return outcome, False

    def _audit_step(self, run: RunRecord, name: str, outcome: Done, ctx: RunContext) -> None:
        """An audit entry for a finished classify or anonymize step (never fails the run)."""
        event = _AUDITED_STEPS.get(name)
        if self.audit is None or event is None:
            return
        fields: dict[str, object] = {
            "study": uid_token(run.study_uid),
            "project": run.project,
            "run": run.id,
            "detail": outcome.detail,
        }
        self.audit.try_write(event, **fields)
        if name == "anonymize":
            # Done means every file passed the verification gate (one hit holds the study).
            found = ctx.state.get(DEIDENTIFIED)
            series = found.get("series", {}) if isinstance(found, dict) else {}
            files = sum(len(s.get("files", ())) for s in series.values())
            self.audit.try_write("verified", **fields, series=len(series), files=files)

    def _failed(self, step: Step, idx: int, last: Outcome) -> str:
        reason = last.reason if isinstance(last, Retry) else ""
        return f"step {idx} ({step.name}) failed {self.max_attempts} times; last: {reason}"

    def _hold(self, run: RunRecord, reason: str, detail: str, now: float) -> RunState:
        """File the quarantine, then end the run (a crash in between files it again: a held
        study is never lost, at worst held twice). Nothing is filed for a run another node
        holds now (:class:`LeaseLost`)."""
        self.store.check_held(run.id, now)
        try:
            held = self.quarantine_hook(run, reason, detail)
        except Exception as exc:
            log.error(
                "run %d (project %s): could not quarantine (%s); retrying later",
                run.id,
                run.project,
                type(exc).__name__,
            )
            self.store.postpone(run.id, now + self.backoff, now=now)
            return RunState.PENDING
        final = RunState.FAILED if held is False else RunState.QUARANTINED
        self.store.finish(run.id, final, reason, detail, now=now)
        return final
