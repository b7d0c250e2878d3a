"""End-to-end benchmark: studies per minute received, de-identified and delivered to Orthanc,
by one and two ``fiona serve`` worker processes, on SQLite and on PostgreSQL.

Run from the repo root: ``python bench/e2e.py [--studies N] [--instances K] [--size PX]
[--senders S] [--repeat R]`` (``--quick``: a small smoke run). N synthetic MR studies of K
instances each are sent by S storescu processes at once (one association per study, each sender
its share of the studies one after the other). A round's time runs from the senders' start to
the moment Orthanc's REST API counts every instance; studies per minute is N over that time,
the median of R rounds in which the receivers take turns (a fresh Orthanc, data folder and
index each round).

Receivers:

- ``orthanc``: storescu straight into Orthanc: the transport and Orthanc's own storing, the
  floor of any relay in front of it (the reference);
- ``fiona1``: one ``fiona serve`` with a project that claims the senders' studies, waits for
  each study to be quiet for ``--quiet`` seconds (its completeness rule), de-identifies it with
  the shipped default profile (the ``anonymize`` step) and sends it to Orthanc (the ``send``
  step, a ``dicom`` destination with ``--concurrency`` transfers at once, default 1 as
  fiona's); the scan runs every 0.5 s, the outbox ticks every second (fiona's own cadence);
- ``fiona2``: two such processes on one port (``reuse_port``), one data folder and one index:
  each receives some associations, and runs and transfers go to whichever node claims them
  (leases, see README "Several nodes");
- ``fiona1-pg``, ``fiona2-pg``: the same with the index in PostgreSQL (a fresh database per
  round on a throw-away durable cluster, or on ``--pg-url``; see bench/scale.py).

Every fiona round checks that Orthanc holds N studies, none under an original Patient ID.
The quiet period is in every fiona round's time (a study cannot be complete sooner), so the
table also gives the time minus ``--quiet``: what the pipeline itself took after the last study
went quiet. Targets (issue 18): two worker processes at least 1.6x one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import yaml  # noqa: E402

from bench.scale import (  # noqa: E402
    FionaGroup,
    PgServer,
    _have_postgresql,
    _proc_cpu,
    machine_load,
)
from engine.store.db import INDEX_URL_ENV  # noqa: E402
from tests import synth  # noqa: E402
from tests.peers import OrthancServer, dcmtk, nodelay_env  # noqa: E402

AE = "BENCH"
_RUN_DONE = re.compile(r"run \d+ \(project bench\): done")
ALL_RECEIVERS = "orthanc,fiona1,fiona2,fiona1-pg,fiona2-pg"

Round = Callable[[Path], float]


def make_studies(out: Path, n: int, per_study: int, size: int) -> list[list[Path]]:
    """``n`` synthetic MR studies of one series of ``per_study`` instances each (one patient
    each), their files study by study."""
    series = replace(synth.MR_SERIES["t1_mprage"], n_slices=per_study, size=size)
    return [
        synth.write_study(
            synth.make_study(synth.make_study_spec(1000 + k), [series], size=size),
            out / f"study{k:03d}",
        )
        for k in range(n)
    ]


def send_studies(studies: list[list[Path]], port: int, ae: str, senders: int) -> list[str]:
    """Send the studies from ``senders`` storescu processes at once, one association per
    study; the failures' messages (none: every study was answered Success)."""
    failures: list[str] = []

    def sender(share: list[list[Path]]) -> None:
        # Timeouts (s): a receiver that stops answering fails the round, not hangs it.
        timeouts = ["-to", "60", "-ta", "60", "-td", "60"]
        base = [dcmtk("storescu"), *timeouts, "-aec", ae, "-aet", AE, "127.0.0.1", str(port)]
        for files in share:
            done = _run([*base, *map(str, files)])
            if done is not None:
                failures.append(done)

    threads = [
        threading.Thread(target=sender, args=(studies[i::senders],)) for i in range(senders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def _run(cmd: list[str]) -> str | None:
    import subprocess

    try:
        done = subprocess.run(cmd, env=nodelay_env(), capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "no answer in 300 s"
    if done.returncode == 0:
        return None
    said = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
    return f"exit status {done.returncode}: {said}"


def orthanc_get(server: OrthancServer, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=10) as r:
        return json.loads(r.read())


def orthanc_count(server: OrthancServer) -> int:
    stats = orthanc_get(server, "/statistics")
    assert isinstance(stats, dict)
    return int(stats["CountInstances"])


def wait_for_orthanc(server: OrthancServer, total: int, timeout: float) -> None:
    """Return once Orthanc counts ``total`` instances (RuntimeError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while orthanc_count(server) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Orthanc has {orthanc_count(server)} of {total} instances")
        time.sleep(0.1)


def write_project(
    projects: Path, orthanc: OrthancServer, quiet: float, concurrency: int = 1
) -> None:
    """A project claiming the senders' studies: anonymize (default profile), send to Orthanc
    (``concurrency`` transfers at once)."""
    key = projects / "bench.key"
    key.write_bytes(os.urandom(48))
    key.chmod(0o600)
    doc = {
        "name": "bench",
        "routing": {"calling_ae": [AE]},
        "completeness": {"study_quiet_seconds": quiet},
        "destinations": {
            "pacs": {
                "type": "dicom",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "ae_title": orthanc.ae_title,
                "concurrency": concurrency,
            }
        },
        "pipeline": [
            {"step": "anonymize", "secret_file": key.name},
            {"step": "send", "to": ["pacs"]},
        ],
    }
    (projects / "bench.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def check_delivered(orthanc: OrthancServer, n: int, original_ids: set[str], name: str) -> None:
    """Orthanc holds ``n`` studies and no patient under an original Patient ID."""
    studies = orthanc_get(orthanc, "/studies")
    patients = orthanc_get(orthanc, "/patients?expand")
    assert isinstance(studies, list) and isinstance(patients, list)
    ids = {p["MainDicomTags"].get("PatientID", "") for p in patients}
    if len(studies) != n or ids & original_ids:
        raise RuntimeError(
            f"{name}: Orthanc has {len(studies)} studies, not {n}"
            f" ({len(ids & original_ids)} patients under an original Patient ID)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=24, help="studies sent")
    parser.add_argument("--instances", type=int, default=20, help="instances per study")
    parser.add_argument("--size", type=int, default=64, help="image size (pixels per side)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu senders")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (median)")
    parser.add_argument(
        "--quiet", type=float, default=2.0, help="the project's study_quiet_seconds"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="the Orthanc destination's concurrency (default 1, as fiona's)",
    )
    parser.add_argument("--pg-url", default="", help="a PostgreSQL server (see bench/scale.py)")
    parser.add_argument("--receivers", default=ALL_RECEIVERS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per round")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.instances, args.size, args.repeat, args.quiet = 4, 5, 16, 1, 1.0
    wanted = args.receivers.split(",")
    if args.receivers == ALL_RECEIVERS and not args.pg_url and not _have_postgresql():
        wanted = [w for w in wanted if not w.endswith("-pg")]
        print("PostgreSQL is not installed: the -pg rounds are left out", file=sys.stderr)
    os.environ.pop(INDEX_URL_ENV, None)  # each round names its own index
    with contextlib.ExitStack() as stack:
        tmp = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fiona-e2e-", dir=os.environ.get("BENCH_TMP"))
            )
        )
        pg = None
        if any(w.endswith("-pg") for w in wanted):
            pg = PgServer(args.pg_url)
            stack.callback(pg.close)
        return _run_rounds(args, wanted, tmp, pg)
    return 0


def _run_rounds(
    args: argparse.Namespace, wanted: list[str], tmp: Path, pg: PgServer | None
) -> int:
    studies = make_studies(tmp / "corpus", args.studies, args.instances, args.size)
    total = sum(len(s) for s in studies)
    original_ids = {str(pydicom.dcmread(s[0], stop_before_pixels=True).PatientID) for s in studies}
    spread: dict[str, list[str]] = {}

    def direct(work: Path) -> float:
        orthanc = OrthancServer(work / "orthanc").start()
        try:
            start = time.perf_counter()
            failures = send_studies(studies, orthanc.dicom_port, orthanc.ae_title, args.senders)
            if failures:
                raise RuntimeError(f"storescu into Orthanc failed: {failures[0]}")
            wait_for_orthanc(orthanc, total, args.timeout)
            return time.perf_counter() - start
        finally:
            orthanc.stop()

    def fiona(n: int, name: str, on_pg: bool) -> Round:
        def one_round(work: Path) -> float:
            database = pg.new_database() if on_pg and pg else ""
            try:
                url = pg.url(database) if database and pg else ""
                return _fiona_round(work, n, name, url)
            finally:
                if database and pg:
                    pg.drop_database(database)

        return one_round

    def _fiona_round(work: Path, n: int, name: str, url: str) -> float:
        orthanc = OrthancServer(work / "orthanc").start()
        group = FionaGroup(work, n, url, site_lines=("scan_interval_seconds: 0.5",))
        write_project(group.projects, orthanc, args.quiet, args.concurrency)
        try:
            group.start()
            busy: list[float] = []
            assert orthanc.proc is not None
            cpu = (group.cpu_seconds(), _proc_cpu(orthanc.proc.pid))
            with machine_load(busy):
                seconds = _fiona_sends(group, orthanc, name)
            fiona_cpu = group.cpu_seconds() - cpu[0]
            orthanc_cpu = _proc_cpu(orthanc.proc.pid) - cpu[1]
            check_delivered(orthanc, len(studies), original_ids, name)
            runs = "+".join(str(len(_RUN_DONE.findall(s.log_text()))) for s in group.servers)
            spread.setdefault(name, []).append(
                f"{'+'.join(map(str, group.spread()))}, runs {runs}; cores: fiona"
                f" {fiona_cpu / seconds:.2f}, Orthanc {orthanc_cpu / seconds:.2f}, machine busy"
                f" {100 * busy[0]:.0f}%"
            )
            return seconds
        finally:
            group.stop()
            orthanc.stop()

    def _fiona_sends(group: FionaGroup, orthanc: OrthancServer, name: str) -> float:
        """Send the studies into ``group``; seconds until Orthanc has every instance."""
        start = time.perf_counter()
        failures = send_studies(studies, group.port, "FIONA", args.senders)
        if failures:
            raise RuntimeError(f"{name}: storescu failed: {failures[0]}")
        try:
            wait_for_orthanc(orthanc, total, args.timeout)
        except RuntimeError as exc:
            problems = [
                line
                for s in group.servers
                for line in s.log_text().splitlines()
                if " WARNING " in line or " ERROR " in line
            ]
            raise RuntimeError(f"{name}: {exc}; fiona: {problems[:20]}") from None
        return time.perf_counter() - start

    table: dict[str, Round] = {
        "orthanc": direct,
        "fiona1": fiona(1, "fiona1", False),
        "fiona2": fiona(2, "fiona2", False),
        "fiona1-pg": fiona(1, "fiona1-pg", True),
        "fiona2-pg": fiona(2, "fiona2-pg", True),
    }
    times: dict[str, list[float]] = {name: [] for name in wanted}
    load_before = os.getloadavg()[0]
    for i in range(args.repeat):
        for name in wanted:
            work = tmp / f"run-{name}-{i}"
            work.mkdir(parents=True)
            times[name].append(table[name](work))
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(v) for name, v in times.items()}
    per_minute = {name: len(studies) / s * 60 for name, s in medians.items()}
    print(
        f"{len(studies)} studies of {args.instances} instances {args.size}x{args.size}"
        f" ({total} files), {args.senders} senders, study_quiet_seconds {args.quiet:g},"
        f" destination concurrency {args.concurrency},"
        f" median of {args.repeat}; load average {load_before:.1f} before,"
        f" {load_after:.1f} after on {os.cpu_count()} cores"
    )
    print(f"{'receiver':>10} {'studies/min':>12} {'seconds':>8} {'minus quiet':>12}  notes")
    for name, rate in per_minute.items():
        quiet = "" if name == "orthanc" else f"{medians[name] - args.quiet:12.1f}"
        note = f"associations per process {' | '.join(spread[name])}" if name in spread else ""
        print(f"{name:>10} {rate:12.1f} {medians[name]:8.1f} {quiet:>12}  {note}", flush=True)

    def ratio(a: str, b: str, label: str) -> None:
        if a in per_minute and b in per_minute:
            print(f"{label}: {per_minute[a] / per_minute[b]:.2f}")

    ratio("fiona2", "fiona1", "fiona x2 / fiona x1 (SQLite) (target >= 1.6)")
    ratio("fiona2-pg", "fiona1-pg", "fiona x2 / fiona x1 (PostgreSQL) (target >= 1.6)")
    ratio("fiona1-pg", "fiona1", "PostgreSQL / SQLite, fiona x1")
    for name in ("fiona1", "fiona2", "fiona1-pg", "fiona2-pg"):
        ratio(name, "orthanc", f"{name} / storescu straight into Orthanc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
