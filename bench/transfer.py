"""Transfer benchmark: the ``dicom`` destination against dcmtk's storescu, into dcmtk's storescp.

Run from the repo root: ``python bench/transfer.py [--files N] [--sizes 512,64] [--repeat R]``.
For each image size (512x512 16-bit MR: 0.5 MB a file; 64x64: 8 KB), the same files go on one
association from each sender to a fresh storescp, senders taking turns within each round so a
slow spell of the disk hits both; the median of the rounds is printed as files/s and MB/s, with
the ratio of fiona's rate to storescu's. storescp runs with Nagle off (TCP_NODELAY=1, as Orthanc
is started in the tests) and with Nagle on (dcmtk's default); storescu always has it off, as
fiona does.

``--no-store`` runs storescp with ``--ignore`` (it receives every byte but writes nothing), so
the figures are those of the senders rather than of the disk.

``--pynetdicom`` adds pynetdicom's own ``Association.send_c_store`` by file path, with
TCP_NODELAY set on its socket (as it ships, Nagle caps it near 20 files/s), and counts the runs
it stalled in (a C-STORE response lost, the DIMSE timeout reached: see
``engine/transfer/dicom.py``); its DIMSE timeout is cut to 5 s to keep it short.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from engine.transfer.base import InstanceResult, OutgoingInstance, StudyBatch  # noqa: E402
from engine.transfer.dicom import DicomDestination  # noqa: E402
from tests.peers import StorescpServer, dcmtk  # noqa: E402
from tests.synth import make_corpus  # noqa: E402

#: A sender: (files, the batch holding them, storescp's port) -> seconds, or None if it failed.
Sender = Callable[[list[Path], StudyBatch, int], float | None]


def batch_of(files: list[Path]) -> StudyBatch:
    """All files in one batch, so fiona, like storescu, sends them on one association (the
    corpus spans several studies, which the destination does not look at)."""
    instances = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        instances.append(
            OutgoingInstance(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                str(ds.SeriesInstanceUID),
                f,
                f.stat().st_size,
            )
        )
    return StudyBatch(0, "bench", "", "", "", 0, tuple(instances))


def fiona(files: list[Path], batch: StudyBatch, port: int) -> float | None:
    options = {"type": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "ANY"}
    dest = DicomDestination("bench", options, REPO / "bench.yaml")
    results: list[InstanceResult] = []
    start = time.perf_counter()
    dest.send(batch, frozenset(), results.append)
    elapsed = time.perf_counter() - start
    if len(results) != len(files) or not all(r.ok for r in results):
        raise RuntimeError("the dicom destination did not deliver every file")
    return elapsed


def storescu(files: list[Path], batch: StudyBatch, port: int) -> float | None:
    cmd = [dcmtk("storescu"), "-aec", "ANY", "-aet", "BENCH", "127.0.0.1", str(port)]
    start = time.perf_counter()
    result = subprocess.run(
        [*cmd, *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def pynetdicom_scu(files: list[Path], batch: StudyBatch, port: int) -> float | None:
    """pynetdicom's send_c_store by path; None when a response was lost (a stall)."""
    import socket

    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, as fiona does
    ae = AE(ae_title="BENCH")
    ae.dimse_timeout = 5
    for cx in {(i.sop_class_uid, i.transfer_syntax) for i in batch.instances}:
        ae.add_requested_context(*cx)
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="ANY")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for f in files:
            if not assoc.send_c_store(f):
                return None
    finally:
        if assoc.is_established:
            assoc.release()
    return time.perf_counter() - start


def measure(
    senders: dict[str, Sender],
    files: list[Path],
    work: Path,
    repeat: int,
    *,
    nodelay: bool,
    store: bool,
) -> dict[str, tuple[float | None, int]]:
    """Median seconds per sender over ``repeat`` rounds (None if every run failed), and the
    number of failed runs; each run into a fresh storescp."""
    batch = batch_of(files)
    times: dict[str, list[float]] = {name: [] for name in senders}
    failed = dict.fromkeys(senders, 0)
    for i in range(repeat):
        for name, sender in senders.items():
            out = work / f"run-{name}-{i}-{time.monotonic_ns()}"
            args = () if store else ("--ignore",)
            with StorescpServer(out, args, nodelay=nodelay) as scp:
                seconds = sender(files, batch, scp.port)
            shutil.rmtree(out, ignore_errors=True)
            if seconds is None:
                failed[name] += 1
            else:
                times[name].append(seconds)
    return {
        name: (statistics.median(values) if values else None, failed[name])
        for name, values in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=400, help="files per corpus")
    parser.add_argument("--sizes", default="512,64", help="image sizes (pixels per side)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--pynetdicom", action="store_true", help="add pynetdicom's own SCU")
    parser.add_argument(
        "--no-store", dest="store", action="store_false", help="storescp --ignore: no disk"
    )
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its stall logs, counted below
    senders: dict[str, Sender] = {"storescu": storescu, "fiona": fiona}
    if args.pynetdicom:
        senders["pynetdicom"] = pynetdicom_scu
    with tempfile.TemporaryDirectory(prefix="fiona-bench-", dir=os.environ.get("BENCH_TMP")) as t:
        tmp = Path(t)
        print(
            f"{'image':>8} {'storescp':>9} {'sender':>10} {'files/s':>8} {'MB/s':>7}"
            f" {'vs storescu':>11} {'stalled':>8}"
        )
        for size in (int(s) for s in args.sizes.split(",")):
            files = make_corpus(tmp / f"corpus-{size}", args.files, size, seed=size)
            mb = sum(f.stat().st_size for f in files) / 1e6
            for nodelay in (True, False):
                results = measure(
                    senders, files, tmp, args.repeat, nodelay=nodelay, store=args.store
                )
                reference = results["storescu"][0]
                for name, (seconds, failed) in results.items():
                    rate = "-" if seconds is None else f"{len(files) / seconds:8.0f}"
                    mbs = "-" if seconds is None else f"{mb / seconds:7.1f}"
                    ratio = "-" if not (seconds and reference) else f"{reference / seconds:11.2f}"
                    print(
                        f"{f'{size}x{size}':>8} {'nodelay' if nodelay else 'nagle':>9}"
                        f" {name:>10} {rate:>8} {mbs:>7} {ratio:>11} {failed:>4}/{args.repeat}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
