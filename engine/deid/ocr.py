"""Burned-in text found by OCR: Tesseract (Debian ``tesseract-ocr``, ``tesseract-ocr-eng``),
on the pixels of the images a project chooses.

A project turns it on in its burned-in policy (``schemas/pixels.schema.json``,
``$defs/burned_in_policy/properties/ocr``)::

    burned_in:
      ocr:
        apply_to: held            # or all, or {sop_classes: [...], modalities: [US, OT]}
        action: redact            # or hold
        margin_px: 4

:func:`ocr_pixels` reads every frame, finds text boxes, and then either holds the file with the
boxes' positions (``hold``) or blacks the boxes out, with the margin, in every frame and reads
the frames again, holding the file when anything legible is left (``redact``). Recognised text
is never kept, logged or quoted: a :class:`TextBox` is a position and a confidence.

The ``tesseract`` program reads each image from a pipe and writes its word table to one (the
way pytesseract runs it, but without the temporary image files pytesseract writes, readable
by others, to the system's temp folder): no picture of a patient's text touches the disk.

Each frame is windowed to 8 bits (its own minimum to maximum; RGB as luminance), images
smaller than :data:`UPSCALE_BELOW` pixels are enlarged twice, and Tesseract reads one image
holding the frame inverted above the frame as it is (light text on dark and dark text on
light in one call), in sparse-text mode (``--psm 11``), binarised by Otsu's global threshold
or, with ``binarization: sauvola``, a local one; with ``rotated: true`` the frame turned a
quarter each way is read too (vertical labels), at about 1.7 times the time. Identical
frames are read once. The time per image is bounded by ``timeout_s``; an image that takes
longer is held.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset

from engine.deid.pixels import CleanFailed, HeaderFields, Region, clean_pixels, native_pixels

__all__ = [
    "OcrAction",
    "OcrPolicy",
    "TextBox",
    "describe_boxes",
    "find_text",
    "ocr_pixels",
    "tesseract_problem",
]

#: Images whose longer side is below this many pixels are enlarged twice before reading.
UPSCALE_BELOW = 400
#: Tesseract's thresholding_method for each ``binarization``: Otsu over the whole image, or
#: Sauvola's local threshold (finds dim text on dark ground; more false alarms on speckle).
_THRESHOLDING = {"otsu": 0, "sauvola": 2}
#: Words less than this many pixels high are not counted (no legible glyph is that small).
MIN_HEIGHT = 6
#: Rows of white between the inverted and the plain frame in the image Tesseract reads.
_GAP = 8
#: Rounds of blacking out and reading again before a file whose text keeps being read is held.
REDACTIONS = 3
#: Boxes named in a hold reason (the rest are counted).
_NAMED = 8


class OcrAction(StrEnum):
    """What a project does with text OCR finds: hold the file, or black the text out."""

    HOLD = "hold"
    REDACT = "redact"


@dataclass(frozen=True)
class TextBox:
    """Where text was read: frame (0-based), x, y (columns and rows from the top-left corner),
    width and height in pixels, and Tesseract's confidence (0-100). Never the text."""

    frame: int
    x: int
    y: int
    width: int
    height: int
    confidence: float

    def region(self, margin: int, rows: int, columns: int) -> Region:
        """The box grown by ``margin`` pixels on every side, clipped to the image."""
        x0, y0 = max(self.x - margin, 0), max(self.y - margin, 0)
        x1 = min(self.x + self.width + margin, columns)
        y1 = min(self.y + self.height + margin, rows)
        return Region(x0, y0, max(x1 - x0, 1), max(y1 - y0, 1))


