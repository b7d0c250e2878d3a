"""``fiona transfers list|show|retry|cancel``: the outbox, for operators.

Works on the index of the site (the service may be running: the outbox is in the database it
polls, so a retry is picked up by its next tick). Retry and cancel leave an audit entry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from engine.config.model import SiteConfig
from engine.store.audit import AuditLog, operator, uid_token
from engine.store.commands import run_with_index
from engine.store.index import Index
from engine.transfer.outbox import Outbox, TransferRecord, TransferState

__all__ = ["change_transfer", "run_transfers", "transfer_json"]


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _row(r: TransferRecord) -> str:
    due = _when(r.next_try_at) if r.state is TransferState.QUEUED else ""
    error = r.last_error if len(r.last_error) <= 60 else r.last_error[:57] + "..."
    return (
        f"{r.id:>6}  {r.project:<16.16} {r.destination:<16.16} {r.state.value:<9}"
        f" {r.n_sent:>5}/{r.n_items:<5} {r.attempts:>4}  {due:<19}  {error}"
    )


def _list(outbox: Outbox, args: argparse.Namespace) -> int:
    records = outbox.find(states=args.state or (), project=args.project, limit=args.limit)
    if args.json:
        for r in records:
            print(json.dumps(transfer_json(r), sort_keys=True))
        return 0
    if not records:
        print("no transfers")
        return 0
    print(
        f"{'id':>6}  {'project':<16} {'destination':<16} {'state':<9} {'sent':>11}"
        f" {'try':>4}  {'next try':<19}  last error"
    )
    for r in records:
        print(_row(r))
    return 0


def transfer_json(r: TransferRecord) -> dict[str, Any]:
    out = asdict(r)
    out["state"] = r.state.value
    return out


def _show(outbox: Outbox, args: argparse.Namespace) -> int:
    record = outbox.get(args.id)
    if record is None:
        print(f"fiona: no transfer {args.id}", file=sys.stderr)
        return 1
    items = outbox.items(record.id)
    if args.json:
        out = transfer_json(record)
        out["items"] = [asdict(i) for i in items]
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    lines = [
        f"transfer {record.id}: {record.state.value}",
        f"  project      {record.project}",
        f"  destination  {record.destination}",
        f"  study        {record.study_uid} (sent as {record.export_uid})",
        f"  subject      {record.subject or '-'}   event {record.event or '-'}",
        f"  follow-up    {record.follow_up}",
        f"  instances    {record.n_sent} sent, {record.n_failed} refused, "
        f"{record.n_items - record.n_sent - record.n_failed} pending, of {record.n_items}",
        f"  attempts     {record.attempts} failed"
        + (f"; next try {_when(record.next_try_at)}" if record.state == "queued" else ""),
        f"  created      {_when(record.created_at)}; finished {_when(record.finished_at)}",
    ]
    if record.last_error:
        lines.append(f"  last error   {record.last_error}")
    refused = [i for i in items if i.state == "failed"]
    for item in refused[:20]:
        status = f"0x{item.status:04X}" if item.status is not None else "-"
        lines.append(f"  refused      {item.sop_instance_uid} status {status} {item.detail}")
    if len(refused) > 20:
        lines.append(f"  ... and {len(refused) - 20} more refused")
    print("\n".join(lines))
    return 0


def change_transfer(
    outbox: Outbox, audit: AuditLog, action: str, transfer_id: int, who: str
) -> TransferRecord:
    """Retry or cancel (``action``) one transfer and audit it (``who`` did it); KeyError for an
    unknown id, ValueError when its state does not allow the action."""
    record = outbox.retry(transfer_id) if action == "retry" else outbox.cancel(transfer_id)
    audit.write(
        f"transfer_{action}",
        operator=who,
        transfer=record.id,
        project=record.project,
        destination=record.destination,
        study=uid_token(record.study_uid),
    )
    return record


def _change(outbox: Outbox, args: argparse.Namespace, audit: AuditLog) -> int:
    ids = list(args.ids)
    if args.action == "retry" and args.failed:
        ids += [r.id for r in outbox.find(states=["failed"], project=args.project, limit=10**6)]
    if not ids:
        print("fiona: name transfer ids (or --failed for retry)", file=sys.stderr)
        return 2
    status = 0
    for transfer_id in ids:
        try:
            record = change_transfer(outbox, audit, args.action, transfer_id, operator())
        except (KeyError, ValueError) as exc:
            print(f"fiona: {exc.args[0]}", file=sys.stderr)
            status = 1
            continue
        print(f"transfer {record.id}: {record.state.value}")
    return status


def run_transfers(args: argparse.Namespace) -> int:
    def command(site: SiteConfig, index: Index) -> int:
        outbox = Outbox(index, site.data_dir)
        if args.action == "list":
            return _list(outbox, args)
        if args.action == "show":
            return _show(outbox, args)
        return _change(outbox, args, AuditLog(site.data_dir))

    return run_with_index(args, command, read_only=args.action in ("list", "show"))
