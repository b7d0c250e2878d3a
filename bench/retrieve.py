"""Retrieval benchmark: ``fiona retrieve`` (C-MOVE and C-GET) against dcmtk's movescu/getscu.

Run from the repo root: ``python bench/retrieve.py [--files 2000] [--size 64]
[--associations 1,4] [--nodes 1,2] [--baseline DIR] [--repeat 3]``. A corpus of
synthetic MR studies (``tests.synth.make_corpus``: 200 instances a study) is loaded into
Orthanc, then fetched four ways, each into a fresh destination:

- fiona, ``retrieve: move``: a list of the study UIDs queued with ``fiona retrieve`` and worked
  by ``fiona serve`` in ``--associations`` lanes (the PACS's ``limits.max_associations``: rows
  in parallel, one association each; C-FIND of every series and instance, C-MOVE to fiona's
  own SCP, every instance durable in the archive and the index, arrivals counted); with
  ``--nodes 2``, two ``fiona serve`` on one port (``reuse_port``) and one index: the lanes
  (``max_associations`` in all, the PACS's limit being the cluster's) are claimed by both, and
  the PACS's C-MOVE associations are spread over both receivers by the kernel;
- dcmtk ``movescu`` per study into dcmtk's ``storescp`` (one at a time, as a script would);
- fiona, ``retrieve: get`` (C-GET, filed through the archive on the same association);
- dcmtk ``getscu`` per study, writing files.

It prints files/s of each and fiona's ratio to dcmtk's (the issue's target: 0.8x with fiona's
durability). The clock runs from the job being queued (committed in the index: the command's
own start-up, imports included, is not counted) or from the first movescu/getscu, to the last
instance arriving.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from engine.cli import main as fiona_main  # noqa: E402
from tests.peers import (  # noqa: E402
    DcmqrscpServer,
    FionaServer,
    OrthancServer,
    StorescpServer,
    dcmtk,
    free_port,
    nodelay_env,
)
from tests.synth import make_corpus  # noqa: E402

_ROW_DONE = re.compile(r"retrieval job \d+ line \d+: done")


def _study_uids(files: list[Path]) -> list[str]:
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    return sorted(uids)


def _fiona(
    work: Path,
    orthanc: OrthancServer,
    port: int,
    method: str,
    uids: list[str],
    lanes: int,
    nodes: int = 1,
    repo: Path = REPO,
) -> float:
    """Seconds for ``fiona retrieve`` to bring every study, in ``lanes`` associations (the
    PACS's limit, shared by ``nodes`` ``fiona serve`` processes on one port and index)."""
    tag = f"{method}-{lanes}-{nodes}-{time.monotonic_ns()}"
    data, projects = work / f"fiona-{tag}", work / f"projects-{tag}"
    projects.mkdir()
    site = work / f"site-{tag}.yaml"
    site.write_text(
        f"data_dir: {data}\nprojects_dir: {projects}\nport: {port}\n"
        + ("reuse_port: true\n" if nodes > 1 else "")
        + f"pacs:\n  - {{name: orthanc, ae_title: {orthanc.ae_title}, host: 127.0.0.1,"
        f" port: {orthanc.dicom_port}, retrieve: {method},"
        f" limits: {{max_associations: {lanes}}}}}\n"
    )
    servers = []
    for k in range(nodes):
        log_path = work / f"fiona-{tag}-{k}.log"
        server = FionaServer(
            data_dir=data,
            projects_dir=projects,
            port=port,
            config=site,
            log_path=log_path,
            repo=repo,
        )
        servers.append(server.start())
        while "fiona serving AE" not in server.log_text():  # the next one finds the index made
            if not server.alive():
                raise RuntimeError(f"fiona did not start: {server.log_text()[-2000:]}")
            time.sleep(0.05)
    try:
        listing = work / f"list-{tag}.csv"
        listing.write_text("study_uid\n" + "".join(f"{u}\n" for u in uids))
        assert (
            fiona_main(["retrieve", "orthanc", "--list", str(listing), "--config", str(site)]) == 0
        )
        start, wall = time.perf_counter(), time.time()  # queued: committed in the index
        while True:
            db = sqlite3.connect(f"file:{data / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
            try:
                states = [r[0] for r in db.execute("SELECT state FROM retrieve_rows")]
            finally:
                db.close()
            if all(s in ("done", "partial", "failed") for s in states):
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        if set(states) != {"done"}:
            raise RuntimeError(f"fiona {method}: rows ended {sorted(set(states))}")
        db = sqlite3.connect(f"file:{data / 'index.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            first, last, n = db.execute(
                "SELECT min(received_at), max(received_at), count(*) FROM instances"
            ).fetchone()
        finally:
            db.close()
        spread = [s.log_text().count("association from ") for s in servers]
        worked = [len(_ROW_DONE.findall(s.log_text())) for s in servers]
        print(
            f"  fiona {method} x{lanes} on {nodes} node(s){'' if repo == REPO else ' (baseline)'}:"
            f" first instance {first - wall:.2f} s after queueing, {n} arrived in"
            f" {last - first:.2f} s ({n / max(last - first, 1e-6):.0f} files/s while arriving);"
            f" associations accepted per node {spread}, rows worked per node {worked}"
        )
        return seconds
    finally:
        for server in servers:
            server.stop()


def _dcmtk(
    work: Path, orthanc: OrthancServer, tool: str, uids: list[str], store_port: int
) -> float:
    """Seconds for movescu (into storescp at ``store_port``) or getscu to bring every study."""
    out = work / f"{tool}-out-{time.monotonic_ns()}"
    out.mkdir()
    start = time.perf_counter()
    for uid in uids:
        args = [dcmtk(tool), "-S", "-aet", "FIONA", "-aec", orthanc.ae_title]
        args += ["-aem", "STORESCP"] if tool == "movescu" else ["-od", str(out)]
        args += ["-k", "0008,0052=STUDY", "-k", f"0020,000D={uid}"]
        args += ["127.0.0.1", str(orthanc.dicom_port)]
        subprocess.run(args, check=True, capture_output=True, env=nodelay_env())
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image rows and columns")
    parser.add_argument(
        "--associations",
        default="1,4",
        help="the PACS's limits.max_associations fiona is run with (rows retrieved in"
        " parallel), comma-separated: each is a run of its own",
    )
    parser.add_argument(
        "--nodes",
        default="1",
        help="fiona serve processes sharing the port (reuse_port) and the index, comma-"
        "separated: each is a run of its own, with the same limits.max_associations in all",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. `git archive main` unpacked) run as one node in the same"
        " rounds, with each --associations",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; medians are printed")
    args = parser.parse_args()
    lanes = [int(n) for n in args.associations.split(",")]
    setups = [(n, k, "") for k in map(int, args.nodes.split(",")) for n in lanes]
    if args.baseline:
        setups += [(n, 1, " baseline") for n in lanes]
    with tempfile.TemporaryDirectory(prefix="fiona-bench-retrieve-") as tmp:
        work = Path(tmp)
        files = make_corpus(work / "corpus", args.files, args.size)
        uids = _study_uids(files)
        fiona_port = free_port()
        storescp = StorescpServer(work / "storescp").start()  # writes every file, as fiona
        modalities = {
            "fiona": ["FIONA", "127.0.0.1", fiona_port],
            "storescp": ["STORESCP", "127.0.0.1", storescp.port],
        }
        orthanc = OrthancServer(work / "orthanc", extra={"DicomModalities": modalities}).start()
        runs: dict[str, list[float]] = {}
        try:
            DcmqrscpServer.load(orthanc.ae_title, orthanc.dicom_port, work / "corpus")
            print(
                f"{len(files)} files of {args.size}x{args.size} in {len(uids)} studies; fiona"
                f" with max_associations {', '.join(map(str, lanes))}, dcmtk one study at a"
                f" time; {args.repeat} rounds, each tool in turn"
            )
            for _ in range(args.repeat):
                for method, tool in (("move", "movescu"), ("get", "getscu")):
                    for n, k, base in setups:
                        repo = args.baseline.resolve() if base else REPO
                        seconds = _fiona(work, orthanc, fiona_port, method, uids, n, k, repo)
                        runs.setdefault(_name(method, n, k, base), []).append(seconds)
                    seconds = _dcmtk(work, orthanc, tool, uids, storescp.port)
                    runs.setdefault(tool, []).append(seconds)
        finally:
            orthanc.stop()
            storescp.stop()
        _report(len(files), runs, setups)
    return 0


def _name(method: str, lanes: int, nodes: int, base: str) -> str:
    return f"fiona C-{method.upper()} x{lanes}" + (f" {nodes} nodes" if nodes > 1 else "") + base


def _report(files: int, runs: dict[str, list[float]], setups: list[tuple[int, int, str]]) -> None:
    """files/s of each (median of the rounds) and fiona's ratio to dcmtk (median of the
    rounds' ratios: each round's runs were close in time)."""
    for name, seconds in runs.items():
        mid = statistics.median(seconds)
        print(f"{name:<32} {files / mid:8.1f} files/s  ({mid:.1f} s)")
    for method, tool in (("move", "movescu"), ("get", "getscu")):
        for n, k, base in setups:
            name = _name(method, n, k, base)
            ratio = statistics.median(t / o for t, o in zip(runs[tool], runs[name], strict=True))
            print(f"{name} / {tool}: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
