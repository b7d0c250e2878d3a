"""De-identification benchmark: one synthetic corpus through several tools, one core each.

Run from the repo root: ``python bench/anonymize.py [--files N] [--sizes 512,64] [--repeat R]
[--jobs N]``. Needs the ``bench`` extra (``pip install -e '.[bench]'``: deid, dicognito); a tool
that is not installed is left out with a note.

Every tool runs as a whole process (interpreter start-up and imports included, as a user would
run it) on a folder of MR files made by ``tests.synth.make_corpus``, pinned to one core with
``taskset -c 0``, writing into a fresh output folder each time:

- ``deid``: pydicom/deid with its default recipe (see ``DEID_SCRIPT``), run through its Python
  API ``deid.dicom.get_files`` + ``replace_identifiers`` in a child interpreter, as deid has no
  command line for this;
- ``dicognito``: ``python -m dicognito --output-directory OUT IN``, its defaults (the
  ``dicognito`` console script of 0.19.0 is broken: it calls ``main()`` without arguments);
- ``pydicom r+w``: ``dcmread`` + ``save_as`` of every file, nothing changed: the floor for any
  pydicom-based de-identifier;
- ``cp -r``: the I/O floor;
- ``fiona``: ``fiona anonymize IN OUT --profile basic --secret-file F --jobs 1``, and with
  ``--jobs N`` (N > 1) one more row pinned to cores 0..N-1 (scaling across cores).

Tools take turns within each round (the starting tool rotates) so this VM's slow spells hit
all of them; the median of R rounds is printed, as files/s, MB/s (input bytes) and the ratio
to dicognito and to deid (above 1: faster). After every run, untimed, the output is checked:
the number of DICOM files written (``DICM`` at offset 128) must equal the corpus size, their
bytes must be at least 90% of the input (pixel data kept), and for de-identifiers no input
PatientName may be left in any header. A tool that fails these checks gets no row. Nothing is
fsynced by any tool; the output stays in the page cache, like the input (read once before).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from tests.synth import make_corpus  # noqa: E402

# deid's default recipe is the one ``DeidRecipe()`` loads when given no file: deid/data/
# deid.dicom (deid 0.4.13). Its %header section REMOVEs every element whose keyword ends with
# Date, Time, ID or IDs or contains UID (so SOPInstanceUID, SOPClassUID, Study/Series/
# FrameOfReference UIDs and the file meta's MediaStorageSOP*UID all go: the output is no longer
# a referenceable DICOM instance), the patient's names, addresses, phone numbers and comments,
# every physician / operator / reviewer name, AccessionNumber, and contains:Trial; then ADDs
# IssuerOfPatientID "STARR", PatientIdentityRemoved "YES", and PatientID, AccessionNumber,
# PatientBirthDate, StudyDate from variables (entity_id, item_id, entity_timestamp,
# item_timestamp) that nobody supplies here, so they stay absent. It KEEPs everything else,
# e.g. InstitutionName, InstitutionAddress, StationName, DeviceSerialNumber, PatientAge/Sex/
# Weight, private tags (remove_private defaults to False). Its %filter sections only flag
# images for pixel scrubbing; replace_identifiers does not use them.
#
# The recipe is loaded once and passed in: replace_identifiers(deid=None) would build a fresh
# DeidRecipe (re-parse the recipe file) for every file, which ~triples deid's time on small
# files and is not what a careful user does. Files are passed one at a time with the output
# folder that mirrors the input's: deid's save_dicom keeps only the basename, so one output
# folder for our corpus (study000/1/1.dcm, study000/2/1.dcm, ...) makes it skip every clash
# ("already exists, overwrite set to False. Not writing.") and write half the files.
DEID_SCRIPT = """
import os, sys
from deid.config import DeidRecipe
from deid.dicom import get_files, replace_identifiers
src, out = sys.argv[1], sys.argv[2]
recipe = DeidRecipe()
for path in get_files(src):
    dest = os.path.join(out, os.path.relpath(os.path.dirname(path), src))
    os.makedirs(dest, exist_ok=True)
    replace_identifiers([path], deid=recipe, save=True, output_folder=dest)
