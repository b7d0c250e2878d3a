"""Scale benchmark: aggregate receive rate of several concurrent senders, into one fiona
process, into two fiona processes sharing the port, and into dcmtk ``storescp --fork``.

Run from the repo root: ``python bench/scale.py [--files N] [--senders S] [--size PX]
[--repeat R]`` (``--quick``: a small smoke run). The corpus is split over S storescu
processes that start together (one association each, Nagle off); a round's time runs from
their start to the last one's end, and files/s is the corpus over that time, the median of R
rounds in which the receivers take turns (this VM's disk has slow spells; turns spread them).

Receivers:

- ``storescp``: ``storescp --fork``, one child process per association, writing each file with
  no fsync and keeping no index: the upper bound, and the issue's reference;
- ``fiona x1``: one ``fiona serve`` (fsync of the file and its folder, index commit before
  every Success; concurrent associations share index commits, see README);
- ``fiona x2``: two ``fiona serve`` on one port (``reuse_port: true``, SO_REUSEPORT), one data
  folder and one index; the kernel spreads the associations over them.

- ``fiona1-pg``, ``fiona2-pg``: the same with the index in PostgreSQL, each round on a fresh,
  empty database of one server: a throw-away cluster the bench starts from Debian's
  ``postgresql`` package (fsync and ``synchronous_commit`` on, as in production; it lives for
  the whole run, so every round pays the same), or ``--pg-url`` (a server where the URL's
  user may create databases).

After each fiona round the index is checked to hold every file once; the log's group-commit
line gives the mean instances per index transaction. Each row also shows how busy the whole
machine was (all cores) and how many cores the fiona processes kept busy; the run ends with the
durable-write floor: plain Python threads doing only fiona's file writes and one SQLite commit
per file, no network and no DICOM, as a ceiling for any durable receiver on this disk.

``--receivers`` picks some of ``storescp,fiona1,fiona2,fiona1-pg,fiona2-pg`` (default:
all; the ``-pg`` ones only when PostgreSQL is installed or ``--pg-url`` is given).
``--baseline DIR`` adds one fiona process of another checkout (``baseline1``, e.g. before
group commit; ``baseline1-pg`` too when PostgreSQL rounds run) to the same rounds.

Targets (issue 18): fiona x2 at least 1.6x fiona x1 on this 2-core machine; PostgreSQL within
20% of SQLite for one process; fiona with 4 senders at least 0.5x storescp --fork.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.dicom.header import InstanceHeader, parse_header  # noqa: E402
from engine.store.db import INDEX_URL_ENV  # noqa: E402
from engine.store.fsio import write_durable  # noqa: E402
from engine.store.index import Origin, SqliteIndex, open_index  # noqa: E402
from tests.peers import FionaServer, dcmtk, free_port, wait_for_port  # noqa: E402
from tests.synth import make_corpus  # noqa: E402

AE = "BENCH"
_BATCHES = re.compile(r"index: (\d+) instances added in (\d+) transactions")


def send_all(files: list[Path], port: int, senders: int, per_association: int = 0) -> float:
    """Seconds from starting ``senders`` senders at once to the last one's end.

    Each sender sends its share of ``files`` (every ``senders``-th) with storescu: in one
    association, or with ``per_association`` in associations of that many files, one after
    the other (as a scanner sends study after study).
    """
    shares = [files[i::senders] for i in range(senders)]
    size = per_association or max(len(s) for s in shares)
    start = time.perf_counter()
    threads = [
        threading.Thread(
            target=_sender, args=(port, [s[k : k + size] for k in range(0, len(s), size)])
        )
        for s in shares
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _sender(port: int, associations: list[list[Path]]) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}
    base = [dcmtk("storescu"), "-aec", "FIONA", "-aet", AE, "127.0.0.1", str(port)]
    for files in associations:
        done = subprocess.run([*base, *map(str, files)], env=env, capture_output=True)
        if done.returncode != 0:
            _FAILURES.append(done.stderr.decode(errors="replace")[-2000:])


_FAILURES: list[str] = []


@contextmanager
def storescp(work: Path) -> Iterator[int]:
    out = work / "storescp-out"
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--fork", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 10, proc)  # type: ignore[arg-type]
        yield port
    finally:
        proc.terminate()
        proc.wait()


class FionaGroup:
    """``n`` fiona serve processes on one port and one data folder (``reuse_port`` when 2+)."""

    def __init__(
        self,
        work: Path,
        n: int,
        index_url: str,
        repo: Path = REPO,
        site_lines: tuple[str, ...] = (),
    ) -> None:
        """``site_lines``: more lines of the processes' site.yaml (bench/e2e.py's scan)."""
        self.data = work / "data"
        self.index_url = index_url
        self.projects = projects = work / "projects"
        projects.mkdir(parents=True)
        site = work / "site.yaml"
        lines = ["reuse_port: true"] if n > 1 else []  # an older checkout has no such key
        lines += site_lines
        if index_url:
            lines.append(f"index_url: {index_url!r}")
        site.write_text("\n".join(lines) + "\n")
        self.port = free_port()
        self.servers = [
            FionaServer(
                self.data,
                projects,
                port=self.port,
                config=site,
                log_path=work / f"fiona-{k}.log",
                repo=repo,
            )
            for k in range(n)
        ]

    def start(self) -> None:
        for server in self.servers:
            server.start()
            deadline = time.monotonic() + 60
            while "fiona serving AE" not in server.log_text():
                if not server.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"fiona did not start: {server.log_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def cpu_seconds(self) -> float:
        """User and system CPU seconds the processes have used so far (Linux /proc)."""
        return sum(_proc_cpu(s.proc.pid) for s in self.servers if s.proc is not None)

    def spread(self) -> list[int]:
        """Associations each process accepted."""
        return [s.log_text().count(f"association from {AE} ") for s in self.servers]

    def batches(self) -> tuple[int, int]:
        """(instances, index transactions) over the processes, from their shutdown lines."""
        found = [_BATCHES.search(s.log_text()) for s in self.servers]
        pairs = [(int(m.group(1)), int(m.group(2))) for m in found if m]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def indexed(self) -> tuple[int, int]:
        """(instance rows, distinct SOP Instance UIDs) in the index (SQLite or PostgreSQL)."""
        query = "SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances"
        if self.index_url.startswith("postgresql"):
            import psycopg

            with psycopg.connect(self.index_url) as conn:
                row = conn.execute(query).fetchone()
        else:
            db = sqlite3.connect(self.data / "index.sqlite")
            try:
                row = db.execute(query).fetchone()
            finally:
                db.close()
        assert row is not None
        return int(row[0]), int(row[1])


def _proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of process ``pid`` (user + system; with ``children``, also of its children
    it has reaped); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(all, idle) CPU time of the whole machine so far, in clock ticks (Linux /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


@contextmanager
def machine_load(out: list[float]) -> Iterator[None]:
    """Append to ``out`` the share of the machine's CPU time (all cores) that was busy while
    the block ran: 1.0 when every core was busy throughout."""
    total, idle = machine_jiffies()
    yield
    total2, idle2 = machine_jiffies()
    out.append(1.0 - (idle2 - idle) / max(total2 - total, 1))


def durable_floor(work: Path, threads: int, files: int, size: int) -> float:
    """Files per second that ``threads`` threads of plain Python achieve when each file is
    only written the way fiona writes an instance (temp file, fsync, rename, fsync of the
    folder) and one row is committed for it (SQLite, WAL, ``synchronous=FULL``): no network,
    no DICOM, no index logic. What this disk allows any durable receiver, for the ratios."""
    folder = work / "floor"
    folder.mkdir(parents=True)
    db = sqlite3.connect(folder / "floor.sqlite", check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE files(name TEXT PRIMARY KEY)")
    lock = threading.Lock()
    data = os.urandom(size)

    def write(tag: int, count: int) -> None:
        for k in range(count):
            name = f"{tag}-{k}"
            write_durable(folder / name, data)
            with lock:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO files VALUES (?)", (name,))
                db.execute("COMMIT")

    share = max(files // threads, 1)
    workers = [threading.Thread(target=write, args=(t, share)) for t in range(threads)]
    elapsed = timed_threads(workers)
    db.close()
    return share * threads / elapsed


def timed_threads(workers: list[threading.Thread]) -> float:
    """Seconds from starting ``workers`` together to the last one's end."""
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


