"""OCR benchmark: detection recall, false alarms and time per image of fiona's burned-in text
detector (engine/deid/ocr.py), on one core, against Tesseract's own command line.

Run from the repo root: ``python bench/ocr.py [--images N] [--repeat R]``. Needs Debian's
tesseract-ocr, tesseract-ocr-eng, fonts-dejavu-core and fonts-liberation (scripts/setup.sh).

The corpus is ``tests/ocr_images.py``'s: N synthetic screenshots, N ultrasound cines of two
frames (mono and RGB alternating), N CT dose screens (12 bit), all with text in several fonts
and sizes (white or grey on dark, dark on a light bar, on speckle); N ``hard`` images (text
7-9 pixels high, dim red text, a vertical label, text over the speckle); and 3 N images
without text (viewer background, speckle, CT slice). The process and the tesseract programs
it starts are pinned to core 0 (``sched_setaffinity``, inherited by children), with
``OMP_THREAD_LIMIT=1``.

- **recall**: planted lines found / lines planted, per frame; a line counts as found when the
  boxes cover at least half of it (``tests.ocr_images.line_found``), by kind and by text
  height (pixels);
- **false alarms**: images without text in which any box is found / images without text;
- **time**: ``find_text`` (``binarization`` otsu, the default, and sauvola; otsu with
  ``rotated``) on every image
  (decoded pixels in memory, all frames), as ms per frame and images per second on the one
  core; and the whole ``redact`` export (OCR, blackout, the second reading,
  de-identification) per image with text;
- **reference**: ``tesseract FRAME.png stdout --psm 11 tsv`` by hand on the same frames,
  windowed to 8 bits and written as PNG beforehand (one polarity, as it comes: light text on
  dark), its recall from its TSV and its time per frame; the ratio is fiona's time per frame
  over the command line's (fiona reads both polarities in one call).

Timings are the median of R rounds; this VM is shared, so expect noise of 10-20 %.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["OMP_THREAD_LIMIT"] = "1"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from engine.deid import Deidentifier, load_profile  # noqa: E402
from engine.deid.burned_in import BurnedInPolicy  # noqa: E402
from engine.deid.export import Exported, Exporter  # noqa: E402
from engine.deid.ocr import OcrPolicy, _gray_frames, find_text, tesseract_problem  # noqa: E402
from tests.ocr_images import (  # noqa: E402
    Case,
    Line,
    clean,
    dose,
    hard,
    line_found,
    screenshot,
    ultrasound,
)

#: fiona's settings measured: (column, binarization, rotated).
VARIANTS = [
    ("fiona otsu", "otsu", False),
    ("fiona sauvola", "sauvola", False),
    ("fiona otsu rotated", "otsu", True),
]


def corpus(n: int) -> tuple[list[Case], list[Case]]:
    """(images with text: ``n`` of each kind, ``hard`` ones included; 3 ``n`` without)."""
    text = [screenshot(s) for s in range(n)]
    text += [ultrasound(s, rgb=s % 2 == 1) for s in range(n)]
    text += [dose(s) for s in range(n)]
    text += [hard(s) for s in range(n)]
    return text, [clean(s) for s in range(3 * n)]


def band(line: Line) -> str:
    return "<12 px" if line.height < 12 else "12-16 px" if line.height <= 16 else ">16 px"


def recall(cases: list[Case], boxes_of: dict[str, dict[int, list[tuple[int, int, int, int]]]]):
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for case in cases:
        frames = int(case.dataset.get("NumberOfFrames", 1) or 1)
        kind = case.name.rsplit("-", 1)[0]
        for frame in range(frames):
            boxes = boxes_of[case.name].get(frame, [])
            for line in case.lines:
                hit = line_found(line, boxes)
                for key in ("all", kind, band(line)):
                    found[key][0] += hit
                    found[key][1] += 1
    return found


def fiona_pass(
    cases: list[Case], binarization: str = "otsu", rotated: bool = False
) -> tuple[float, dict[str, dict[int, list]]]:
    """Seconds for find_text over every case, and the boxes by case and frame."""
    policy = OcrPolicy(binarization=binarization, rotated=rotated)
    datasets = [copy.deepcopy(c.dataset) for c in cases]
    for ds in datasets:
        ds.pixel_array  # decoded before the clock starts, as the export path has it  # noqa: B018
    boxes: dict[str, dict[int, list]] = {}
    start = time.perf_counter()
    found = [find_text(ds, policy) for ds in datasets]
    elapsed = time.perf_counter() - start
    for case, got in zip(cases, found, strict=True):
        by_frame: dict[int, list] = defaultdict(list)
        for b in got:
            by_frame[b.frame].append((b.x, b.y, b.width, b.height))
        boxes[case.name] = by_frame
    return elapsed, boxes


def write_pngs(cases: list[Case], folder: Path) -> list[tuple[str, int, Path]]:
    out = []
    for case in cases:
        for frame, grey in enumerate(_gray_frames(copy.deepcopy(case.dataset))):
            path = folder / f"{case.name}-{frame}.png"
            Image.fromarray(grey if grey is not None else np.zeros((8, 8), np.uint8)).save(path)
            out.append((case.name, frame, path))
    return out


def cli_pass(pngs: list[tuple[str, int, Path]]) -> tuple[float, dict[str, dict[int, list]]]:
    """Seconds for ``tesseract PNG stdout --psm 11 tsv`` over every frame, and its boxes."""
    boxes: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    outputs = []
    start = time.perf_counter()
    for _, _, path in pngs:
        done = subprocess.run(
            ["tesseract", str(path), "stdout", "--psm", "11", "tsv"],
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(done.stdout)
    elapsed = time.perf_counter() - start
    for (name, frame, _), tsv in zip(pngs, outputs, strict=True):
        for row in tsv.splitlines()[1:]:
            cells = row.split("\t")
            if len(cells) < 12 or float(cells[10]) < 50:
                continue
            if sum(ch.isalnum() for ch in cells[11]) < 2 or int(cells[9]) < 6:
                continue
            x, y, w, h = (int(v) for v in cells[6:10])
            boxes[name][frame].append((x, y, w, h))
    return elapsed, boxes


def redact_pass(cases: list[Case]) -> tuple[float, int]:
    """Seconds for the whole redact export of every case, and how many came out."""
    policy = BurnedInPolicy.from_mapping({"ocr": {"action": "redact", "apply_to": "all"}})
    exporter = Exporter(Deidentifier(load_profile("basic"), b"b" * 48, project="b"), policy)
    blobs = []
    for case in cases:
        buffer = io.BytesIO()
        case.dataset.save_as(buffer, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    start = time.perf_counter()
    results = [exporter.export(blob) for blob in blobs]
    elapsed = time.perf_counter() - start
    return elapsed, sum(isinstance(r, Exported) for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6, help="images of each kind (default 6)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    args = parser.parse_args(argv)
    problem = tesseract_problem(("eng",))
    if problem is not None:
        print(f"bench/ocr.py: {problem}", file=sys.stderr)
        return 2
    try:
        os.sched_setaffinity(0, {0})
        pinned = "core 0"
    except (AttributeError, OSError):
        pinned = "NOT pinned"
    text, blank = corpus(args.images)
    everything = text + blank
    frames = sum(int(c.dataset.get("NumberOfFrames", 1) or 1) for c in everything)
    with tempfile.TemporaryDirectory() as tmp:
        pngs = write_pngs(everything, Path(tmp))
        times: dict[str, list[float]] = defaultdict(list)
        boxes: dict[str, dict[str, dict[int, list]]] = {}
        for _ in range(args.repeat):
            for name, binarization, rotated in VARIANTS:
                seconds, boxes[name] = fiona_pass(everything, binarization, rotated)
                times[name].append(seconds)
            seconds, boxes["tesseract CLI"] = cli_pass(pngs)
            times["tesseract CLI"].append(seconds)
            seconds, redacted = redact_pass(text)
            times["redact"].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    tools = [name for name, _, _ in VARIANTS] + ["tesseract CLI"]
    print(f"corpus: {len(text)} images with text, {len(blank)} without, {frames} frames; {pinned}")
    print(f"{'recall':<20}" + "".join(f"{t:>20}" for t in tools))
    found = {t: recall(text, boxes[t]) for t in tools}
    for key in sorted(found[tools[0]], key=lambda k: (k != "all", k)):
        cells = [found[t][key] for t in tools]
        print(f"  {key:<18}" + "".join(f"{a:>8}/{n:<4}{a / n:>8.1%}" for a, n in cells))
    alarms = [sum(any(boxes[t][c.name].values()) for c in blank) for t in tools]
    print(f"{'false alarms':<20}" + "".join(f"{a:>12}/{len(blank):<7}" for a in alarms))
    images = len(everything)
    print(f"{'ms per frame':<20}" + "".join(f"{1000 * median[t] / frames:>20.0f}" for t in tools))
    print(f"{'images/s, one core':<20}" + "".join(f"{images / median[t]:>20.2f}" for t in tools))
    cli = median["tesseract CLI"]
    print(f"{'time / CLI time':<20}" + "".join(f"{median[t] / cli:>20.2f}" for t in tools))
    redact_s = median["redact"]
    print(f"redact export, otsu (OCR, blackout, second reading, de-identification): "
          f"{1000 * redact_s / len(text):.0f} ms/image with text, {redacted}/{len(text)} "
          f"exported, the rest held")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
