"""Conversion benchmark: fiona's convert path per series against dcm2niix run by hand.

Run from the repo root: ``python bench/convert.py [--size 256] [--repeat 5]``. Needs
``dcm2niix`` (Debian package).

For each synthetic MR series (T1w, BOLD, DWI with directions, a phase-difference fieldmap;
``tests/synth.py``), de-identified once by fiona's basic profile (untimed) as the anonymize
step would, two ways take turns in each round on the same de-identified files (the first one
alternating):

- ``by hand``: ``dcm2niix -z y -b y -ba y -f x -o OUT IN``, as a researcher would run it;
- ``fiona``: what the convert step does for one series: the original series' identifying
  values (every header read), dcm2niix with fiona's fixed arguments
  (:func:`engine.pipeline.nifti.convert_series`), then the output names checked, the sidecars
  cleaned of dates and searched by the verification gate with the NIfTI header text
  (:func:`engine.pipeline.nifti.check_outputs`).

Both write to fresh folders on the same disk; nothing is fsynced. The median of the rounds is
printed per series, in milliseconds, with the ratio fiona / by hand (the target: at most 1.2,
the difference being fiona's checks).
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from engine.deid import Deidentifier, load_profile  # noqa: E402
from engine.deid.export import Exported, Exporter  # noqa: E402
from engine.deid.verify import IdentifyingValues  # noqa: E402
from engine.pipeline.nifti import check_outputs, convert_series, dcm2niix_path  # noqa: E402
from tests import synth  # noqa: E402

SERIES = {
    "T1w (MPRAGE)": synth.MR_SERIES["t1_mprage"],
    "BOLD": synth.MR_SERIES["bold"],
    "DWI, 4 directions": synth.BIDS_SERIES["dwi_dirs"],
    "fieldmap": synth.BIDS_SERIES["fieldmap"],
}


def _by_hand(tool: str, source: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [tool, "-z", "y", "-b", "y", "-ba", "y", "-f", "x", "-o", str(out), str(source)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


def _fiona(original: Path, source: Path, out: Path) -> float:
    started = time.perf_counter()
    values = IdentifyingValues()
    for path in sorted(original.iterdir()):
        values.add(pydicom.dcmread(path, stop_before_pixels=True))
    converted = convert_series(source, out, "series-001", values=values)
    check_outputs(converted, values, keep_dates=False)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (the median is shown)")
    args = parser.parse_args(argv)
    tool = dcm2niix_path()
    if tool is None:
        print("dcm2niix is not installed (Debian package dcm2niix)", file=sys.stderr)
        return 1
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    print(f"dcm2niix {version.stdout.strip().splitlines()[-1]}; {args.size}x{args.size} images,"
          f" median of {args.repeat} rounds")  # fmt: skip
    print(f"{'series':<20} {'files':>5} {'by hand ms':>11} {'fiona ms':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="fiona-bench-convert-") as tmp:
        root = Path(tmp)
        spec = synth.make_study_spec(7)
        profile = load_profile("basic", [], {})
        exporter = Exporter(Deidentifier(profile, secrets.token_bytes(32), None, "bench"))
        for i, (name, series) in enumerate(SERIES.items(), start=1):
            original, source = root / f"orig{i}", root / f"in{i}"
            source.mkdir()
            datasets = synth.make_series(spec, series, i, size=args.size)
            for k, ds in enumerate(datasets):
                path = synth.write_dataset(ds, original / f"{k:05d}.dcm")
                result = exporter.export(path.read_bytes(), subject="BENCH01")
                assert isinstance(result, Exported), result
                (source / f"{k:05d}.dcm").write_bytes(result.data)
            times: dict[str, list[float]] = {"hand": [], "fiona": []}
            for r in range(args.repeat):
                order = ["hand", "fiona"] if r % 2 == 0 else ["fiona", "hand"]
                for way in order:
                    out = root / f"out-{way}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    run = (
                        _by_hand(tool, source, out)
                        if way == "hand"
                        else _fiona(original, source, out)
                    )
                    times[way].append(run)
            hand = statistics.median(times["hand"]) * 1000
            ours = statistics.median(times["fiona"]) * 1000
            print(f"{name:<20} {len(datasets):>5} {hand:>11.1f} {ours:>9.1f} {ours / hand:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
