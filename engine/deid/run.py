"""``fiona anonymize IN_DIR OUT_DIR --profile P [--option O ...] --secret-file F``.

De-identifies every DICOM file under ``IN_DIR`` into
``OUT_DIR/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`` (all new UIDs), with a progress bar.
Held files (burned-in text, verification hits, unreadable input) are copied to the quarantine
folder (default ``OUT_DIR/../<OUT_DIR name>-quarantine``) with a JSON reason beside each. A
report, ``OUT_DIR/deid-report.json``, records the profile, options, counts per action, and the
held files with their reasons: never a header value.

Files are written under a temporary name and renamed; the whole output is flushed to disk
(``os.sync``, unless ``--no-sync``) before the command reports success. Held files are not an
error: the exit status
is 0 once every file was exported or held, 2 for a bad profile, option or secret (or ``--ocr``
without the tesseract program). ``--jobs N`` spreads files over N processes. ``--ocr hold|redact``
reads the pixels of the images the default burned-in policy holds (:mod:`engine.deid.ocr`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.deid.export import Exported, Exporter

_EXPORTER: Exporter | None = None
#: The columns of ``--report``: what happened to each value of an attribute.
OUTCOME_COLUMNS = ("kept", "cleaned", "replaced", "removed")
#: Folders this process made already (one mkdir per series, not per file).
_MADE: set[Path] = set()


@dataclass(frozen=True)
class _Job:
    profile: str
    options: tuple[str, ...]
    secret_file: str
    pixel_rules: tuple[str, ...]
    report: bool = False
    date_languages: tuple[str, ...] = ()
    ocr: str = ""  # "", "hold" or "redact": OCR on the images the default policy holds


@dataclass(frozen=True)
class _Done:
    """What one file came to: ``reason`` empty when exported (no values in here)."""

    reason: str
    detail: str
    counts: dict[str, int]
    qid: str = ""
    attributes: dict[str, dict[str, int]] | None = None


def _build(job: _Job) -> Exporter:
    from engine.deid import Deidentifier, load_profile, load_secret
    from engine.deid.burned_in import BurnedInPolicy
    from engine.deid.ocr import tesseract_problem
    from engine.deid.pixels import load_pixel_rules
    from engine.deid.verify import set_date_languages

    set_date_languages(job.date_languages)  # each worker process keeps its own

    profile = load_profile(job.profile, job.options)
    rules = load_pixel_rules([Path(p) for p in job.pixel_rules]) if job.pixel_rules else None
    deid = Deidentifier(profile, load_secret(job.secret_file), per_attribute=job.report)
    policy = BurnedInPolicy.from_mapping({"ocr": {"action": job.ocr}} if job.ocr else {})
    problem = tesseract_problem(policy.ocr.languages) if policy.ocr is not None else None
    if problem is not None:
        raise ValueError(problem)
    return Exporter(deid, policy, pixel_rules=rules)


def _init(job: _Job) -> None:
    global _EXPORTER
    _EXPORTER = _build(job)


def _atomic_write(path: Path, *parts: bytes | memoryview) -> None:
    if path.parent not in _MADE:
        path.parent.mkdir(parents=True, exist_ok=True)
        _MADE.add(path.parent)
    tmp = path.parent / f".tmp-{secrets.token_hex(6)}"
    with open(tmp, "wb") as f:
        for part in parts:  # header and pixel data: the image is not copied to join them
            f.write(part)
    os.replace(tmp, path)


def _one(source: str, out_dir: str, quarantine: str) -> _Done:
    assert _EXPORTER is not None
    data = Path(source).read_bytes()
    if len(data) < 132 or data[128:132] != b"DICM":
        return _Done("skipped", "not a DICOM Part 10 file", {})
    result = _EXPORTER.export(data)
    if isinstance(result, Exported):
        target = Path(
            out_dir, result.study_uid, result.series_uid, f"{result.sop_instance_uid}.dcm"
        )
        _atomic_write(target, result.header, result.pixels)
        return _Done("", "", result.counts, attributes=result.attributes)
    qid = secrets.token_hex(8)
    _atomic_write(Path(quarantine, f"{qid}.dcm"), data)
    reason = {"qid": qid, "reason": result.reason, "detail": result.detail}
    _atomic_write(Path(quarantine, f"{qid}.json"), json.dumps(reason, indent=2).encode())
    return _Done(result.reason, result.detail, {}, qid)


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "DICOMDIR")


def _results(
    args: argparse.Namespace, job: _Job, files: list[Path], quarantine: Path
) -> Iterator[_Done]:
    work = [(str(f), str(args.out_dir), str(quarantine)) for f in files]
    if args.jobs <= 1:
        _init(job)
        for item in work:
            yield _one(*item)
        return
    with ProcessPoolExecutor(args.jobs, initializer=_init, initargs=(job,)) as pool:
        yield from pool.map(_one, *zip(*work, strict=True), chunksize=16)


def run_anonymize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.deid import ProfileError, SecretError

    job = _Job(
        args.profile,
        tuple(args.option or ()),
        str(args.secret_file),
        tuple(args.pixel_rules or ()),
        bool(getattr(args, "report", False)),
        tuple(
            c.strip() for c in (getattr(args, "date_languages", "") or "").split(",") if c.strip()
        ),
        ocr=str(getattr(args, "ocr", None) or ""),
    )
    try:
        _build(job)  # fail fast, in this process, on a bad profile, option or secret
    except (ProfileError, SecretError, ValueError, OSError) as exc:
        print(f"fiona anonymize: {exc}", file=sys.stderr)
        return 2
    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    quarantine = (
        Path(args.quarantine) if args.quarantine else out_dir.parent / f"{out_dir.name}-quarantine"
    )
    files = _files(in_dir)
    start = time.perf_counter()
    counts: Counter[str] = Counter()
    attributes: dict[str, Counter[str]] = {}
    held: list[dict[str, str]] = []
    exported = skipped = 0
    for done in tqdm(
        _results(args, job, files, quarantine),
        total=len(files),
        unit="file",
        disable=args.no_progress,
    ):
        counts.update(done.counts)
        for name, outcomes in (done.attributes or {}).items():
            attributes.setdefault(name, Counter()).update(outcomes)
        if not done.reason:
            exported += 1
        elif done.reason == "skipped":
            skipped += 1
        else:
            # The quarantine id, not the input file name: names of files may carry PHI.
            held.append({"qid": done.qid, "reason": done.reason, "detail": done.detail})
    if not args.no_sync:
        os.sync()  # the output is on disk before we say so
    report: dict[str, Any] = {
        "profile": args.profile,
        "options": sorted(job.options),
        "files": len(files),
        "exported": exported,
        "held": len(held),
        "skipped_not_dicom": skipped,
        "actions": dict(sorted(counts.items())),
        "held_files": held,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if job.report:
        report["attributes"] = {
            name: {o: attributes[name][o] for o in OUTCOME_COLUMNS} for name in sorted(attributes)
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "deid-report.json", (json.dumps(report, indent=2) + "\n").encode())
    if job.report:
        table = attribute_table(report["attributes"])
        _atomic_write(out_dir / "deid-report.txt", table.encode())
        print(table, end="")
    print(f"{exported} exported, {len(held)} held in {quarantine}, {skipped} not DICOM")
    print(f"report: {out_dir / 'deid-report.json'}")
    return 0


def attribute_table(attributes: dict[str, dict[str, int]]) -> str:
    """``--report``'s table: one row per attribute (keyword or tag, never a value), how many
    values were kept, cleaned (free text scrubbed, dates shifted), replaced (dummy, new UID,
    hash, pseudonym) or removed (removed or emptied)."""
    width = max([len("attribute"), *(len(n) for n in attributes)])
    lines = [f"{'attribute':<{width}}" + "".join(f"{c:>10}" for c in OUTCOME_COLUMNS)]
    for name, outcomes in attributes.items():
        lines.append(f"{name:<{width}}" + "".join(f"{outcomes[c]:>10}" for c in OUTCOME_COLUMNS))
    return "\n".join(lines) + "\n"
