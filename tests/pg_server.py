"""A throw-away PostgreSQL cluster for the tests: Debian's ``postgresql`` package, run from a
temporary folder on a free loopback port, trust authentication on 127.0.0.1 only.

One cluster per pytest session (:func:`cluster`); each test that wants one gets a fresh, empty
database (:meth:`PgCluster.new_database`), dropped afterwards. ``initdb`` refuses to run as
root, so as root the cluster runs as the ``postgres`` account the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

__all__ = ["PgCluster", "pg_bin"]


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (None when the package is missing)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """A running cluster: ``url(db)`` for a database on it, ``stop()`` and ``restart()``."""

    def __init__(self, *, durable: bool = False, listen: tuple[str, ...] = ()) -> None:
        """``durable``: commits are flushed as in production (benchmarks); the tests run
        without fsync. ``listen``: addresses besides 127.0.0.1 to listen on, each trusted
        from its /24 (tests/netns.py: the namespaces' bridge)."""
        bindir = pg_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
        self.bin = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fiona-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'" + ",".join(("127.0.0.1", *listen)) + "'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "300",
            "shared_buffers": "64MB",
        }
        if not durable:  # test data: durability of the cluster itself does not matter
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        nets = [f"{a.rsplit('.', 1)[0]}.0/24" for a in listen]
        (self.data / "pg_hba.conf").write_text(
            "".join(f"host all all {n} trust\n" for n in ("127.0.0.1/32", *nets))
        )
        self.start()
        self._counter = 0

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Restart the server (every connection breaks)."""
        log = str(self.root / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-m", "fast", "-w", "restart")

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(), autocommit=True)

    def new_database(self) -> str:
        """A fresh, empty database's name."""
        self._counter += 1
        name = f"fiona_{os.getpid()}_{self._counter}_{int(time.time() * 1000) % 100000}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
