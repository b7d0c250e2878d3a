"""``<data_dir>/serve.pid``: which process serves a data folder, and whether it still runs.

``fiona serve`` writes its process id once its port listens and removes the file when it stops
cleanly. Several nodes may share one data folder (README, "Several nodes"): each also writes
its own ``<data_dir>/nodes/<node>/serve.pid`` (:func:`node_dir`), while the folder's
``serve.pid`` names the node started last (what single-node tools read). A killed or crashed
service leaves the file behind; :func:`serve_process` then finds
the process gone (or a different program under a reused id) at once, without waiting for the
heartbeat to grow old. On Linux the process must be alive (not a zombie) and its command line
must be ``fiona serve`` (``.../fiona serve`` or ``python -m engine.cli serve``); elsewhere, alive
is all that is checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from engine.store.fsio import write_durable

__all__ = [
    "NODES_DIR",
    "PID_FILE",
    "ServeProcess",
    "node_dir",
    "prune_node_dirs",
    "remove_pid_file",
    "safe_node_name",
    "serve_process",
    "write_pid_file",
]

#: The pid file's name in the data folder (and in each node's folder).
PID_FILE = "serve.pid"
#: The folder of the data folder holding one folder per node.
NODES_DIR = "nodes"
_PROC = Path("/proc")
#: Seconds: a node folder none of whose files changed for this long is a node gone for good
#: (a running node writes its status.json every heartbeat, pausing only while the index is
#: away), removed when another node starts.
STALE_NODE_SECONDS = 7 * 86400
log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


def safe_node_name(node_id: str) -> str:
    """``node_id`` as one safe file name: letters, digits and ``._@-`` kept, anything else
    (``/`` of ``<host>/<pid>``, ``:``) made ``_``, never starting with a dot (no ``..``, no
    hidden file), at most 64 characters; when anything was changed, 8 hex digits of the id's
    SHA-256 follow, so two ids never share a folder."""
    name = _UNSAFE.sub("_", node_id)[:64]
    if name.startswith("."):
        name = "_" + name[1:]
    if name != node_id or not name:
        name = f"{name}-{hashlib.sha256(node_id.encode()).hexdigest()[:8]}"
    return name


def node_dir(data_dir: Path, node_id: str) -> Path:
    """The folder of node ``node_id``'s own files: ``<data_dir>/nodes/<safe name>``."""
    return data_dir / NODES_DIR / safe_node_name(node_id)


def prune_node_dirs(
    data_dir: Path, keep: str, older_than: float = STALE_NODE_SECONDS, now: float | None = None
) -> int:
    """Remove the folders under ``<data_dir>/nodes`` of nodes gone for good: none of their
    files changed for ``older_than`` seconds (an unnamed node, ``<host>/<pid>``, has a new
    folder at every start). The folder of node ``keep`` (this one) stays; so does anything
    that is not a plain folder of plain files. Returns how many were removed; never raises."""
    now = time.time() if now is None else now
    own = safe_node_name(keep)
    removed = 0
    try:
        folders = [p for p in (data_dir / NODES_DIR).iterdir() if p.name != own]
    except OSError:
        return 0
    for folder in folders:
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            files = list(folder.iterdir())
            if any(f.is_symlink() or not f.is_file() for f in files):
                continue
            newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in files)])
            if now - newest < older_than:
                continue
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:
            log.warning("could not remove the stale node folder %s: %s", folder.name, exc.strerror)
    if removed:
        days = older_than / 86400
        log.info(
            "removed %d node folders untouched for %.0f days or more (nodes gone)", removed, days
        )
    return removed


@dataclass(frozen=True)
class ServeProcess:
    """``running``: a ``fiona serve`` process serves the folder; ``why`` says why not."""

    running: bool
    pid: int | None
    why: str = ""


def write_pid_file(data_dir: Path, pid: int | None = None, node: str | None = None) -> None:
    """Record ``pid`` (default: this process) as the folder's service, durably; with ``node``,
    in that node's folder too."""
    value = f"{os.getpid() if pid is None else pid}\n".encode()
    write_durable(data_dir / PID_FILE, value, mode=0o644)
    if node is not None:
        write_durable(node_dir(data_dir, node) / PID_FILE, value, mode=0o644)


def remove_pid_file(data_dir: Path, node: str | None = None) -> None:
    """Remove the pid file (and ``node``'s) when it names this process (a clean stop); never
    raises."""
    paths = [data_dir / PID_FILE]
    if node is not None:
        paths.append(node_dir(data_dir, node) / PID_FILE)
    for path in paths:
        try:
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user (the service account)
        pass
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return True  # no /proc (or hidden): alive is all we know
    # Field 3, after the command name in parentheses (which may itself hold ')').
    return stat.rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])


def _is_fiona_serve(pid: int) -> bool | None:
    """Whether ``pid``'s command line is ``fiona serve`` (None: it cannot be read)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    program = any(Path(a).name == "fiona" or a == "engine.cli" for a in args)
    return program and "serve" in args


def serve_process(data_dir: Path, node: str | None = None) -> ServeProcess:
    """Whether a ``fiona serve`` process serves ``data_dir`` right now (see the module doc); with
    ``node``, whether that node's process does (its own pid file)."""
    folder = data_dir if node is None else node_dir(data_dir, node)
    try:
        text = (folder / PID_FILE).read_text().strip()
    except FileNotFoundError:
        return ServeProcess(False, None, f"no {PID_FILE}: not started, or stopped")
    except OSError as exc:
        return ServeProcess(False, None, f"cannot read {PID_FILE}: {exc.strerror}")
    try:
        pid = int(text)
    except ValueError:
        return ServeProcess(False, None, f"{PID_FILE} holds no process id")
    if not _alive(pid):
        return ServeProcess(False, pid, f"process {pid} is gone (killed or crashed)")
    if _is_fiona_serve(pid) is False:
        return ServeProcess(False, pid, f"process {pid} is not fiona serve (its id was reused)")
    return ServeProcess(True, pid)
