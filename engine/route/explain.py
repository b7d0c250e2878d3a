"""``fiona explain FILE|DIR|STUDY_UID``: a dry run of routing, labelling and the pipeline.

Prints, for each study found, its series with their labels, every enabled project's routing
criteria with the values seen and whether they held, and the steps each claiming project would
run; for a study in the index, the routes recorded for it too (an assigned one, from
``fiona ingest --project``, overrides the criteria). Nothing is written. It shows header
values, so it prints to the operator's terminal only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from engine.config.model import ProjectConfig, SiteConfig
from engine.dicom.uids import is_valid_uid
from engine.route.router import Router, SeriesFacts
from engine.route.tracker import site_labeller
from engine.rules import RuleSet
from engine.store.index import open_index
from engine.store.mpps import MppsStore, Step


@dataclass
class _Series:
    uid: str
    first: Dataset
    datasets: list[Dataset] = field(default_factory=list)
    origin: tuple[str, str, str] = ("", "", "")


@dataclass(frozen=True)
class _Route:
    """A route recorded in the index (``study_routes``)."""

    project: str
    subject: str
    event: str
    reasons: tuple[str, ...]
    state: str
    assigned: bool


@dataclass
class _Study:
    uid: str
    accession: str
    series: dict[str, _Series] = field(default_factory=dict)
    routes: list[_Route] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)  # its MPPS procedure steps


def _from_files(paths: Iterable[Path], origin: tuple[str, str, str]) -> dict[str, _Study]:
    studies: dict[str, _Study] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception:
            print(f"skipped {path}: not a readable DICOM file with study and series UIDs")
            continue
        study = studies.setdefault(study_uid, _Study(study_uid, str(ds.get("AccessionNumber", ""))))
        series = study.series.setdefault(series_uid, _Series(series_uid, ds, origin=origin))
        series.datasets.append(ds)
    return studies


def _from_index(site: SiteConfig, study_uid: str) -> dict[str, _Study]:
    index = open_index(site.index_url, site.data_dir / "index.sqlite", read_only=True)
    try:
        with index.reading() as db:
            rows = db.execute(
                "SELECT i.path, i.calling_ae, i.called_ae, i.peer_ip FROM instances i"
                " JOIN series se ON se.id = i.series_ref JOIN studies st ON st.id = se.study_ref"
                " WHERE st.study_uid = ? ORDER BY i.id",
                (study_uid,),
            ).fetchall()
            routes = [
                _Route(str(p), str(s), str(e), tuple(json.loads(r or "[]")), str(st), bool(a))
                for p, s, e, r, st, a in db.execute(
                    "SELECT project, subject, event, reasons, state, assigned FROM study_routes"
                    " WHERE study_uid = ? ORDER BY project",
                    (study_uid,),
                )
            ]
        steps = MppsStore(index).steps_for(study_uid)
    finally:
        index.close()
    studies: dict[str, _Study] = {}
    for path, calling, called, ip in rows:
        found = _from_files([site.data_dir / path], (calling, called, ip))
        for uid, study in found.items():
            mine = studies.setdefault(uid, _Study(uid, study.accession))
            for s_uid, series in study.series.items():
                target = mine.series.setdefault(s_uid, series)
                if target is not series:
                    target.datasets += series.datasets
    if study_uid in studies:
        studies[study_uid].routes = routes
        studies[study_uid].steps = steps
    return studies


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    return [target]


def _labels(labeller: RuleSet | None, series: _Series, facts: SeriesFacts) -> list[str]:
    if labeller is None:
        return []
    acc = labeller.series_labels()
    for ds in series.datasets:
        acc.add(labeller.classify(SeriesFacts(**{**facts.__dict__, "dataset": ds}).rule_input()))
    return sorted(acc.labels)


def _describe_steps(project: ProjectConfig) -> str:
    steps = project.raw.get("pipeline") or []
    if not isinstance(steps, list) or not steps:
        return "(no pipeline steps)"
    parts = []
    for step in steps:
        options = {k: v for k, v in step.items() if k != "step"}
        parts.append(f"{step['step']} {json.dumps(options)}" if options else str(step["step"]))
    return " -> ".join(parts)


def explain_studies(
    studies: dict[str, _Study],
    projects: Sequence[ProjectConfig],
    labeller: RuleSet | None,
    values: bool = True,
) -> list[str]:
    """The explanation, as lines; without ``values``, no header value is quoted (no series
    description, no value a criterion saw: only whether it held)."""
    router = Router(projects)
    by_name = {p.name: p for p in projects}
    out: list[str] = []
    for study in studies.values():
        out.append(f"study {study.uid} ({len(study.series)} series)")
        claimed: dict[str, list[str]] = {}
        for series in study.series.values():
            calling, called, ip = series.origin
            facts = SeriesFacts(
                study.uid, study.accession, series.first, calling, called, ip, len(series.datasets)
            )
            labels = _labels(labeller, series, facts)
            description = str(series.first.get("SeriesDescription", ""))
            shown = f" '{description}'" if values else ""  # Series Description (0008,103E)
            out.append(
                f"  series {series.uid}{shown}: {len(series.datasets)} files,"
                f" labels: {', '.join(labels) or '(none)'}"
            )
            for match in router.match(facts):
                claimed.setdefault(match.project, list(match.reasons))
            for name in sorted(router.routings):
                out.append(f"    project {name}:")
                checks = router.checks(name, facts, explain=values)
                if not checks:
                    out.append("      no routing criteria (only its coupling list can claim)")
                for check in checks:
                    seen = check.seen.replace("\n", "\n        ")
                    out.append(f"      {check.criterion}: {'yes' if check.held else 'no'}")
                    if seen:
                        out.append(f"        {seen}")
        out += _recorded(study.routes)
        out += mpps_lines(study.steps)
        assigned = {r.project: list(r.reasons) for r in study.routes if r.assigned}
        if assigned:
            out.append("  assigned: the projects' routing criteria are not applied to it")
            claimed = assigned
        if not claimed:
            out.append("  no project claims this study: it would be held as 'unrouted'")
        for name, reasons in sorted(claimed.items()):
            out.append(f"  claimed by {name} ({', '.join(reasons)})")
            out.append(f"    steps: {_describe_steps(by_name[name])}")
    return out


def _recorded(routes: Sequence[_Route]) -> list[str]:
    """The routes the index holds for a study, one line each."""
    out = []
    for r in routes:
        research = ", ".join(
            f"{k} {v}" for k, v in (("subject", r.subject), ("event", r.event)) if v
        )
        out.append(
            f"  routed to {r.project} ({', '.join(r.reasons)}){': ' + research if research else ''}"
            f", route {r.state}"
        )
    return out


def mpps_lines(steps: Sequence[Step]) -> list[str]:
    """A study's MPPS procedure steps, one line each (times UTC)."""
    out = []
    for step in steps:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(step.ended_at or step.updated_at))
        out.append(
            f"  MPPS step {step.sop_instance_uid}: {step.status}"
            f" ({step.n_instances} instances referenced), {when} UTC"
        )
    return out


