"""Per-project quarantine policy (the ``quarantine`` section of a project file) and cleanup.

* ``hold``: the reason codes that hold a study of this project in the quarantine (default: all).
  A known code left out is *dropped* instead: the run ends ``failed`` (a transfer stays
  ``failed`` in the outbox), the study stays in the archive until retention removes it, and the
  decision is logged and audited as ``dropped``; nothing waits in the quarantine for an operator.
  :data:`~engine.store.quarantine.ALWAYS_HELD` codes (``burned_in``, ``verification_failed``,
  ``deidentification_failed``) and codes this engine does not know (a plug-in step's own) are
  held whatever the list says.
* ``notify``: codes that also notify: a log line at ERROR carrying ``notify`` and an audit entry
  ``notify`` (sending e-mail is left to whatever watches the log).
* ``keep_days``: how long a released or discarded item's files (the quarantined bytes and the
  sidecar JSON) are kept before :func:`purge` deletes them (default 90).

Items with no project (instance-level ones, ``unrouted``, ``ambiguous``) are always held and
follow :data:`DEFAULT` for ``keep_days``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.config.model import ProjectConfig
from engine.store.audit import AuditLog, uid_token
from engine.store.index import Index
from engine.store.quarantine import ALWAYS_HELD, Quarantine, Reason

__all__ = [
    "DEFAULT",
    "Expired",
    "Holder",
    "QuarantinePolicy",
    "expired_items",
    "policies_of",
    "policy_of",
    "purge",
    "sidecar_of",
]

log = logging.getLogger(__name__)

_KNOWN = frozenset(r.value for r in Reason)
_DAY = 86400.0


@dataclass(frozen=True)
class QuarantinePolicy:
    """One project's quarantine policy; ``keep_days`` in days."""

    hold: frozenset[str] = _KNOWN
    notify: frozenset[str] = frozenset()
    keep_days: float = 90.0

    def holds(self, reason: str) -> bool:
        """Whether a study of the project is held for ``reason`` (else it is dropped)."""
        return reason in ALWAYS_HELD or reason not in _KNOWN or reason in self.hold

    def notifies(self, reason: str) -> bool:
        return reason in self.notify


DEFAULT = QuarantinePolicy()


def policy_of(project: ProjectConfig) -> QuarantinePolicy:
    """The policy in ``project.raw['quarantine']`` (schema defaults applied by the loader)."""
    section = project.raw.get("quarantine")
    if not isinstance(section, Mapping):
        return DEFAULT
    hold = section.get("hold")
    return QuarantinePolicy(
        hold=frozenset(str(r) for r in hold) if isinstance(hold, list) else DEFAULT.hold,
        notify=frozenset(str(r) for r in section.get("notify") or ()),
        keep_days=float(section.get("keep_days", DEFAULT.keep_days)),
    )


def policies_of(projects: Iterable[ProjectConfig]) -> dict[str, QuarantinePolicy]:
    """Project name -> policy."""
    return {p.name: policy_of(p) for p in projects}


class Holder:
    """Files project-level holds through the project's policy: hold, drop, notify."""

    def __init__(
        self,
        quarantine: Quarantine,
        policies: Mapping[str, QuarantinePolicy],
        audit: AuditLog | None = None,
    ) -> None:
        self.quarantine = quarantine
        self.policies = dict(policies)
        self.audit = audit or AuditLog(quarantine.data_dir)

    def hold(self, study_uid: str, reason: str, detail: str, project: str) -> bool:
        """Hold the study (True) or drop it by policy (False). ``detail`` quotes no header
        value; log lines name the project and code only."""
        policy = self.policies.get(project, DEFAULT)
        study = uid_token(study_uid)
        if not policy.holds(reason):
            log.warning("project %s: study dropped as %s (not held by policy)", project, reason)
            self.audit.try_write("dropped", project=project, study=study, reason=reason)
            self._notify(policy, project, study, reason, "dropped")
            return False
        record = self.quarantine.hold_study(study_uid, reason, detail, project=project)
        self._notify(policy, project, study, reason, record.qid)
        return True

    def _notify(
        self, policy: QuarantinePolicy, project: str, study: str, reason: str, qid: str
    ) -> None:
        if not policy.notifies(reason):
            return
        log.error("notify: project %s: study %s: %s (quarantine %s)", project, study, reason, qid)
        self.audit.try_write("notify", project=project, study=study, reason=reason, qid=qid)


# -- cleanup ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expired:
    """A released or discarded item past its project's ``keep_days``: files to delete."""

    qid: str
    project: str
    state: str
    resolved_at: float
    files: tuple[Path, ...]  # relative to the data dir: the bytes (if any) and the sidecar


def sidecar_of(qid: str, received_at: float) -> Path:
    """An item's JSON, relative to the data dir (in the folder of the day it was held)."""
    day = time.strftime("%Y%m%d", time.gmtime(received_at))
    return Path("quarantine") / day / f"{qid}.json"


def expired_items(
    index: Index, now: float, policies: Mapping[str, QuarantinePolicy]
) -> list[Expired]:
    """Released and discarded items not yet purged whose ``keep_days`` have passed at ``now``
    (seconds since the epoch); for the retention job."""
    with index.reading() as db:
        rows = db.execute(
            "SELECT qid, project, state, resolved_at, path, received_at FROM quarantine"
            " WHERE state IN ('released', 'discarded') AND purged_at IS NULL"
            " AND resolved_at IS NOT NULL ORDER BY resolved_at"
        ).fetchall()
    out = []
    for qid, project, state, resolved_at, path, received_at in rows:
        keep = policies.get(project, DEFAULT).keep_days * _DAY
        if float(resolved_at) + keep > now:
            continue
        files = [sidecar_of(qid, float(received_at))]
        if str(path).startswith("quarantine/"):
            files.insert(0, Path(path))  # instance bytes; a study's files are the archive's
        out.append(Expired(qid, project, state, float(resolved_at), tuple(files)))
    return out


def purge(index: Index, data_dir: Path, items: Iterable[Expired], now: float | None = None) -> int:
    """Delete the files of expired items (never anything under ``archive/``) and mark them
    purged; the index row stays as the record. Returns the number of items purged."""
    now = time.time() if now is None else now
    audit = AuditLog(data_dir)
    count = 0
    for item in items:
        for rel in item.files:
            if rel.parts[0] != "quarantine":
                raise ValueError(f"refusing to purge {rel}: not under quarantine/")
            (data_dir / rel).unlink(missing_ok=True)
        with index.transaction() as db:
            db.execute("UPDATE quarantine SET purged_at=? WHERE qid=?", (now, item.qid))
        audit.try_write("purged", qid=item.qid, project=item.project, state=item.state)
        count += 1
    return count