"""

PYDICOM_SCRIPT = """
import os, sys
import pydicom
src, out = sys.argv[1], sys.argv[2]
for folder, _, names in os.walk(src):
    dest = os.path.join(out, os.path.relpath(folder, src))
    os.makedirs(dest, exist_ok=True)
    for name in names:
        pydicom.dcmread(os.path.join(folder, name)).save_as(os.path.join(dest, name))
"""


class Unavailable(Exception):
    """The tool is not installed / not implemented; its row is left out."""


@dataclass
class Tool:
    name: str
    argv: list[str]  # with IN and OUT placeholders
    cores: str = "0"
    deidentifies: bool = True
    times: list[float] = field(default_factory=list)
    failed: str | None = None

    def command(self, src: Path, out: Path, pin: bool) -> list[str]:
        repl = {"IN": str(src), "OUT": str(out)}
        cmd = [repl.get(a, a) for a in self.argv]
        return ["taskset", "-c", self.cores, *cmd] if pin else cmd


def can_pin() -> bool:
    if shutil.which("taskset") is None:
        return False
    return subprocess.run(["taskset", "-c", "0", "true"], capture_output=True).returncode == 0


def fiona_argv(secret: Path, jobs: int) -> list[str]:
    # --no-sync: the other tools leave their output in the page cache too; by default fiona
    # flushes it to disk (os.sync) before it reports, which costs ~1 s per 200 MB here.
    # --no-progress: no progress bar drawing in the timed run. The burned-in gate and the
    # verification gate run as always: they are part of what fiona anonymize promises.
    return [
        sys.executable, "-m", "engine.cli", "anonymize", "IN", "OUT",
        "--profile", "basic", "--secret-file", str(secret), "--jobs", str(jobs),
        "--no-sync", "--no-progress",
    ]  # fmt: skip


def not_a_command(stderr: str) -> bool:
    """argparse's answer when ``anonymize`` is not a sub-command of fiona yet."""
    return "invalid choice" in stderr and "anonymize" in stderr


def count_dicom(out: Path) -> tuple[int, int, list[Path]]:
    """(DICOM files under out, their total bytes, their paths)."""
    paths: list[Path] = []
    total = 0
    for folder, _, names in os.walk(out):
        for name in names:
            path = Path(folder, name)
            with path.open("rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                paths.append(path)
                total += path.stat().st_size
    return len(paths), total, paths


def names_left(paths: list[Path], names: set[bytes]) -> int:
    """Files whose header (bytes before Pixel Data) still holds an input PatientName."""
    left = 0
    for path in paths:
        data = path.read_bytes()
        cut = data.rfind(b"\xe0\x7f\x10\x00")
        header = data if cut < 0 else data[:cut]
        if any(n in header for n in names):
            left += 1
    return left


def run_once(
    tool: Tool, src: Path, out: Path, pin: bool, n_files: int, in_bytes: int, names: set[bytes]
) -> float:
    """Seconds for one whole-process run of tool; raises on a failed or incomplete run."""
    cmd = tool.command(src, out, pin)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        if tool.name.startswith("fiona") and not_a_command(result.stderr):
            raise Unavailable("not available yet")
        raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip()[-800:]}")
    found, out_bytes, paths = count_dicom(out)
    if found != n_files:
        raise RuntimeError(f"wrote {found} DICOM files, expected {n_files}")
    if out_bytes < 0.9 * in_bytes:
        raise RuntimeError(f"wrote {out_bytes} bytes for {in_bytes} input bytes")
    if tool.deidentifies and (left := names_left(paths, names)):
        raise RuntimeError(f"PatientName left in {left} of {found} files")
    return elapsed