@dataclass(frozen=True)
class OcrPolicy:
    """A project's OCR settings (``burned_in.ocr``); see the schema for each field."""

    action: OcrAction = OcrAction.HOLD
    apply_to: str = "held"  # "held", "all" or "chosen" (sop_classes / modalities below)
    sop_classes: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()
    margin_px: int = 4
    min_confidence: float = 50.0
    min_characters: int = 2
    languages: tuple[str, ...] = ("eng",)
    timeout_s: float = 60.0
    binarization: str = "otsu"
    rotated: bool = False

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> OcrPolicy:
        """From the policy's ``ocr`` mapping, validated and with the schema's defaults."""
        apply_to = doc.get("apply_to", "held")
        chosen = apply_to if isinstance(apply_to, Mapping) else {}
        return cls(
            action=OcrAction(doc.get("action", "hold")),
            apply_to="chosen" if isinstance(apply_to, Mapping) else str(apply_to),
            sop_classes=frozenset(str(v) for v in chosen.get("sop_classes", ())),
            modalities=frozenset(str(v).strip().upper() for v in chosen.get("modalities", ())),
            margin_px=int(doc.get("margin_px", 4)),
            min_confidence=float(doc.get("min_confidence", 50)),
            min_characters=int(doc.get("min_characters", 2)),
            languages=tuple(doc.get("languages", ("eng",))),
            timeout_s=float(doc.get("timeout_s", 60)),
            binarization=str(doc.get("binarization", "otsu")),
            rotated=bool(doc.get("rotated", False)),
        )

    def applies(self, ds: HeaderFields, *, held: bool, implied_modality: str = "") -> bool:
        """Whether OCR reads this image: every image (``all``), the images the header policy
        holds (``held``), or those of the chosen SOP classes and modalities (Modality
        (0008,0060) case-insensitive; ``implied_modality`` when it is absent)."""
        if self.apply_to == "all":
            return True
        if self.apply_to == "held":
            return held
        if str(ds.get("SOPClassUID", "") or "").strip() in self.sop_classes:
            return True
        modality = str(ds.get("Modality", "") or "").strip().upper() or implied_modality
        return modality in self.modalities


# --------------------------------------------------------------------------- Tesseract


def _command() -> str | None:
    """The ``tesseract`` program on the PATH (None when there is none)."""
    return shutil.which("tesseract")


