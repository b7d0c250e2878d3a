"""``fiona quarantine list|show|release|discard``: the quarantine, for operators.

Works on the site's index while ``fiona serve`` runs (SQLite in WAL mode): what a release
queues (a reopened run, a retried transfer, a study to route again) is picked up by the
service's next scan. Study UIDs are shown because operators need them to find the study; the
audit entries carry them only as tokens. Release and discard ask to type the action's name
unless ``--yes`` is given; their audit entry is written before anything happens.

Next to each reason, ``list`` and ``show`` give what a coordinator judges an item by: its origin
(calling AE title, IP and called AE title, or ``ingest``), Modality (0008,0060), Study Date
(0008,0020) and series and instance counts. A study date is shown (coordinators find studies by
it); the patient's name and ID are not. ``show`` of a routing hold gives the ``fiona explain``
command that shows each project's routing criteria against the study.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from engine.config.model import SiteConfig
from engine.manage.release import Item, Releaser, find_items, get_item
from engine.pipeline.store import RunStore, StepState
from engine.store.audit import AuditLog, operator
from engine.store.commands import run_with_index
from engine.store.index import Index
from engine.store.quarantine import meaning, origin_text, study_facts
from engine.store.recovery import WriterMark
from engine.transfer.outbox import Outbox

__all__ = ["confirm", "item_details", "item_facts", "run_quarantine"]


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


#: Holds a ``fiona explain`` of the study explains (why no project, or several, claim it).
_ROUTING_HOLDS = frozenset({"unrouted", "ambiguous"})


def _date(yyyymmdd: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; anything else as it is, empty as '-'."""
    d = yyyymmdd.strip()
    if len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or "-"


def item_facts(index: Index, data_dir: Path, item: Item) -> dict[str, Any]:
    """What a coordinator judges the item by: origins (text, the recorded one first), modality,
    study date (YYYY-MM-DD) and counts; for a held study from the index as it is now, for
    quarantined bytes from the item's sidecar (one instance)."""
    recorded = origin_text(item.origin)
    if item.kind != "study" or not item.study_uid:
        sidecar = _sidecar(data_dir, item) or {}
        return {
            "origins": [recorded],
            "modality": str(sidecar.get("modality") or "-"),
            "study_date": _date(str(sidecar.get("study_date") or "")),
            "series": None,
            "instances": 1,
        }
    facts = study_facts(index, item.study_uid)
    if facts is None:
        return {"origins": [recorded], "modality": "-", "study_date": "-", "series": 0,
                "instances": 0}  # fmt: skip
    found = [f"{origin_text(o)} ({n} instances)" for o, n in facts.origins]
    if recorded != "-":  # the recorded origin first (the index may have more since)
        found.sort(key=lambda text: not text.startswith(recorded + " ("))
    return {
        "origins": found or [recorded],
        "modality": ", ".join(facts.modalities) or "-",
        "study_date": _date(facts.study_date),
        "series": facts.n_series,
        "instances": facts.n_instances,
    }


def _counts(facts: dict[str, Any]) -> str:
    if facts["series"] is None:
        return "1 instance"
    return f"{facts['series']} series, {facts['instances']} instances"


def _summary(facts: dict[str, Any]) -> str:
    """One line: origin, modality, study date, counts."""
    origins = facts["origins"]
    first = origins[0].split(" (", 1)[0]
    more = f" (+{len(origins) - 1} more)" if len(origins) > 1 else ""
    return (
        f"from {first}{more}; {facts['modality']}; study date {facts['study_date']};"
        f" {_counts(facts)}"
    )


def _list(index: Index, data_dir: Path, args: argparse.Namespace) -> int:
    state = None if args.state == "all" else args.state
    items = find_items(index, state=state, reason=args.reason, project=args.project)
    if args.json:
        for item in items:
            out = {**item.as_json(), "facts": item_facts(index, data_dir, item)}
            print(json.dumps(out, sort_keys=True))
        return 0
    if not items:
        print("no quarantine items")
        return 0
    print(f"{'qid':<12} {'held at':<19} {'reason':<23} {'project':<14} {'state':<9} study")
    for i in items:
        study = i.study_uid or i.sop_instance_uid or "-"
        print(
            f"{i.qid[:12]:<12} {_when(i.received_at):<19} {i.reason:<23.23}"
            f" {i.project or '-':<14.14} {i.state:<9} {study}\n"
            f"{'':<12} {_summary(item_facts(index, data_dir, i))}\n{'':<12} {i.detail}"
        )
    print()
    for code in sorted({i.reason for i in items}):
        print(f"{code}: {meaning(code)}")
    return 0


