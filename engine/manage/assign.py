"""Assign: give a study no project claimed (or another one) a project, a research subject and
an event, as ``fiona ingest --project`` does (FIONA's Assign app).

The study gets an assigned route (:func:`engine.route.assign.assign_study`); when it is held
as ``unrouted`` or ``ambiguous`` the hold is released, so the next scan completes the study for
the project by its completeness rules and runs its pipeline, as for a coupling-list entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.config.model import ProjectConfig, SiteConfig
from engine.manage.release import Releaser, find_items
from engine.route.assign import assign_study
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index
from engine.store.quarantine import Reason
from engine.store.studies import study_rows

__all__ = ["AssignError", "assign"]

_ROUTING_HOLDS = frozenset({Reason.UNROUTED.value, Reason.AMBIGUOUS.value})


class AssignError(ValueError):
    """An assignment that cannot be done; the message says why."""


def assign(
    site: SiteConfig,
    index: Index,
    projects: Sequence[ProjectConfig],
    study_uid: str,
    project: str,
    *,
    subject: str = "",
    event: str = "",
    operator: str,
) -> str:
    """Assign ``study_uid`` (0020,000D) to the enabled ``project``; audited (``assigned``, with
    the study's token, never the subject or event values). What was done, as a sentence."""
    if project not in {p.name for p in projects if p.enabled}:
        raise AssignError(f"no enabled project {project!r}")
    if study_rows(index, study_uid) is None:
        raise AssignError("no such study in the index")
    audit = AuditLog(site.data_dir)
    audit.write(
        "assigned",
        study=uid_token(study_uid),
        project=project,
        operator=operator,
        subject_given=bool(subject),
        event_given=bool(event),
    )
    assign_study(index, study_uid, project, subject=subject.strip(), event=event.strip())
    held = [
        i
        for i in find_items(index, state="held")
        if i.study_uid == study_uid and i.reason in _ROUTING_HOLDS
    ]
    releaser = Releaser(site, index, audit, operator)
    for item in held:
        releaser.release(item)
    if held:
        return f"assigned to {project}; its hold released: the next scan routes it there"
    return f"assigned to {project}: the next scan routes it there"