@functools.cache
def tesseract_problem(languages: tuple[str, ...] = ("eng",)) -> str | None:
    """Why OCR cannot run here (None when it can): no ``tesseract`` program on the PATH, or
    no language data for one of ``languages``."""
    command = _command()
    if command is None:
        return (
            "OCR needs the tesseract program (not found on the PATH): install the Debian "
            "packages tesseract-ocr and tesseract-ocr-eng"
        )
    try:
        done = subprocess.run(
            [command, "--list-langs"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:  # a broken installation
        return f"tesseract does not run: {type(exc).__name__}"
    installed = {line.strip() for line in done.stdout.splitlines()[1:]}
    missing = [lang for lang in languages if lang not in installed]
    if missing:
        packages = ", ".join(f"tesseract-ocr-{m.replace('_', '-').lower()}" for m in missing)
        return f"tesseract has no language data for {', '.join(missing)} (install {packages})"
    return None


class OcrFailed(Exception):
    """Tesseract failed or took longer than the image's time; the message is PHI-free."""


def _gray_frames(ds: Dataset) -> list[Any]:
    """Every frame of native ``ds`` as an 8-bit grey image (numpy, rows x columns): RGB as
    luminance, grey windowed from the frame's minimum to its maximum. A flat frame (one value)
    carries no text and is None."""
    import numpy as np

    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    arr = arr.reshape(frames, int(ds.Rows), int(ds.Columns), samples)
    out: list[Any] = []
    for frame in arr:
        if samples == 3:
            grey = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        else:
            grey = frame[..., 0].astype(np.float32)
        low, high = float(grey.min()), float(grey.max())
        if high <= low:
            out.append(None)
            continue
        out.append(((grey - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8))
    return out


@dataclass(frozen=True)
class _Panel:
    """One view of the frame in the sheet: rows ``top`` to ``top + height`` of the sheet,
    turned ``turn`` quarter turns (numpy ``rot90``: 1 anticlockwise, -1 clockwise)."""

    top: int
    height: int
    width: int
    turn: int


def _sheet(grey: Any, rotated: bool) -> tuple[Any, int, list[_Panel]]:
    """The image Tesseract reads for one 8-bit frame: the frame inverted and as it is (both
    polarities in one call), and with ``rotated`` the same turned a quarter each way, one
    under the other with white between; enlarged twice when the frame is small. Returns the
    image (8-bit, numpy), its scale and where each view is."""
    import numpy as np
    from PIL import Image

    views = [(255 - grey, 0), (grey, 0)]
    if rotated:
        views += [(np.rot90(v, turn), turn) for turn in (-1, 1) for v in (255 - grey, grey)]
    width = max(v.shape[1] for v, _ in views)
    parts: list[Any] = []
    panels: list[_Panel] = []
    top = 0
    for view, turn in views:
        if parts:
            parts.append(np.full((_GAP, width), 255, np.uint8))
            top += _GAP
        parts.append(np.pad(view, ((0, 0), (0, width - view.shape[1])), constant_values=255))
        panels.append(_Panel(top, view.shape[0], view.shape[1], turn))
        top += view.shape[0]
    sheet = np.concatenate(parts)
    if max(grey.shape) >= UPSCALE_BELOW:
        return sheet, 1, panels
    image = Image.fromarray(sheet)
    size = (image.width * 2, image.height * 2)
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS)), 2, panels


def _unturn(
    box: tuple[int, int, int, int], panel: _Panel, rows: int, columns: int
) -> tuple[int, int, int, int]:
    """A box (x, y, w, h) in ``panel``'s own coordinates, back in the frame's."""
    x, y, w, h = box
    if panel.turn == -1:  # clockwise: view[i, j] = frame[rows - 1 - j, i]
        return y, rows - x - w, h, w
    if panel.turn == 1:  # anticlockwise: view[i, j] = frame[j, columns - 1 - i]
        return columns - y - h, x, h, w
    return box


def _tesseract(sheet: Any, policy: OcrPolicy, deadline: float) -> dict[str, list[Any]]:
    """Tesseract's word table (its ``tsv`` output, by column) for an 8-bit image, within the
    time left. The image goes to the program through a pipe, as PNM, and the table comes
    back through one: no image of a patient's text is ever written to disk. The program runs
    on one thread (``OMP_THREAD_LIMIT=1``): one image per core."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise OcrFailed(f"OCR took longer than {policy.timeout_s:g} s")
    rows, columns = sheet.shape
    command = [
        _command() or "tesseract", "stdin", "stdout",
        "-l", "+".join(policy.languages),
        "--psm", "11",
        "-c", f"thresholding_method={_THRESHOLDING[policy.binarization]}",
        "tsv",
    ]  # fmt: skip
    image = f"P5\n{columns} {rows}\n255\n".encode("ascii") + sheet.tobytes()
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        done = subprocess.run(
            command, input=image, capture_output=True, timeout=remaining, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:  # the program is killed
        raise OcrFailed(f"OCR took longer than {policy.timeout_s:g} s") from exc
    except OSError as exc:
        raise OcrFailed(f"OCR failed ({type(exc).__name__})") from exc
    if done.returncode != 0:
        raise OcrFailed(f"OCR failed (tesseract exit status {done.returncode})")
    lines = done.stdout.decode("utf-8", "replace").splitlines()
    names = lines[0].split("\t") if lines else []
    table: dict[str, list[Any]] = {name: [] for name in names}
    for line in lines[1:]:
        cells = line.split("\t", len(names) - 1)
        if len(cells) != len(names):
            continue
        for name, cell in zip(names, cells, strict=True):
            table[name].append(_cell(name, cell))
    if "text" not in table:
        raise OcrFailed("OCR failed (tesseract wrote no word table)")
    return table


def _cell(name: str, cell: str) -> str | float | int:
    """A cell of the word table: text, a confidence (0-100, -1 for non-words) or a number."""
    if name == "text":
        return cell
    return float(cell) if name == "conf" else int(cell)


def _words(
    data: dict[str, list[Any]], scale: int, policy: OcrPolicy
) -> Iterator[tuple[tuple[int, int, int, int], int, tuple[int, int, int]]]:
    """The words of Tesseract's table that count as text (``min_confidence``,
    ``min_characters``, :data:`MIN_HEIGHT`): their box in the sheet at scale 1, confidence
    and line (block, paragraph, line). Never the word."""
    for i, word in enumerate(data["text"]):
        confidence = float(data["conf"][i])
        if confidence < policy.min_confidence:
            continue
        if sum(ch.isalnum() for ch in word) < policy.min_characters:
            continue
        h = -(-data["height"][i] // scale)
        if h < MIN_HEIGHT:  # speckle read as letters: nobody reads text this small
            continue
        box = (data["left"][i] // scale, data["top"][i] // scale, -(-data["width"][i] // scale), h)
        yield box, int(confidence), (data["block_num"][i], data["par_num"][i], data["line_num"][i])


def _read(grey: Any, policy: OcrPolicy, deadline: float) -> list[tuple[int, int, int, int, float]]:
    """Boxes (x, y, width, height, confidence) of the lines Tesseract reads in one 8-bit
    frame, in both polarities: each the union of the line's words of at least
    ``min_confidence``, ``min_characters`` and :data:`MIN_HEIGHT` (its lowest word
    confidence), once. The text read is dropped here, never returned."""
    rows, columns = grey.shape
    sheet, scale, panels = _sheet(grey, policy.rotated)
    lines: dict[tuple[int, ...], list[int]] = {}  # words kept, by their line: x0 y0 x1 y1 conf
    data = _tesseract(sheet, policy, deadline)
    for (x, y, w, h), confidence, line_of in _words(data, scale, policy):
        at = next((n for n, p in enumerate(panels) if p.top <= y < p.top + p.height), None)
        if at is None or x >= panels[at].width:  # in a gap or the padding
            continue
        panel = panels[at]
        y -= panel.top
        box = (x, y, min(w, panel.width - x), min(h, panel.height - y))
        x, y, w, h = _unturn(box, panel, rows, columns)
        line = lines.setdefault((at, *line_of), [x, y, x + w, y + h, confidence])
        line[:4] = [min(line[0], x), min(line[1], y), max(line[2], x + w), max(line[3], y + h)]
        line[4] = min(line[4], confidence)
    found: dict[tuple[int, int, int, int], float] = {}  # a line read in two views: once
    for x0, y0, x1, y1, confidence in lines.values():
        key = (x0, y0, x1 - x0, y1 - y0)
        found[key] = max(found.get(key, 0.0), float(confidence))
    return sorted((*key, confidence) for key, confidence in found.items())


def find_text(ds: Dataset, policy: OcrPolicy) -> list[TextBox]:
    """Text boxes in every frame of native (uncompressed) ``ds``; raises :class:`OcrFailed`."""
    deadline = time.monotonic() + policy.timeout_s
    found: list[TextBox] = []
    seen: dict[bytes, list[tuple[int, int, int, int, float]]] = {}
    for index, grey in enumerate(_gray_frames(ds)):
        if grey is None:
            continue
        key = hashlib.blake2b(grey.tobytes(), digest_size=16).digest()
        if key not in seen:
            seen[key] = _read(grey, policy, deadline)
        found += [TextBox(index, x, y, w, h, c) for x, y, w, h, c in seen[key]]
    return found


def describe_boxes(boxes: Sequence[TextBox]) -> str:
    """``frame 1 (x 12, y 8, w 200, h 20), ...``: positions only (frames counted from 1)."""
    named = ", ".join(
        f"frame {b.frame + 1} (x {b.x}, y {b.y}, w {b.width}, h {b.height})" for b in boxes[:_NAMED]
    )
    more = len(boxes) - _NAMED
    return named + (f" and {more} more" if more > 0 else "")


def _plural(n: int) -> str:
    return "1 text box" if n == 1 else f"{n} text boxes"


def ocr_pixels(
    ds: Dataset, policy: OcrPolicy, *, text_expected: bool = False
) -> CleanFailed | bool:
    """Read ``ds``'s frames and apply the policy's action, in place.

    Returns False when no text was found (``ds`` then holds decoded pixels, but nothing was
    blacked out: the caller may export the original bytes), True when text was blacked out
    (``action: redact``) and a second reading found none, and :class:`CleanFailed` when the
    file must be held: text found with ``action: hold``, text still legible after redaction,
    no text found although ``text_expected`` (BurnedInAnnotation (0028,0301) YES), pixels
    that cannot be decoded, or OCR that failed or took longer than ``timeout_s``. The detail
    names box positions, never text.
    """
    failed = native_pixels(ds)
    if failed is not None:
        return failed
    try:
        boxes = find_text(ds, policy)
    except OcrFailed as exc:
        return CleanFailed(str(exc))
    if not boxes:
        if text_expected:
            return CleanFailed("BurnedInAnnotation YES but OCR found no text to black out")
        return False
    if policy.action is OcrAction.HOLD:
        return CleanFailed(f"OCR found {_plural(len(boxes))}: {describe_boxes(boxes)}")
    rows, columns = int(ds.Rows), int(ds.Columns)
    for _ in range(REDACTIONS):
        # Every box of any frame, in every frame: text that moves between frames goes too.
        regions = sorted({b.region(policy.margin_px, rows, columns) for b in boxes}, key=repr)
        failed = clean_pixels(ds, regions)
        if failed is not None:
            return failed
        try:
            boxes = find_text(ds, policy)
        except OcrFailed as exc:
            return CleanFailed(f"after redaction: {exc}")
        if not boxes:
            return True
    return CleanFailed(
        f"OCR still reads {_plural(len(boxes))} after redaction: {describe_boxes(boxes)}"
    )
