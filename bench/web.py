"""Web benchmark: the portal and API over real HTTP on a big index, and the receiver beside it.

Run from the repo root: ``python bench/web.py [--studies N] [--instances N] [--requests R]``
(``--quick``: a small index and few requests, a smoke run). It fills a fresh data folder's
index with synthetic rows in bulk (the store's own migrations make the schema; then plain
INSERTs: projects, states, modalities, dates, routes, runs, transfers, quarantine items and an
audit log spread as a busy site has them), starts ``fiona serve`` on it with the web portal on,
makes an admin with a token (API) and a login session (pages), and prints the median and 95th
percentile latency of each page, API JSON and portal HTML, over ``R`` sequential requests.

Then the receiver: storescu sends a fresh corpus to the same service, once with nobody on the
web and once while the dashboard is fetched every second, taking turns ``--repeat`` times; it
prints files/s of each and their ratio (1.00: the dashboard costs the receiver nothing).

Targets (README): p95 under 200 ms for every page; the receiver within 10% of its rate without
the web. ``--data DIR`` keeps the built folder in DIR and reuses it when it is there.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.store.audit import uid_token  # noqa: E402
from engine.store.index import SqliteIndex  # noqa: E402
from tests.peers import FionaServer, dcmtk, free_port, wait_for_port  # noqa: E402
from tests.synth import make_corpus  # noqa: E402

PASSWORD = "correct horse battery staple"
DAY = 86400.0
#: Projects and their share of the studies (a few big ones, a long tail).
PROJECTS = {"lung-ct": 30, "brain-mr": 25, "cardio": 15, "onco-pet": 10, "neuro-fu": 8,
            "breast": 6, "peds": 4, "trial-x": 2}  # fmt: skip
MODALITIES = {"MR": 35, "CT": 35, "PT": 6, "US": 8, "CR": 6, "DX": 5, "MG": 3, "NM": 2}
DESCRIPTIONS = ["HEAD ROUTINE", "CHEST CT", "BRAIN MRI", "ABDOMEN", "PET CT WB", "KNEE",
                "CARDIAC MR", "SPINE", "MAMMO SCREEN", "PELVIS"]  # fmt: skip
REASONS = ["transfer_failed", "unrouted", "burned_in", "step_failed", "no_consent",
           "unparseable", "duplicate_conflict"]  # fmt: skip


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


# -- building the index --------------------------------------------------------------------------


class Builder:
    """Synthetic rows for ``studies`` studies and about ``instances`` instances, times spread
    over two years with a busy last day."""

    def __init__(self, db: sqlite3.Connection, studies: int, instances: int, now: float) -> None:
        self.db, self.n, self.now = db, studies, now
        self.per_study = max(1, instances // studies)
        self.rng = random.Random(7)
        self.audit: list[str] = []
        self.sample: dict[str, str] = {}  # a few values to filter by

    def _received(self, i: int) -> float:
        """Study i's last receipt: 2% in the last day, the rest over two years."""
        if i % 50 == 0:
            return self.now - self.rng.uniform(0, DAY)
        return self.now - self.rng.uniform(DAY, 730 * DAY)

    def run(self) -> None:
        db, rng = self.db, self.rng
        patients = max(1, self.n * 2 // 3)
        db.executemany(
            "INSERT INTO patients (id, patient_id, patient_name, birth_date, sex)"
            " VALUES (?, ?, ?, ?, ?)",
            ((p, f"PID{p:08d}", f"SYNTH^PATIENT{p}", f"19{40 + p % 60:02d}0101", "MF"[p % 2])
             for p in range(1, patients + 1)),
        )  # fmt: skip
        series_id = instance_id = run_id = transfer_id = 0
        studies, series, instances, routes, runs, steps, transfers, items, held = (
            [], [], [], [], [], [], [], [], []
        )  # fmt: skip
        for s in range(1, self.n + 1):
            uid = f"1.2.826.0.1.3680043.10.999.{s}"
            last = self._received(s)
            first = last - rng.uniform(30, 900)
            n_inst = max(1, int(rng.expovariate(1 / self.per_study)))
            modality = _pick(rng, MODALITIES)
            date = time.strftime("%Y%m%d", time.gmtime(first))
            text = rng.choice(DESCRIPTIONS)
            n_series = min(n_inst, rng.randint(1, 6))
            left = n_inst
            for k in range(n_series):
                series_id += 1
                count = left if k == n_series - 1 else max(1, left // (n_series - k))
                left -= count
                mod = "CT" if modality == "PT" and k == 0 else modality  # PET-CT
                series.append((series_id, f"{uid}.{k + 1}", s, mod, k + 1, "SERIES", first,
                               last, count, last, '["t1"]'))  # fmt: skip
                for j in range(count):
                    instance_id += 1
                    at = first + (last - first) * (j + 1) / count
                    instances.append((instance_id, f"{uid}.{k + 1}.{j + 1}", series_id, j + 1,
                                      f"archive/{uid}/{k + 1}/{j + 1}.dcm", at))  # fmt: skip
            # routed_upto: the last instance routing has seen (all), so the tracker reads none.
            studies.append((s, uid, 1 + s % patients, date, f"ACC{s:09d}", text, first, last,
                            n_inst, instance_id, last))  # fmt: skip
            roll = rng.random()
            projects = [] if roll < 0.04 else [_pick(rng, PROJECTS)]
            if roll > 0.96:
                projects.append(_pick(rng, PROJECTS))
            for project in dict.fromkeys(projects):
                routes.append((uid, project, last, last + 60))
                run_id += 1
                state = rng.choices(["done", "quarantined", "failed", "pending"],
                                    [94, 3, 2, 1])[0]  # fmt: skip
                later = self.now + 3650 * DAY if state == "pending" else None
                runs.append((run_id, uid, project, state, later, last + 60, last + 120))
                for idx, step in enumerate(("classify", "anonymize", "send")):
                    steps.append((run_id, idx, step, last + 70 + idx))
                if state == "quarantined":
                    held.append((uid, project, rng.choice(REASONS[:5]), last + 120))
                if state == "done":
                    transfer_id += 1
                    tstate = rng.choices(["done", "failed", "queued"], [96, 2, 2])[0]
                    done_at = last + 300 if tstate != "queued" else None
                    retry = self.now + 3650 * DAY if tstate == "queued" else last
                    transfers.append((transfer_id, project, uid, f"2.25.{s}", run_id, tstate,
                                      retry, last + 130, done_at or last + 130,
                                      done_at))  # fmt: skip
                    if tstate == "done" and last > self.now - 2 * DAY:
                        for j in range(n_inst):
                            items.append((transfer_id, f"2.25.{s}.{j}", done_at))
                self.audit += [
                    json.dumps({"at": _iso(last + 60), "event": "routed", "project": project,
                                "study": uid_token(uid)}, sort_keys=True, separators=(",", ":")),
                    json.dumps({"at": _iso(last + 300), "event": "sent", "project": project,
                                "study": uid_token(uid)}, sort_keys=True, separators=(",", ":")),
                ]  # fmt: skip
            if s == self.n // 3:
                self.sample = {"project": projects[0] if projects else "lung-ct",
                               "modality": modality, "text": rng.choice(DESCRIPTIONS)[:5],
                               "study_uid": uid}  # fmt: skip
            if len(instances) > 200_000:
                self._flush(studies, series, instances)
        self._flush(studies, series, instances)
        self._rest(routes, runs, steps, transfers, items, held)

    def _flush(self, studies: list[Any], series: list[Any], instances: list[Any]) -> None:
        db = self.db
        db.executemany(
            "INSERT INTO studies (id, study_uid, patient_ref, study_date, accession_number,"
            " description, first_received_at, last_received_at, n_instances, routed_upto,"
            " judged_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", studies)  # fmt: skip
        db.executemany(
            "INSERT INTO series (id, series_uid, study_ref, modality, series_number, description,"
            " first_received_at, last_received_at, n_instances, summary_written_at, labels)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)", series)  # fmt: skip
        db.executemany(
            "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, series_ref,"
            " instance_number, transfer_syntax, path, size, received_at, calling_ae, called_ae,"
            " peer_ip, via) VALUES (?, ?, '1.2.840.10008.5.1.4.1.1.4', ?, ?, '1.2.840.10008.1.2.1',"
            " ?, 200000, ?, 'SCANNER', 'FIONA', '10.0.0.5', 'dimse')", instances)  # fmt: skip
        studies.clear()
        series.clear()
        instances.clear()

    def _rest(self, routes: list[Any], runs: list[Any], steps: list[Any], transfers: list[Any],
              items: list[Any], held: list[Any]) -> None:  # fmt: skip
        db, rng = self.db, self.rng
        db.executemany(
            "INSERT INTO study_routes (study_uid, project, reasons, state, opened_at,"
            " completed_at, runs, done_upto) VALUES (?, ?, '[\"calling_ae\"]', 'complete', ?, ?,"
            " 1, 1000000000)", routes)  # fmt: skip
        db.executemany(
            "INSERT INTO pipeline_runs (id, study_uid, project, state, next_try_at, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?)", runs)  # fmt: skip
        db.executemany(
            "INSERT INTO pipeline_steps (run_id, idx, name, state, finished_at)"
            " VALUES (?, ?, ?, 'done', ?)", steps)  # fmt: skip
        db.executemany(
            "INSERT INTO transfers (id, project, destination, study_uid, export_uid, run_id,"
            " state, next_try_at, created_at, updated_at, finished_at, attempts, last_error)"
            " VALUES (?, ?, 'out', ?, ?, ?, ?, ?, ?, ?, ?, 1, '')", transfers)  # fmt: skip
        db.executemany(
            "INSERT INTO transfer_items (transfer_id, sop_instance_uid, sop_class_uid,"
            " transfer_syntax, series_uid, path, size, state, sent_at) VALUES (?, ?,"
            " '1.2.840.10008.5.1.4.1.1.4', '1.2.840.10008.1.2.1', '2.25.1', 'x', 200000, 'sent',"
            " ?)", items)  # fmt: skip
        quarantine = [
            (f"{n:032x}", reason, f"archive/{uid}", uid, project, "held", at, None)
            for n, (uid, project, reason, at) in enumerate(held)
        ]
        for n in range(len(held), len(held) + max(10, self.n // 50)):  # at receipt, resolved
            at = self.now - rng.uniform(0, 365 * DAY)
            state = "held" if n % 10 == 0 else rng.choice(["released", "discarded"])
            day = time.strftime("%Y%m%d", time.gmtime(at))
            quarantine.append((f"{n:032x}", rng.choice(REASONS[5:]),
                               f"quarantine/{day}/{n:032x}.dcm", None, "", state, at,
                               None if state == "held" else at + 3600))  # fmt: skip
        db.executemany(
            "INSERT INTO quarantine (qid, reason, path, study_uid, project, state, received_at,"
            " resolved_at, size, sha256, via, detail) VALUES (?,?,?,?,?,?,?,?, 1000, 'x',"
            " 'dimse', '')", quarantine)  # fmt: skip
        for at in (self.now - 120, self.now - 60):
            db.execute(
                "INSERT INTO heartbeats (at, echo_ok, free_bytes, total_bytes)"
                " VALUES (?, 1, 10000000000, 20000000000)", (at,))  # fmt: skip


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def build(data: Path, projects: Path, studies: int, instances: int) -> dict[str, str]:
    """A data folder with the synthetic index and audit log; the project files; the sample
    values the filtered requests use (kept in ``bench-sample.json`` for reuse)."""
    sample_file = data / "bench-sample.json"
    if sample_file.is_file():
        return dict(json.loads(sample_file.read_text()))
    started = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    SqliteIndex(data / "index.sqlite").close()  # the schema, by the store's migrations
    db = sqlite3.connect(data / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    builder = Builder(db, studies, instances, time.time())
    builder.run()
    db.execute("COMMIT")  # no ANALYZE: fiona never runs it, so the planner has no statistics
    (total,) = db.execute("SELECT count(*) FROM instances").fetchone()
    db.close()
    audit = data / "audit"
    audit.mkdir(exist_ok=True)
    (audit / time.strftime("audit-%Y%m.jsonl")).write_text("\n".join(builder.audit) + "\n")
    sample_file.write_text(json.dumps(builder.sample))
    print(f"built {studies} studies, {total} instances, {len(builder.audit)} audit entries"
          f" in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return builder.sample


def write_projects(projects: Path) -> None:
    projects.mkdir(parents=True, exist_ok=True)
    for name in PROJECTS:
        doc = {"name": name, "routing": {"calling_ae": [f"AE_{name.upper()[:10]}"]},
               "retention": {"keep_days": 36500}, "pipeline": [{"step": "classify"}]}  # fmt: skip
        (projects / f"{name}.yaml").write_text(json.dumps(doc))


# -- the service and its clients -----------------------------------------------------------------


class Client:
    """The admin over HTTP: a bearer token for the API, a session cookie for the pages."""

    def __init__(self, port: int, token: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def login(self) -> None:
        form = urllib.parse.urlencode({"name": "admin", "password": PASSWORD, "next": "/"})
        request = urllib.request.Request(self.base + "/login", data=form.encode())
        request.add_header("Origin", self.base)
        with self.opener.open(request, timeout=60) as answer:
            assert 'id="logout"' in answer.read().decode(), "the login failed"

    def get(self, path: str) -> float:
        """Seconds for one GET, its whole body read (a non-200 answer is an error)."""
        request = urllib.request.Request(self.base + path)
        if path.startswith("/api/"):
            request.add_header("Authorization", f"Bearer {self.token}")
        start = time.perf_counter()
        with self.opener.open(request, timeout=120) as answer:
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{path}: HTTP {answer.status}")
        return time.perf_counter() - start


def fiona(config: Path, data: Path, projects: Path, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv, "--config", str(config), "--data", str(data),
         "--projects", str(projects)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"fiona {' '.join(argv)}: {done.stderr[-2000:]}")
    return done.stdout


def targets(sample: dict[str, str]) -> list[tuple[str, str]]:
    """(name, path) of every measured page: the API's JSON and the portal's HTML."""
    q = urllib.parse.urlencode
    filters = {
        "unfiltered": "",
        "project": q({"project": sample["project"]}),
        "modality": q({"modality": sample["modality"]}),
        "date": q({"date_from": "2025-01-01", "date_to": "2025-03-31"}),
        "text": q({"text": sample["text"]}),
    }
    uid = sample["study_uid"]
    out = [("api status", "/api/v1/status")]
    out += [(f"api studies {k}", f"/api/v1/studies?{v}") for k, v in filters.items()]
    out += [("api study", f"/api/v1/studies/{uid}"), ("api quarantine", "/api/v1/quarantine")]
    out += [("page dashboard", "/")]
    out += [(f"page studies {k}", f"/studies?{v}") for k, v in filters.items()]
    out += [("page study", f"/studies/{uid}"), ("page quarantine", "/quarantine")]
    out += [("status.json", "/status.json"), ("metrics", "/metrics")]
    return out


def latencies(client: Client, path: str, n: int) -> tuple[float, float]:
    """(median, 95th percentile) milliseconds of ``n`` sequential GETs after one warm-up."""
    client.get(path)
    times = sorted(client.get(path) * 1000 for _ in range(n))
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return statistics.median(times), p95


def send(files: list[Path], port: int) -> float:
    """Seconds for one storescu association carrying every file."""
    start = time.perf_counter()
    done = subprocess.run(
        [dcmtk("storescu"), "-aec", "FIONA", "-aet", "BENCH", "127.0.0.1", str(port),
         *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


class Poller:
    """Fetches the dashboard every second in a thread until stopped."""

    def __init__(self, client: Client) -> None:
        self.client, self.stop_at = client, threading.Event()
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_at.is_set():
            self.times.append(self.client.get("/"))
            self.stop_at.wait(1.0)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_at.set()
        self.thread.join()


def receiver(client: Client, port: int, work: Path, files: int, repeat: int) -> None:
    """files/s without and with the dashboard polled, taking turns; their ratio."""
    rates: dict[str, list[float]] = {"quiet": [], "polled": []}
    polls: list[float] = []
    for i in range(repeat):
        for mode in ("quiet", "polled"):
            corpus = make_corpus(work / f"corpus-{mode}-{i}", files, 64, seed=1000 + 10 * i
                                 + (mode == "polled") * 500)  # fmt: skip
            if mode == "quiet":
                rates[mode].append(files / send(corpus, port))
                continue
            with Poller(client) as poller:
                rates[mode].append(files / send(corpus, port))
            polls += poller.times
    quiet, polled = statistics.median(rates["quiet"]), statistics.median(rates["polled"])
    # Each round's polled run against the quiet run just before it: the disk's slow spells
    # (its flush time varies 2-4x from minute to minute here) then hit both alike.
    pairs = statistics.median(p / q for q, p in zip(rates["quiet"], rates["polled"], strict=True))
    print(f"\nreceiver, {files} files of 64x64 per run, median of {repeat}:")
    print(f"{'without the web':>28} {quiet:8.1f} files/s")
    poll_ms = statistics.median(polls or [0]) * 1000
    print(f"{'dashboard polled every 1 s':>28} {polled:8.1f} files/s"
          f"  ({len(polls)} polls, median {poll_ms:.0f} ms)")  # fmt: skip
    print(f"{'ratio of the medians':>28} {polled / quiet:8.2f}")
    print(f"{'ratio (target >= 0.90)':>28} {pairs:8.2f}  (median of each round's ratio)",
          flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=2_000_000)
    parser.add_argument("--requests", type=int, default=40, help="requests per page")
    parser.add_argument("--files", type=int, default=300, help="files per receiver run")
    parser.add_argument("--repeat", type=int, default=3, help="receiver runs per mode")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--data", type=Path, help="keep (and reuse) the built data folder here")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.instances, args.requests = 300, 3000, 3
        args.files, args.repeat = 20, 1
    with tempfile.TemporaryDirectory(prefix="fiona-bench-web-",
                                     dir=os.environ.get("BENCH_TMP")) as t:  # fmt: skip
        work = Path(t)
        root = args.data or work
        data, projects = root / "data", root / "projects"
        write_projects(projects)
        sample = build(data, projects, args.studies, args.instances)
        return run(work, root, data, projects, sample, args)


def run(work: Path, root: Path, data: Path, projects: Path, sample: dict[str, str],
        args: argparse.Namespace) -> int:  # fmt: skip
    web_port = free_port()
    config = work / "site.yaml"
    config.write_text(json.dumps({
        "web": {"enabled": True, "port": web_port},
        "retention": {"min_free_percent": 0, "interval_seconds": 86400},
        "routing": {"unrouted": "ignore"},
    }))  # fmt: skip
    server = FionaServer(data, projects, config=config, web_port=None).start(timeout=300)
    try:
        wait_for_port(web_port, 120, server.proc)
        password = work / "pw.txt"
        password.write_text(PASSWORD + "\n")
        names = fiona(config, data, projects, "user", "list")
        if "admin" not in names.split():
            fiona(config, data, projects, "user", "add", "admin", "--role", "admin", "--phi",
                  "--password-file", str(password))  # fmt: skip
        token = fiona(config, data, projects, "user", "token", "admin").strip()
        client = Client(web_port, token)
        client.login()
        print(f"{'page':<28} {'median ms':>10} {'p95 ms':>8}", flush=True)
        slow = []
        for name, path in targets(sample):
            median, p95 = latencies(client, path, args.requests)
            mark = "" if p95 < 200 else "  > 200 ms"
            slow += [name] if mark else []
            print(f"{name:<28} {median:10.1f} {p95:8.1f}{mark}", flush=True)
        print(f"p95 under 200 ms: {'all' if not slow else 'not ' + ', '.join(slow)}")
        receiver(client, server.port, work, args.files, args.repeat)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
