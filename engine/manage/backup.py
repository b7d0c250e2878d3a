"""``fiona backup DEST`` and ``fiona restore SRC``: what a lost machine cannot be rebuilt from.

A backup is a folder holding:

- ``data/index.sqlite``: the index (every study, run, transfer, quarantine record and the
  pseudonym tables), copied with SQLite's online backup API, so it is consistent while
  ``fiona serve`` runs;
- ``data/...``: the data folder's secrets (``secrets/``, ``*.key``) and its audit log
  (``audit/``);
- ``config/site/...`` and ``config/projects/...``: the site config file and the projects
  folder;
- ``files/N/...``: the files the config refers to outside the data folder: the projects'
  ``secret_file`` and ``token_file``, the site's TLS certificate, key and CA;
- ``manifest.json``: fiona's version, the index's schema version, the time (UTC), and each
  file's original path, mode, size and SHA-256. It is written last: a folder without it is
  not a backup.

The archive (the received DICOM files) is not in it: it is large and append-mostly, and is
backed up with file tools (``rsync``, file system snapshots); see the README.

Restore checks every checksum before it writes anything, refuses a non-empty data folder
(unless ``--force``), puts the data folder's files back into it, and puts each config file
back at its original path when nothing is there (an identical file is left alone; a
different one is a conflict that only ``--force`` overwrites).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine import __version__
from engine.config.files import parse_file
from engine.config.loader import project_files
from engine.config.model import SiteConfig
from engine.deid.keys import DATA_DIR_FIELD
from engine.store.commands import load_site_or_exit
from engine.store.fsio import ensure_dir, fsync_dir
from engine.store.index import (
    IndexMissing,
    index_file,
    index_location,
    is_postgresql,
    latest_version,
    read_schema_version,
)

__all__ = ["BackupError", "Entry", "make_backup", "restore_backup", "run_backup", "run_restore"]

MANIFEST = "manifest.json"
#: The layout of a backup folder; restore refuses one it does not know.
FORMAT = 1
#: Data folder entries backed up besides the index: secrets and the audit log.
DATA_FOLDERS = ("secrets", "audit")
#: Keys in project files that name files to back up (relative to the project file).
FILE_KEYS = ("secret_file", "token_file")
#: Roles of the files restored into the data folder (the others go to their original path).
DATA_ROLES = ("index", "data")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why. Exit status 2."""


@dataclass(frozen=True)
class Entry:
    """One file of a backup: ``path`` inside it (POSIX, relative), where it came from."""

    role: str  # index, data (relative to the data folder), site, project, file
    path: str
    original: str  # absolute path (for index and data: relative to the data folder)
    mode: int
    size: int
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path, mode: int) -> None:
    """Copy ``src`` to ``dst`` durably (temp file, fsync, rename) with ``mode``."""
    ensure_dir(dst.parent)
    tmp = dst.parent / f".tmp-restore-{os.getpid()}-{dst.name}"
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)


# --------------------------------------------------------------------------- what is backed up


