"""``<data_dir>/serve.pid``: which process serves a data folder, and whether it still runs.

``fiona serve`` writes its process id once its port listens and removes the file when it stops
cleanly. A killed or crashed service leaves the file behind; :func:`serve_process` then finds
the process gone (or a different program under a reused id) at once, without waiting for the
heartbeat to grow old. On Linux the process must be alive (not a zombie) and its command line
must be ``fiona serve`` (``.../fiona serve`` or ``python -m engine.cli serve``); elsewhere, alive
is all that is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.store.fsio import write_durable

__all__ = ["PID_FILE", "ServeProcess", "remove_pid_file", "serve_process", "write_pid_file"]

#: The pid file's name in the data folder.
PID_FILE = "serve.pid"
_PROC = Path("/proc")


@dataclass(frozen=True)
class ServeProcess:
    """``running``: a ``fiona serve`` process serves the folder; ``why`` says why not."""

    running: bool
    pid: int | None
    why: str = ""


def write_pid_file(data_dir: Path, pid: int | None = None) -> None:
    """Record ``pid`` (default: this process) as the folder's service, durably."""
    value = os.getpid() if pid is None else pid
    write_durable(data_dir / PID_FILE, f"{value}\n".encode(), mode=0o644)


def remove_pid_file(data_dir: Path) -> None:
    """Remove the pid file when it names this process (a clean stop); never raises."""
    path = data_dir / PID_FILE
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


def serve_process(data_dir: Path) -> ServeProcess:
    """Whether a ``fiona serve`` process serves ``data_dir`` right now (see the module doc)."""
    try:
        text = (data_dir / PID_FILE).read_text().strip()
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
