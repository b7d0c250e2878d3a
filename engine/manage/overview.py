"""What the web API shows beyond the commands' own output: the projects with their validation
errors, and everything about one study. Plain dicts, computed from the index, the audit log and
the project files; the HTTP layer only filters them by the user's grants and renders them.

Values a user without the PHI grant must not see are under ``"phi"`` keys
(:mod:`engine.store.studies`); the study's explanation quotes header values, so it is one too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config.model import ProjectConfig, SiteConfig
from engine.manage.attention import loaded_projects
from engine.manage.audit_cli import matching
from engine.manage.status import project_rows
from engine.pipeline.store import RunStore
from engine.route.explain import explain_lines
from engine.store.audit import AuditLog
from engine.store.index import Index
from engine.store.studies import study_rows
from engine.transfer.cli import transfer_json
from engine.transfer.outbox import Outbox

__all__ = ["project_overview", "study_detail"]


def project_overview(
    site: SiteConfig, index: Index, *, counts: bool = True
) -> list[dict[str, Any]]:
    """Every project file's project: enabled or not, the validation errors that disabled it,
    its counts (as ``fiona status`` gives them; without ``counts``, empty); by name."""
    projects, issues = loaded_projects(site.projects_dir)
    rows = project_rows(index) if counts else {}
    errors: dict[str, list[str]] = {}
    for issue in issues:
        errors.setdefault(issue.file.stem, []).append(str(issue))
    out = {
        p.name: {"name": p.name, "enabled": p.enabled, "errors": [], "file": str(p.source)}
        for p in projects
    }
    for name, found in errors.items():
        out.setdefault(name, {"name": name, "enabled": False, "file": ""})["errors"] = found
    for name, row in out.items():
        row["enabled"] = bool(row["enabled"]) and not row["errors"]
        row["counts"] = rows.get(name, {})
    return [out[name] for name in sorted(out)]


def study_detail(
    site: SiteConfig,
    index: Index,
    study_uid: str,
    projects: Sequence[ProjectConfig],
    visible: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """A study: its row, series with labels, routes, pipeline runs with their steps,
    transfers, audit trail and routing explanation (as ``fiona explain`` gives it). Runs,
    transfers and routes of projects outside ``visible`` (None: all) are left out. None when
    the index has no such study."""
    out = study_rows(index, study_uid)
    if out is None:
        return None

    def shown(project: str) -> bool:
        return visible is None or project in visible

    out["routes"] = [r for r in out["routes"] if shown(r["project"])]
    runs = RunStore(index)
    out["runs"] = [
        {
            **run.summary(),
            "steps": [
                {
                    "idx": s.idx,
                    "step": s.name,
                    "state": s.state.value,
                    "reason": s.reason,
                    "detail": s.detail,
                }
                for s in runs.steps(run.id)
            ],
        }
        for run in runs.runs_for_study(study_uid)
        if shown(run.project)
    ]
    out["transfers"] = [
        transfer_json(t)
        for t in Outbox(index, site.data_dir).find(study_uid=study_uid)
        if shown(t.project)
    ]
    out["audit"] = [
        e
        for e in matching(AuditLog(site.data_dir).entries(study_uid), study_uid=study_uid)
        if visible is None or not e.get("project") or shown(str(e["project"]))
    ]
    try:
        lines = explain_lines(site, [study_uid], ("", site.ae_title, ""), projects)
    except ValueError as exc:
        lines = [str(exc)]
    out["phi"]["explanation"] = lines
    return out