def explain_lines(
    site: SiteConfig,
    targets: Sequence[str],
    origin: tuple[str, str, str],
    projects: Sequence[ProjectConfig],
    values: bool = True,
) -> list[str]:
    """The explanation of every study in ``targets`` (files, folders or study UIDs), as lines
    (without header ``values``: see :func:`explain_studies`); ``origin`` is (calling AE, called
    AE, calling IP) assumed for files. ValueError when a target is none of these or no study is
    found."""
    studies: dict[str, _Study] = {}
    for target in targets:
        path = Path(target)
        if path.exists():
            studies.update(_from_files(_files(path), origin))
        elif is_valid_uid(target):
            studies.update(_from_index(site, target))
        else:
            raise ValueError(f"{target}: neither a file, a folder nor a study UID")
    if not studies:
        raise ValueError("no studies found")
    return explain_studies(studies, projects, site_labeller(site), values)


def explain_targets(
    args: argparse.Namespace,
    site: SiteConfig,
    enabled_projects: Callable[[SiteConfig], list[ProjectConfig]],
) -> int:
    """``fiona explain`` once the site config is loaded (:mod:`engine.manage.explain_cli`):
    prints the explanation of every study in ``args.targets``; the exit status."""
    origin = (args.calling_ae or "", args.called_ae or site.ae_title, args.calling_ip or "")
    try:
        lines = explain_lines(site, args.targets, origin, enabled_projects(site))
    except ValueError as exc:
        print(exc)
        return 1
    for line in lines:
        print(line)
    return 0