def corpus_names(files: list[Path]) -> set[bytes]:
    names = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
        names.add(str(ds.PatientName).encode())
    return names


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=400, help="files per corpus")
    parser.add_argument("--sizes", default="512,64", help="image sizes (pixels per side)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per measurement (median)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="when > 1, one more fiona row with --jobs N"
    )
    args = parser.parse_args()

    pin = can_pin()
    if not pin:
        print("note: taskset not usable here; tools are NOT pinned to one core", file=sys.stderr)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.jobs > 1 and ncpu and args.jobs > ncpu:
        print(f"note: --jobs {args.jobs} on {ncpu} cores", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="fiona-bench-", dir=os.environ.get("BENCH_TMP")) as t:
        tmp = Path(t)
        secret = tmp / "secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)

        tools: list[Tool] = []
        if importlib.util.find_spec("deid") is not None:
            tools.append(Tool("deid", [sys.executable, "-c", DEID_SCRIPT, "IN", "OUT"]))
        else:
            print("note: deid not installed (pip install deid); its row is left out")
        if importlib.util.find_spec("dicognito") is not None:
            tools.append(
                Tool(
                    "dicognito",
                    [sys.executable, "-m", "dicognito", "--output-directory", "OUT", "IN"],
                )
            )
        else:
            print("note: dicognito not installed (pip install dicognito); its row is left out")
        tools.append(
            Tool(
                "pydicom r+w",
                [sys.executable, "-c", PYDICOM_SCRIPT, "IN", "OUT"],
                deidentifies=False,
            )
        )
        tools.append(Tool("cp -r", ["cp", "-r", "IN", "OUT"], deidentifies=False))
        tools.append(Tool("fiona", fiona_argv(secret, 1)))
        if args.jobs > 1:
            tools.append(
                Tool(
                    f"fiona -j{args.jobs}",
                    fiona_argv(secret, args.jobs),
                    cores=f"0-{args.jobs - 1}",
                )
            )

        print(
            f"{'image':>8} {'tool':>12} {'files/s':>9} {'MB/s':>8} {'/dicognito':>10} {'/deid':>6}"
        )
        status = 0
        for size in (int(s) for s in args.sizes.split(",")):
            src = tmp / f"corpus-{size}"
            files = make_corpus(src, args.files, size, seed=size)
            in_bytes = sum(f.stat().st_size for f in files)
            names = corpus_names(files)
            for tool in tools:
                tool.times, tool.failed = [], None
            for i in range(args.repeat):
                k = i % len(tools)
                for tool in tools[k:] + tools[:k]:
                    if tool.failed:
                        continue
                    out = tmp / f"out-{tool.name.replace(' ', '_')}-{size}-{i}"
                    try:
                        tool.times.append(
                            run_once(tool, src, out, pin, len(files), in_bytes, names)
                        )
                    except Unavailable as exc:
                        tool.failed = str(exc)
                    except RuntimeError as exc:
                        tool.failed = f"FAILED: {exc}"
                        status = 1
                    shutil.rmtree(out, ignore_errors=True)
            median = {t.name: statistics.median(t.times) for t in tools if not t.failed}
            label = f"{size}x{size}"
            for tool in tools:
                if tool.failed:
                    print(f"{label:>8} {tool.name}: {tool.failed}", flush=True)
                    continue
                sec = median[tool.name]
                ratios = [
                    f"{median[ref] / sec:.2f}" if ref in median else "-"
                    for ref in ("dicognito", "deid")
                ]
                rate, mbps = len(files) / sec, in_bytes / 1e6 / sec
                print(
                    f"{label:>8} {tool.name:>12} {rate:9.0f} {mbps:8.1f}"
                    f" {ratios[0]:>10} {ratios[1]:>6}",
                    flush=True,
                )
            shutil.rmtree(src)
    return status


if __name__ == "__main__":
    sys.exit(main())
