"""The receive path's index cost: ``Index.add_instance`` per instance, SQLite and PostgreSQL.

    python bench/index.py [--n 2000] [--url postgresql://...] [--runs 3] [--threads 1,4]

Each run adds ``n`` instances (20 series of one study per 1,000, as a CT arrives) to a fresh
index, from one thread (``--threads N``: N at once, as concurrent associations add; several
counts separated by commas are measured in turn), and prints the median wall-clock microseconds
per instance, the mean instances per index transaction (group commit) and the CPU this process
spent per instance (for PostgreSQL, the client's side: psycopg; the server's is not counted).
The engines and thread counts take turns within each run (this VM's disk has slow spells):
the SQLite file in a temporary folder (``synchronous=FULL``, as ``fiona serve`` runs it) and,
with ``--url`` (an empty database, or a throw-away cluster started from Debian's
``postgresql`` package with ``--start-postgresql``), PostgreSQL. Synthetic headers only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.dicom.header import InstanceHeader
from engine.store.index import Origin, open_index

ORIGIN = Origin("dimse", "MODALITY", "FIONA", "127.0.0.1")


def header(run: int, i: int) -> InstanceHeader:
    study = f"1.2.826.0.1.3680043.10.1.{run}"
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"{study}.{i}",
        study_uid=study,
        series_uid=f"{study}.0.{i // 50}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="SYN0001",
        modality="CT",
        series_number=i // 50,
        instance_number=i,
        attrs={"SliceThickness": "1.0"},
    )


def one_run(
    url: str, folder: Path, run: int, n: int, threads: int = 1
) -> tuple[float, float, float]:
    """Wall-clock microseconds per add_instance over ``n`` instances into a fresh index,
    added by ``threads`` threads at once (as concurrent associations do), the mean
    instances per transaction, and this process's CPU microseconds per add (the server's
    not included)."""
    index = open_index(url, folder / f"index-{run}-{threads}.sqlite")

    def add(part: int) -> None:
        for i in range(part, n, threads):
            index.add_instance(header(run, i), f"archive/{run}/{i}.dcm", 500_000, ORIGIN)

    try:
        start, cpu = time.perf_counter(), time.process_time()
        workers = [threading.Thread(target=add, args=(p,)) for p in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return (
            (time.perf_counter() - start) / n * 1e6,
            index.adds.items / index.adds.batches,
            (time.process_time() - cpu) / n * 1e6,
        )
    finally:
        index.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--threads", default="1", help="adding at once (default 1; 1,4: each in turn)"
    )
    parser.add_argument("--url", default="", help="a PostgreSQL database (empty)")
    parser.add_argument("--start-postgresql", action="store_true")
    parser.add_argument(
        "--no-flush",
        action="store_true",
        help="the statements' cost alone: SQLite in /dev/shm, the cluster started with fsync"
        " and synchronous_commit off (not how fiona runs)",
    )
    args = parser.parse_args()
    counts = [int(t) for t in str(args.threads).split(",")]
    cluster = None
    urls = {"sqlite": ""}
    if args.start_postgresql:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pg_server import PgCluster

        cluster = PgCluster(durable=not args.no_flush)
        urls["postgresql"] = cluster.url(cluster.new_database())
    elif args.url:
        urls["postgresql"] = args.url
    times: dict[tuple[str, int], list[float]] = {(e, t): [] for e in urls for t in counts}
    grouped: dict[tuple[str, int], list[float]] = {key: [] for key in times}
    client: dict[tuple[str, int], list[float]] = {key: [] for key in times}
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm" if args.no_flush else None) as tmp:
            for run in range(args.runs):
                for (engine, threads), out in times.items():
                    url = urls[engine]
                    if engine == "postgresql":
                        _clear(url)
                    took, per_commit, cpu = one_run(url, Path(tmp), run, args.n, threads)
                    out.append(took)
                    grouped[(engine, threads)].append(per_commit)
                    client[(engine, threads)].append(cpu)
        for (engine, threads), runs in times.items():
            print(
                f"{engine:10s} add_instance x{threads}:"
                f" {statistics.median(runs):7.0f} us/instance"
                f" (runs: {', '.join(f'{t:.0f}' for t in runs)});"
                f" {statistics.mean(grouped[(engine, threads)]):.1f} instances/transaction;"
                f" fiona's CPU {statistics.median(client[(engine, threads)]):.0f} us/instance"
            )
    finally:
        if cluster is not None:
            cluster.close()
    return 0


def _clear(url: str) -> None:
    """Each run starts from an empty PostgreSQL schema (the runs reuse one database)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


if __name__ == "__main__":
    raise SystemExit(main())