def _walk_files(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, recursively, in name order (no symlinks followed)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def _referenced_files(raw: object, base: Path) -> Iterator[Path]:
    """Files named by :data:`FILE_KEYS` anywhere in a project document."""
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            if key in FILE_KEYS and isinstance(value, str) and value:
                if value.startswith(DATA_DIR_FIELD):
                    continue  # inside the data folder: backed up with DATA_FOLDERS
                path = Path(value).expanduser()
                yield path if path.is_absolute() else base / path
            else:
                yield from _referenced_files(value, base)
    elif isinstance(raw, list):
        for item in raw:
            yield from _referenced_files(item, base)


def _config_files(site: SiteConfig) -> list[Path]:
    """Files the config refers to: the site's TLS files and the secret and token files of
    every project file (read as YAML here, so disabled and invalid projects count too)."""
    found = [p for p in (site.tls.cert_file, site.tls.key_file, site.tls.ca_file) if p]
    if site.projects_dir.is_dir():
        for file in project_files(site.projects_dir):
            found += _referenced_files(parse_file(file).data, file.parent)
    return found


# --------------------------------------------------------------------------- backup


class _Writer:
    """Copies files into a backup folder and records their entries."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.entries: list[Entry] = []
        self.done: set[Path] = set()

    def add(self, role: str, inside: str, source: Path, original: str) -> None:
        resolved = source.resolve()
        if resolved in self.done:
            return
        self.done.add(resolved)
        target = self.dest / inside
        ensure_dir(target.parent)
        shutil.copyfile(source, target)
        os.chmod(target, 0o600)
        _fsync_file(target)
        self.record(role, inside, original, stat.S_IMODE(source.stat().st_mode))

    def record(self, role: str, inside: str, original: str, mode: int) -> None:
        target = self.dest / inside
        size = target.stat().st_size
        self.entries.append(Entry(role, inside, original, mode, size, _sha256(target)))


def _copy_index(source: Path, target: Path) -> int:
    """Copy the index with SQLite's online backup API; its schema version."""
    ensure_dir(target.parent)
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(str(target))
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        version = int(dst.execute("PRAGMA user_version").fetchone()[0])
    finally:
        dst.close()
        src.close()
    if check != "ok":
        raise BackupError(f"the index {source} fails SQLite's integrity check: {check}")
    os.chmod(target, 0o600)
    _fsync_file(target)
    return version


def make_backup(site: SiteConfig, dest: Path, *, now: float | None = None) -> dict[str, Any]:
    """Back up the index, the data folder's secrets and audit log, the site config, the
    projects folder and the files they name into ``dest`` (new or empty); the manifest."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} is not empty: back up into a new folder")
    if is_postgresql(site.index_url):
        raise BackupError(
            f"the index is the PostgreSQL database {index_location(site.index_url, dest)}:"
            " back it up with PostgreSQL's own tools (pg_dump -Fc, or the server's base"
            " backups); fiona backup copies a SQLite index only"
        )
    index = index_file(site.index_url, site.data_dir / "index.sqlite")
    if not index.is_file():
        raise BackupError(str(IndexMissing(index)))
    referenced = _config_files(site)
    for file in referenced:  # before anything is written: no half backup to clear away
        if not file.is_file():
            raise BackupError(f"{file} (named in the config) cannot be read")
    ensure_dir(dest)
    os.chmod(dest, 0o700)
    writer = _Writer(dest)
    version = _copy_index(index, dest / "data" / "index.sqlite")
    writer.done.add(index.resolve())
    writer.record("index", "data/index.sqlite", "index.sqlite", 0o600)
    data = site.data_dir
    data_files = [f for f in sorted(data.glob("*.key")) if f.is_file()]
    for folder in DATA_FOLDERS:
        data_files += _walk_files(data / folder)
    for file in data_files:
        relative = file.relative_to(data).as_posix()
        writer.add("data", f"data/{relative}", file, relative)
    if site.source is not None:
        writer.add("site", f"config/site/{site.source.name}", site.source, _abs(site.source))
    for file in _walk_files(site.projects_dir):
        relative = file.relative_to(site.projects_dir).as_posix()
        writer.add("project", f"config/projects/{relative}", file, _abs(file))
    for n, file in enumerate(referenced):
        writer.add("file", f"files/{n}/{file.name}", file, _abs(file))
    manifest = {
        "format": FORMAT,
        "fiona_version": __version__,
        "schema_version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "host": socket.gethostname(),
        "data_dir": _abs(data),
        "files": [asdict(e) for e in writer.entries],
    }
    tmp = dest / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    _fsync_file(tmp)
    os.replace(tmp, dest / MANIFEST)
    fsync_dir(dest)
    return manifest


def _abs(path: Path) -> str:
    return str(path.resolve())


# --------------------------------------------------------------------------- restore


def read_manifest(src: Path) -> tuple[dict[str, Any], list[Entry]]:
    """The manifest of the backup in ``src`` and its entries (checked for safe paths)."""
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise BackupError(
                f"{src}: backup format {manifest.get('format')!r}, this fiona reads {FORMAT}"
            )
        entries = [Entry(**e) for e in manifest["files"]]
    except FileNotFoundError:
        raise BackupError(f"{src} is not a fiona backup (no {MANIFEST})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{src}/{MANIFEST} cannot be read: {exc}") from None
    for e in entries:
        inside = PurePosixPath(e.path)
        local = e.role in DATA_ROLES
        unsafe = inside.is_absolute() or ".." in inside.parts
        if local:
            original = PurePosixPath(e.original)
            unsafe = unsafe or original.is_absolute() or ".." in original.parts
        elif not Path(e.original).is_absolute():
            unsafe = True
        if unsafe:
            raise BackupError(f"{src}/{MANIFEST}: unsafe path in entry {e.path!r}")
    return manifest, entries


def verify(src: Path, entries: list[Entry]) -> list[str]:
    """Problems with the backup's files: missing, or size or SHA-256 not as in the manifest."""
    problems = []
    for e in entries:
        file = src / e.path
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != e.size or _sha256(file) != e.sha256:
            problems.append(f"{file}: differs from the manifest (damaged or changed)")
    return problems


def _target(entry: Entry, data_dir: Path) -> Path:
    return data_dir / entry.original if entry.role in DATA_ROLES else Path(entry.original)


def _conflicts(src: Path, entries: list[Entry]) -> list[str]:
    """Config files whose original path holds a different file."""
    out = []
    for e in entries:
        if e.role in DATA_ROLES:
            continue
        target = Path(e.original)
        if target.exists() and (not target.is_file() or _sha256(target) != e.sha256):
            out.append(str(target))
    return out


def restore_backup(
    src: Path, data_dir: Path | None = None, *, force: bool = False
) -> tuple[Path, list[str], int]:
    """Restore the backup in ``src``: (data folder, files written, the index's schema
    version). Raises :class:`BackupError` before writing anything when the backup is
    damaged, the data folder is not empty or a config file differs (unless ``force``)."""
    manifest, entries = read_manifest(src)
    problems = verify(src, entries)
    if problems:
        raise BackupError("the backup fails its checksums:\n  " + "\n  ".join(problems))
    data = data_dir if data_dir is not None else Path(manifest["data_dir"])
    if not force and data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise BackupError(f"the data folder {data} is not empty: restore into an empty one")
    conflicts = [] if force else _conflicts(src, entries)
    if conflicts:
        raise BackupError("these files differ from the backup's copy: " + ", ".join(conflicts))
    ensure_dir(data)
    for stale in ("index.sqlite-wal", "index.sqlite-shm", "index.sqlite-journal"):
        (data / stale).unlink(missing_ok=True)  # the old index's log must not apply to this one
    written = []
    for e in entries:
        target = _target(e, data)
        if e.role not in DATA_ROLES and target.is_file() and _sha256(target) == e.sha256:
            continue
        _copy(src / e.path, target, e.mode)
        written.append(str(target))
    return data, written, read_schema_version(data / "index.sqlite")


# --------------------------------------------------------------------------- commands


def _reason(exc: Exception) -> str:
    """An I/O failure in one line: the file and the system's words, else the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def run_backup(args: argparse.Namespace) -> int:
    site = load_site_or_exit(args)
    if site is None:
        return 2
    try:
        manifest = make_backup(site, args.dest)
    except BackupError as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"fiona: backup failed, {args.dest} is incomplete: {_reason(exc)}", file=sys.stderr)
        return 1
    files = manifest["files"]
    size = sum(f["size"] for f in files)
    print(
        f"backed up {len(files)} files ({size / 1e6:.1f} MB, index schema version"
        f" {manifest['schema_version']}) into {args.dest}; the archive is not included"
    )
    return 0


def run_restore(args: argparse.Namespace) -> int:
    try:
        data, written, version = restore_backup(args.src, args.data, force=args.force)
    except BackupError as exc:
        print(f"fiona: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"fiona: restore failed part way: {_reason(exc)}", file=sys.stderr)
        return 1
    for path in written:
        print(f"restored {path}")
    print(f"restored {len(written)} files; data folder {data}")
    if version < latest_version():
        print(f"the index is at schema version {version}: run fiona db upgrade")
    elif version > latest_version():
        print(f"the index is at schema version {version}, newer than this fiona knows")
        return 2
    return 0