def _sidecar(data_dir: Path, item: Item) -> dict[str, Any] | None:
    try:
        found = json.loads((data_dir / item.sidecar).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def item_details(index: Index, data_dir: Path, item: Item) -> dict[str, Any]:
    """Everything about an item: its row, sidecar, and for a held study its runs (with the step
    that stopped each) and transfers."""
    out = item.as_json()
    out["meaning"] = meaning(item.reason)
    out["sidecar"] = _sidecar(data_dir, item)
    out["facts"] = item_facts(index, data_dir, item)
    if item.kind != "study" or not item.study_uid:
        return out
    runs = RunStore(index)
    out["runs"] = []
    for run in runs.runs_for_study(item.study_uid):
        if item.project and run.project != item.project:
            continue
        steps = runs.steps(run.id)
        stopped = next((s for s in steps if s.state != StepState.DONE), None)
        out["runs"].append(
            {
                **run.summary(),
                "stopped_at": None
                if stopped is None
                else {"idx": stopped.idx, "step": stopped.name, "state": stopped.state.value},
            }
        )
    transfers = Outbox(index, data_dir).find(study_uid=item.study_uid, project=item.project or None)
    out["transfers"] = [
        {"id": t.id, "destination": t.destination, "state": t.state.value, "error": t.last_error}
        for t in transfers
    ]
    return out


def _show(index: Index, data_dir: Path, args: argparse.Namespace) -> int:
    try:
        item = get_item(index, args.qid)
    except KeyError as exc:
        print(f"fiona: {exc.args[0]}", file=sys.stderr)
        return 1
    info = item_details(index, data_dir, item)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    lines = [
        f"quarantine item {item.qid}: {item.state}",
        f"  reason      {item.reason}: {info['meaning']}",
        f"  detail      {item.detail}",
        f"  held at     {_when(item.received_at)}",
        f"  project     {item.project or '-'}",
        f"  study       {item.study_uid or '-'}",
        f"  kind        {item.kind} ({item.path})",
    ]
    facts = info["facts"]
    lines += [f"  {'origin' if n == 0 else '':<11} {o}" for n, o in enumerate(facts["origins"])]
    lines += [
        f"  modality    {facts['modality']}",
        f"  study date  {facts['study_date']}",
        f"  contents    {_counts(facts)}",
    ]
    if item.reason in _ROUTING_HOLDS and item.study_uid:
        lines.append(f"  explain     {explain_command(item.study_uid, args)}")
        lines.append(f"{'':<14}(each project's routing criteria against this study)")
    if item.state != "held":
        lines.append(
            f"  {item.state:<11} {_when(item.resolved_at)} by {item.resolved_by}: {item.resolution}"
        )
    for run in info.get("runs", []):
        stop = run["stopped_at"]
        where = f"; stopped at step {stop['idx']} ({stop['step']})" if stop else ""
        lines.append(
            f"  run {run['id']:<7} {run['project']} follow-up {run['follow_up']}: {run['state']}"
            f" {run['reason']}{where}"
        )
    for t in info.get("transfers", []):
        lines.append(f"  transfer {t['id']:<3} {t['destination']}: {t['state']} {t['error']}")
    lines.append("  sidecar     " + json.dumps(info["sidecar"], indent=2).replace("\n", "\n  "))
    print("\n".join(lines))
    return 0


def explain_command(study_uid: str, args: argparse.Namespace) -> str:
    """The exact ``fiona explain`` command for a study, with the site options this command was
    given (as absolute paths, so it works from any folder)."""
    words = ["fiona", "explain", study_uid]
    for option in ("config", "data", "projects"):
        value = getattr(args, option, None)
        if value is not None:
            words += [f"--{option}", str(Path(value).resolve())]
    return " ".join(shlex.quote(w) for w in words)


def confirm(word: str, count: int, stdin: TextIO | None = None) -> bool:
    """Ask to type ``word`` (stdin: a terminal or a pipe; EOF or anything else is a no)."""
    stdin = stdin or sys.stdin
    print(f"type '{word}' to {word} {count} item(s): ", end="", flush=True, file=sys.stderr)
    answer = stdin.readline()
    return answer.strip() == word


def _change(index: Index, site: SiteConfig, args: argparse.Namespace) -> int:
    try:
        items = [get_item(index, qid) for qid in args.qids]
    except KeyError as exc:
        print(f"fiona: {exc.args[0]}", file=sys.stderr)
        return 1
    if not args.yes and not confirm(args.action, len(items)):
        print(f"fiona: nothing done (type '{args.action}' to confirm, or --yes)", file=sys.stderr)
        return 1
    mark = WriterMark(site.data_dir)  # a release files bytes into the archive again
    try:
        return _apply(Releaser(site, index, AuditLog(site.data_dir), operator()), items, args)
    finally:
        mark.release()


def _apply(releaser: Releaser, items: list[Item], args: argparse.Namespace) -> int:
    """Release or discard each item, printing one line each; 1 when any was not done."""
    past = "released" if args.action == "release" else "discarded"
    status = 0
    for item in items:
        try:
            outcome = releaser.release(item) if args.action == "release" else releaser.discard(item)
        except OSError as exc:  # the audit log could not be written: nothing was done
            print(f"fiona: {item.qid}: not {past}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"{item.qid}: {'' if outcome.done else 'not '}{past}: {outcome.message}")
        status = status if outcome.done else 1
    return status


def run_quarantine(args: argparse.Namespace) -> int:
    def command(site: SiteConfig, index: Index) -> int:
        if args.action == "list":
            return _list(index, site.data_dir, args)
        if args.action == "show":
            return _show(index, site.data_dir, args)
        return _change(index, site, args)

    return run_with_index(args, command, read_only=args.action in ("list", "show"))
