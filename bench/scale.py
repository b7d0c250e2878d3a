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

After each fiona round the index is checked to hold every file once; the log's group-commit
line gives the mean instances per index transaction. ``--index-url`` gives fiona another
index (PostgreSQL once the engine takes it); the default is SQLite in the data folder.
``--receivers`` picks some of ``storescp,fiona1,fiona2``; ``--baseline DIR`` adds one fiona
process of another checkout (``baseline1``, e.g. before group commit) to the same rounds.

Targets (issue 18): fiona x2 at least 1.6x fiona x1 on this 2-core machine; fiona with 4
senders at least 0.5x storescp --fork.
"""

from __future__ import annotations

import argparse
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
from engine.store.index import Origin, SqliteIndex  # noqa: E402
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

    def __init__(self, work: Path, n: int, index_url: str, repo: Path = REPO) -> None:
        self.data = work / "data"
        projects = work / "projects"
        projects.mkdir(parents=True)
        site = work / "site.yaml"
        lines = ["reuse_port: true"] if n > 1 else []  # an older checkout has no such key
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

    def spread(self) -> list[int]:
        """Associations each process accepted."""
        return [s.log_text().count(f"association from {AE} ") for s in self.servers]

    def batches(self) -> tuple[int, int]:
        """(instances, index transactions) over the processes, from their shutdown lines."""
        found = [_BATCHES.search(s.log_text()) for s in self.servers]
        pairs = [(int(m.group(1)), int(m.group(2))) for m in found if m]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def indexed(self) -> tuple[int, int]:
        """(instance rows, distinct SOP Instance UIDs) in the SQLite index."""
        db = sqlite3.connect(self.data / "index.sqlite")
        try:
            row = db.execute("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances")
            n, distinct = row.fetchone()
            return int(n), int(distinct)
        finally:
            db.close()


Round = Callable[[Path], float]


def index_adds(headers: list[InstanceHeader], work: Path, threads: int, batch: int) -> float:
    """Adds per second into a fresh SQLite index from ``threads`` threads at once, through
    the receiver's add path, with at most ``batch`` adds per transaction (1: a commit each)."""
    index = SqliteIndex(work / f"index-{batch}-{time.monotonic_ns()}.sqlite")
    index.adds.max_batch = batch
    origin = Origin("dimse", AE, "FIONA", "127.0.0.1")

    def add(share: list[InstanceHeader]) -> None:
        for h in share:
            index.add_instance(h, f"archive/{h.sop_instance_uid}.dcm", 1000, origin)

    workers = [threading.Thread(target=add, args=(headers[i::threads],)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
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
    parser.add_argument("--index-url", default="", help="fiona's index (default: SQLite)")
    parser.add_argument("--receivers", default="storescp,fiona1,fiona2")
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
    with tempfile.TemporaryDirectory(prefix="fiona-scale-", dir=os.environ.get("BENCH_TMP")) as t:
        tmp = Path(t)
        files = make_corpus(tmp / "corpus", args.files, args.size, seed=args.size)
        mb = sum(f.stat().st_size for f in files) / 1e6
        # Per fiona round: mean instances per index commit, associations per process.
        notes: dict[str, list[tuple[float, str]]] = {}

        def fiona(n: int, name: str, repo: Path = REPO) -> Round:
            def one_round(work: Path) -> float:
                group = FionaGroup(work, n, args.index_url, repo)
                group.start()
                try:
                    seconds = send_all(files, group.port, args.senders, args.per_association)
                finally:
                    group.stop()
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

            return one_round

        def with_storescp(work: Path) -> float:
            with storescp(work) as port:
                return send_all(files, port, args.senders, args.per_association)

        table: dict[str, Round] = {
            "storescp": with_storescp,
            "fiona1": fiona(1, "fiona1"),
            "fiona2": fiona(2, "fiona2"),
        }
        if args.baseline:
            table["baseline1"] = fiona(1, "baseline1", args.baseline.resolve())
            wanted.append("baseline1")
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
            f" ({each} per association), median of {args.repeat};"
            f" index {args.index_url or 'SQLite'}; load average {load_before:.1f} before,"
            f" {load_after:.1f} after on {os.cpu_count()} cores"
        )
        print(f"{'receiver':>10} {'files/s':>9} {'MB/s':>7}  notes")
        for name, rate in rates.items():
            rounds = notes.get(name, [])
            per = [r[0] for r in rounds if r[0] >= 0]  # an older checkout logs no counts
            note = (
                (f"{statistics.mean(per):.1f} instances/commit; " if per else "")
                + f"associations per process {', '.join(r[1] for r in rounds)}"
                if rounds
                else ""
            )
            print(f"{name:>10} {rate:9.0f} {rate * mb / len(files):7.1f}  {note}", flush=True)
        if "fiona1" in rates and "fiona2" in rates:
            print(f"fiona x2 / fiona x1: {rates['fiona2'] / rates['fiona1']:.2f} (target >= 1.6)")
        for name in ("fiona1", "fiona2"):
            if name in rates and "storescp" in rates:
                ratio = rates[name] / rates["storescp"]
                print(f"{name} / storescp --fork: {ratio:.2f} (target >= 0.5)")
        headers = [parse_header(f.read_bytes()) for f in files]
        grouped, alone = [], []
        for _ in range(args.repeat):
            grouped.append(index_adds(headers, tmp, args.senders, SqliteIndex.MAX_BATCH))
            alone.append(index_adds(headers, tmp, args.senders, 1))
        print(
            f"index add path alone, {args.senders} threads: group commit"
            f" {statistics.median(grouped):.0f} adds/s, a commit each"
            f" {statistics.median(alone):.0f} adds/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
