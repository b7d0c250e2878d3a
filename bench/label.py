"""The workflow's labelling cost: one tracker scan over a received corpus, header reads and all.

    python bench/label.py [--files 2000] [--size 64] [--runs 3]

The corpus (``tests/synth.py`` ``make_corpus``: MR studies of 4 series of 50 instances) is
received once through the real archive and index, as ``fiona serve`` files it (AE MR1, one
project routing it), with the site's default rule sets (every one under
``rulesets/classify/``). Each run copies that data dir and times one ``Tracker.scan`` of it:
the header read, labelling, routing and saving of every instance, as after a study goes
quiet. Two modes take turns within each run (the machine is shared): ``whole`` reads every
header whole (the labeller's ``header_tags`` set to None: what the tracker did before it read
only the tags the rules name), ``selective`` reads the first instance of each series whole
(routing) and the others for ``header_tags`` only. Printed per mode: the median wall-clock and
CPU (this process) milliseconds per instance, and the labels are checked equal.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.projects  # noqa: F401  (registers every project section, as fiona does)
from engine.config.loader import load_project, load_site
from engine.pipeline.store import RunStore
from engine.route.tracker import Tracker, site_labeller
from engine.store.archive import Archive
from engine.store.index import Origin, open_index
from tests.synth import make_corpus

PROJECT = {
    "name": "bench",
    "routing": {"calling_ae": ["MR1"]},
    "completeness": {"study_quiet_seconds": 100},
}


def received(tmp: Path, files: int, size: int) -> Path:
    """A site folder whose data dir holds the corpus as received."""
    (tmp / "projects").mkdir(parents=True)
    (tmp / "projects" / "bench.yaml").write_text(yaml.safe_dump(PROJECT))
    (tmp / "site.yaml").write_text(yaml.safe_dump({"data_dir": "data"}))
    site = load_site(tmp / "site.yaml")
    index = open_index("", site.data_dir / "index.sqlite")
    archive = Archive(site.data_dir, index)
    for path in make_corpus(tmp / "corpus", files, size):
        outcome = archive.receive(path.read_bytes(), Origin("dimse", "MR1", "FIONA", "10.0.0.9"))
        assert outcome.status == 0, outcome
    index.close()
    shutil.rmtree(tmp / "corpus")
    return tmp


def scan(base: Path, run: Path, selective: bool) -> tuple[float, float, list[tuple[str, str]]]:
    """Wall-clock and CPU seconds of one scan of a copy of ``base``, and the series labels."""
    shutil.copytree(base, run)
    site = load_site(run / "site.yaml")
    index = open_index("", site.data_dir / "index.sqlite")
    labeller = site_labeller(site)
    assert labeller is not None and labeller.header_tags is not None
    if not selective:
        labeller.header_tags = None
    tracker = Tracker(
        index,
        site.data_dir,
        site,
        [load_project(run / "projects" / "bench.yaml")],
        labeller,
        RunStore(index),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    tracker.scan(time.time() + 60)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with index.reading() as db:
        labels = db.execute("SELECT series_uid, labels FROM series ORDER BY 1").fetchall()
    index.close()
    shutil.rmtree(run)
    return wall, cpu, [(str(a), str(b)) for a, b in labels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="rows and columns of each image")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = received(Path(tmp) / "base", args.files, args.size)
        times: dict[str, list[tuple[float, float]]] = {"whole": [], "selective": []}
        labels: dict[str, list[tuple[str, str]]] = {}
        for n in range(args.runs):
            for mode in times:
                wall, cpu, labels[mode] = scan(base, Path(tmp) / f"{mode}{n}", mode == "selective")
                times[mode].append((wall, cpu))
        assert labels["whole"] == labels["selective"], "labels differ"
        for mode, runs in times.items():
            wall = statistics.median(w for w, _ in runs) * 1e3 / args.files
            cpu = statistics.median(c for _, c in runs) * 1e3 / args.files
            print(f"{mode:9s} {wall:.3f} ms/instance wall, {cpu:.3f} ms/instance CPU")
        print(f"labels equal over {len(labels['whole'])} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