class PgServer:
    """Where the ``-pg`` rounds' databases are made: a throw-away cluster started here
    (tests/pg_server.py, durable), or a server given by URL. One per run; a fresh database
    per round (:meth:`new_database`), dropped after it."""

    def __init__(self, url: str = "") -> None:
        self._cluster = None
        if url:
            self._admin = url
        else:
            from tests.pg_server import PgCluster

            self._cluster = PgCluster(durable=True)
            self._admin = self._cluster.url()
        self._counter = 0

    def cpu_seconds(self) -> float:
        """CPU seconds the cluster started here has used so far: its postmaster, the live
        server processes and the backends that have exited; 0 for a server given by URL."""
        if self._cluster is None:
            return 0.0
        try:
            postmaster = int((self._cluster.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        total = _proc_cpu(postmaster, children=True)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    total += _proc_cpu(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue
        return total

    def url(self, database: str) -> str:
        base, _, _ = self._admin.rpartition("/")
        return f"{base}/{database}"

    def _execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # a name made here, not input

    def new_database(self) -> str:
        self._counter += 1
        name = f"fiona_scale_{os.getpid()}_{self._counter}"
        self._execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()


Round = Callable[[Path], float]


def index_adds(
    headers: list[InstanceHeader], work: Path, threads: int, batch: int, url: str = ""
) -> float:
    """Adds per second into a fresh index (SQLite in ``work``, or the empty PostgreSQL
    database ``url``) from ``threads`` threads at once, through the receiver's add path, with
    at most ``batch`` adds per transaction (1: a commit each)."""
    index = open_index(url, work / f"index-{batch}-{time.monotonic_ns()}.sqlite")
    index.adds.max_batch = batch
    origin = Origin("dimse", AE, "FIONA", "127.0.0.1")

    def add(share: list[InstanceHeader]) -> None:
        for h in share:
            index.add_instance(h, f"archive/{h.sop_instance_uid}.dcm", 1000, origin)

    workers = [threading.Thread(target=add, args=(headers[i::threads],)) for i in range(threads)]
    elapsed = timed_threads(workers)
    index.close()
    return len(headers) / elapsed


def run_rounds(
    receivers: dict[str, Round], work: Path, repeat: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in receivers}
    for i in range(repeat):
        for name, receiver in receivers.items():
            run_dir = work / f"run-{name.replace(' ', '')}-{i}"
            run_dir.mkdir(parents=True)
            times[name].append(receiver(run_dir))
    return times


ALL_RECEIVERS = "storescp,fiona1,fiona2,fiona1-pg,fiona2-pg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=800, help="files in the corpus")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu senders")
    parser.add_argument("--size", type=int, default=64, help="image size (pixels per side)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median)")
    parser.add_argument(
        "--per-association",
        type=int,
        default=0,
        help="files per association (each sender sends its share in associations of this"
        " many, one after the other); default: one association per sender",
    )
    parser.add_argument(
        "--pg-url",
        default="",
        help="a PostgreSQL server for the -pg rounds (a URL whose user may create databases;"
        " each round gets a fresh one); default: a throw-away cluster started here",
    )
    parser.add_argument("--receivers", default=ALL_RECEIVERS)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git archive main` unpacked) measured as baseline1: one"
        " fiona process, in the same rounds",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.files, args.repeat, args.size = 80, 1, 16
    wanted = args.receivers.split(",")
    if args.receivers == ALL_RECEIVERS and not args.pg_url and not _have_postgresql():
        wanted = [w for w in wanted if not w.endswith("-pg")]
        print("PostgreSQL is not installed: the -pg rounds are left out", file=sys.stderr)
    os.environ.pop(INDEX_URL_ENV, None)  # each round names its own index in its site.yaml
    with contextlib.ExitStack() as stack:
        t = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fiona-scale-", dir=os.environ.get("BENCH_TMP"))
        )
        pg = None
        if any(w.endswith("-pg") for w in wanted):
            pg = PgServer(args.pg_url)
            stack.callback(pg.close)
        return _run(args, wanted, Path(t), pg)
    return 0


def _have_postgresql() -> bool:
    from tests.pg_server import pg_bin

    return pg_bin() is not None


def _run(args: argparse.Namespace, wanted: list[str], tmp: Path, pg: PgServer | None) -> int:
    files = make_corpus(tmp / "corpus", args.files, args.size, seed=args.size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    # Per fiona round: mean instances per index commit, associations per process.
    notes: dict[str, list[tuple[float, str]]] = {}
    # Per fiona round: CPU seconds of the fiona processes and of the PostgreSQL server (0 when
    # unknown) while the corpus was sent.
    cpu: dict[str, list[tuple[float, float, float]]] = {}
    # Per round of every receiver: (share of the machine's CPU busy, seconds) while sending.
    busy: dict[str, list[float]] = {}

    def fiona(n: int, name: str, repo: Path = REPO, on_pg: bool = False) -> Round:
        def one_round(work: Path) -> float:
            database = pg.new_database() if on_pg and pg else ""
            try:
                return _fiona_round(work, n, name, repo, pg.url(database) if database else "")
            finally:
                if database and pg:
                    pg.drop_database(database)

        return one_round

    def _fiona_round(work: Path, n: int, name: str, repo: Path, url: str) -> float:
        group = FionaGroup(work, n, url, repo)
        group.start()
        server_cpu = pg.cpu_seconds() if pg and url else 0.0
        try:
            fiona_cpu = group.cpu_seconds()
            with machine_load(busy.setdefault(name, [])):
                seconds = send_all(files, group.port, args.senders, args.per_association)
            fiona_cpu = group.cpu_seconds() - fiona_cpu
        finally:
            group.stop()
        if pg and url:
            time.sleep(0.5)  # the backends of the closed connections exit and are reaped
            server_cpu = pg.cpu_seconds() - server_cpu
        cpu[name] = [*cpu.get(name, []), (fiona_cpu, server_cpu, seconds)]
        rows, distinct = group.indexed()
        if _FAILURES or rows != len(files) or distinct != len(files):
            problems = [
                line
                for s in group.servers
                for line in s.log_text().splitlines()
                if " WARNING " in line or " ERROR " in line
            ]
            raise RuntimeError(
                f"{name}: index {rows} rows, {distinct} UIDs, not {len(files)};"
                f" storescu: {_FAILURES[:1]}; fiona: {problems[:20]}"
            )
        items, batches = group.batches()
        spread = "+".join(map(str, group.spread()))
        notes.setdefault(name, []).append((items / batches if batches else -1.0, spread))
        return seconds

    def with_storescp(work: Path) -> float:
        with storescp(work) as port, machine_load(busy.setdefault("storescp", [])):
            return send_all(files, port, args.senders, args.per_association)

    table: dict[str, Round] = {
        "storescp": with_storescp,
        "fiona1": fiona(1, "fiona1"),
        "fiona2": fiona(2, "fiona2"),
        "fiona1-pg": fiona(1, "fiona1-pg", on_pg=True),
        "fiona2-pg": fiona(2, "fiona2-pg", on_pg=True),
    }
    if args.baseline:
        table["baseline1"] = fiona(1, "baseline1", args.baseline.resolve())
        wanted.append("baseline1")
        if pg is not None:
            table["baseline1-pg"] = fiona(1, "baseline1-pg", args.baseline.resolve(), on_pg=True)
            wanted.append("baseline1-pg")
    receivers = {name: table[name] for name in wanted}
    load_before = os.getloadavg()[0]
    times = run_rounds(receivers, tmp, args.repeat)
    load_after = os.getloadavg()[0]
    if _FAILURES:
        raise RuntimeError(f"storescu failed: {_FAILURES[0]}")
    medians = {name: statistics.median(v) for name, v in times.items()}
    rates = {name: len(files) / s for name, s in medians.items()}
    each = f"{args.per_association} files" if args.per_association else "all its files"
    print(
        f"{len(files)} files of {args.size}x{args.size} ({mb:.1f} MB), {args.senders} senders"
        f" ({each} per association), median of {args.repeat}; load average"
        f" {load_before:.1f} before, {load_after:.1f} after on {os.cpu_count()} cores"
    )
    print(f"{'receiver':>12} {'files/s':>9} {'MB/s':>7}  notes")
    for name, rate in rates.items():
        rounds = notes.get(name, [])
        per = [r[0] for r in rounds if r[0] >= 0]  # an older checkout logs no counts
        note = (
            (f"{statistics.mean(per):.1f} instances/commit; " if per else "")
            + _cpu_note(cpu.get(name, []), len(files))
            + f"associations per process {', '.join(r[1] for r in rounds)}; "
            if rounds
            else ""
        ) + (f"machine busy {100 * statistics.mean(busy[name]):.0f}%" if busy.get(name) else "")
        print(f"{name:>12} {rate:9.0f} {rate * mb / len(files):7.1f}  {note}", flush=True)
    _ratios(rates)
    floor = statistics.median(
        durable_floor(tmp / f"floor-{k}", args.senders, len(files), int(mb * 1e6 / len(files)))
        for k in range(args.repeat)
    )
    print(
        f"durable-write floor, {args.senders} threads of plain Python (each file written and"
        f" fsynced as fiona does, one SQLite row committed; no network, no DICOM):"
        f" {floor:.0f} files/s"
        + (f", {floor / rates['storescp']:.2f}x storescp --fork" if "storescp" in rates else "")
    )
    headers = [parse_header(f.read_bytes()) for f in files]
    _add_path(headers, tmp, args, pg)
    return 0


def _cpu_note(rounds: list[tuple[float, float, float]], files: int) -> str:
    """CPU milliseconds per file of fiona (and of the PostgreSQL server), and the cores the
    fiona processes kept busy, means of rounds."""
    if not rounds:
        return ""
    fiona = statistics.mean(r[0] for r in rounds) / files * 1000
    server = statistics.mean(r[1] for r in rounds) / files * 1000
    cores = statistics.mean(r[0] / r[2] for r in rounds if r[2] > 0)
    pg = f", PostgreSQL {server:.2f} ms" if server else ""
    return f"CPU/file fiona {fiona:.2f} ms{pg}; fiona cores {cores:.2f}; "


def _ratios(rates: dict[str, float]) -> None:
    """The issue's targets as ratios of the receivers measured."""

    def ratio(a: str, b: str, label: str, target: str) -> None:
        if a in rates and b in rates:
            print(f"{label}: {rates[a] / rates[b]:.2f}" + (f" (target {target})" if target else ""))

    for suffix, engine in (("", "SQLite"), ("-pg", "PostgreSQL")):
        ratio(f"fiona2{suffix}", f"fiona1{suffix}", f"fiona x2 / fiona x1 ({engine})", ">= 1.6")
    ratio("fiona1-pg", "fiona1", "PostgreSQL / SQLite, fiona x1", ">= 0.8")
    ratio("fiona2-pg", "fiona2", "PostgreSQL / SQLite, fiona x2", "")
    for name in ("fiona1", "fiona2", "fiona1-pg", "fiona2-pg"):
        ratio(name, "storescp", f"{name} / storescp --fork", ">= 0.5")


def _add_path(
    headers: list[InstanceHeader], tmp: Path, args: argparse.Namespace, pg: PgServer | None
) -> None:
    """The index add path alone: group commit against a commit each, per engine."""
    engines: list[tuple[str, Callable[[], str]]] = [("SQLite", lambda: "")]
    if pg is not None:
        engines.append(("PostgreSQL", lambda: pg.url(pg.new_database())))
    for engine, make_url in engines:
        grouped, alone = [], []
        for _ in range(args.repeat):
            for batch, out in ((SqliteIndex.MAX_BATCH, grouped), (1, alone)):
                url = make_url()
                out.append(index_adds(headers, tmp, args.senders, batch, url))
                if url and pg is not None:
                    pg.drop_database(url.rpartition("/")[2])
        print(
            f"index add path alone ({engine}), {args.senders} threads: group commit"
            f" {statistics.median(grouped):.0f} adds/s, a commit each"
            f" {statistics.median(alone):.0f} adds/s"
        )


if __name__ == "__main__":
    sys.exit(main())
