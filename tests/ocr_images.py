"""Synthetic images with burned-in text, for the OCR detector's golden tests and bench/ocr.py.

Everything is generated from a seed: fake names, IDs and dates drawn with Pillow in fonts of
Debian's ``fonts-dejavu-core`` and ``fonts-liberation`` (``scripts/setup.sh`` installs them),
at several sizes, white or grey on dark, and dark on a light panel (inverted):

- ``screenshot``: a secondary capture of a viewer (512 x 640, MONOCHROME2, 8 bit), a dark
  gradient with a bright disc, text in the corners and a light title bar with dark text;
- ``ultrasound``: a sector of speckle noise (480 x 640) with the patient's line at the top and
  the scan parameters down the side; ``rgb`` frames with yellow and white text; multi-frame;
- ``dose``: a CT dose screen (512 x 512, MONOCHROME2, 16 bit with 12 stored): a table of
  series, CTDIvol and DLP, with the patient's name and ID above it;
- ``clean``: the same backgrounds with no text at all (the false-positive check);
- ``hard`` (bench only): tiny, dim, rotated text and text over speckle.

:func:`make_case` gives the dataset and the planted text lines (their boxes, never used as
anything but coordinates); :func:`line_found` is the recall criterion the tests and the bench
share.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSans-Bold.ttf",
    "LiberationSans-Regular.ttf",
    "LiberationMono-Regular.ttf",
    "LiberationSerif-Regular.ttf",
    "LiberationSansNarrow-Regular.ttf",
)
#: Text heights in pixels (the font size Pillow draws at).
SIZES = (14, 16, 20, 24, 32)
KINDS = ("screenshot", "ultrasound", "dose", "clean")

_FIRST = ("JANE", "JOHN", "MARIA", "PETER", "ANNA", "LUKAS", "SOFIA", "ERIK", "HELGA", "OMAR")
_LAST = ("DOE", "MILLER", "SORENSEN", "HUBER", "KOWALSKI", "BRANDT", "NOVAK", "LINDQVIST")


@dataclass(frozen=True)
class Line:
    """One planted line of text: its box in pixels (the same in every frame)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Case:
    """A synthetic image, its planted lines and how it was drawn."""

    name: str
    dataset: Dataset
    lines: tuple[Line, ...]


@functools.cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType font of the Debian font packages (OSError when they are not installed)."""
    for folder in FONT_DIRS:
        if (folder / name).exists():
            return ImageFont.truetype(str(folder / name), size)
    raise OSError(f"font {name} not found: install fonts-dejavu-core and fonts-liberation")


def _identity(rng: random.Random) -> list[str]:
    name = f"{rng.choice(_LAST)}, {rng.choice(_FIRST)}"  # as screens show it
    return [
        name,
        f"ID {rng.randrange(10**7, 10**8)}",
        f"DOB {rng.randrange(1930, 2010)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
        f"ACC {rng.randrange(10**5, 10**6)}",
        f"{rng.choice(_LAST).title()} Hospital",
    ]


def _draw(
    canvas: Image.Image,
    text: str,
    xy: tuple[int, int],
    rng: random.Random,
    fill: int | tuple[int, int, int],
    size: int | None = None,
) -> Line:
    draw = ImageDraw.Draw(canvas)
    name, points = rng.choice(FONTS), size or rng.choice(SIZES)
    face = font(name, points)
    while draw.textlength(text, font=face) > canvas.width - 8 and points > 10:
        points -= 2
        face = font(name, points)
    width = int(draw.textlength(text, font=face))
    xy = (max(4, min(xy[0], canvas.width - 4 - width)), xy[1])  # the whole line on the image
    if canvas.mode == "RGB" and isinstance(fill, int):
        fill = (fill, fill, fill)  # grey, not Pillow's packed red
    draw.text(xy, text, fill=fill, font=face)
    left, top, right, bottom = draw.textbbox(xy, text, font=face)
    return Line(int(left), int(top), int(right - left), int(bottom - top))


def _grey(rng: random.Random) -> int:
    return rng.choice((255, 235, 200, 170))


# --------------------------------------------------------------------------- backgrounds


def _viewer(rows: int, columns: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    base = 10 + 30 * (x + y) / (rows + columns)
    disc = ((x - columns / 2) ** 2 + (y - rows / 2) ** 2) < (min(rows, columns) / 3) ** 2
    noise = np.random.default_rng(seed).normal(0, 6, (rows, columns))
    return np.clip(base + 90 * disc + noise, 0, 255).astype(np.uint8)


def _sector(rows: int, columns: int, seed: int, frame: int = 0) -> np.ndarray:
    """Ultrasound speckle in a fan below the top band (Rayleigh noise, 0 outside)."""
    rng = np.random.default_rng(seed * 100 + frame)
    y, x = np.mgrid[0:rows, 0:columns]
    angle = np.arctan2(x - columns / 2, y + 40)
    radius = np.hypot(x - columns / 2, y + 40)
    fan = (np.abs(angle) < 0.6) & (radius > 80) & (radius < rows - 10)
    speckle = rng.rayleigh(40, (rows, columns)) * (1 - radius / (1.4 * rows))
    return np.clip(speckle * fan, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- datasets


def _dataset(sop_class: str, modality: str, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "SYNTH^OCR", "OCR0001"
    ds.StudyDate, ds.AccessionNumber = "20240102", "OCRACC1"
    ds.Modality = modality
    ds.Manufacturer = "SYNTHETIC"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelRepresentation = 0
    return ds


def _set_pixels(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int) -> None:
    """``arr`` shaped frames x rows x cols (x 3 for RGB) as native Pixel Data."""
    frames = arr.shape[0]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored, bits_stored - 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"


def screenshot(seed: int, *, text: bool = True) -> Case:
    """A viewer's screen capture: text in the corners, a light title bar with dark text."""
    rng = random.Random(seed)
    rows, columns = 512, 640
    canvas = Image.fromarray(_viewer(rows, columns, seed))
    lines: list[Line] = []
    ImageDraw.Draw(canvas).rectangle((0, 0, columns - 1, 40), fill=215)
    if text:
        words = _identity(rng)
        lines.append(_draw(canvas, f"{words[0]}  {words[1]}", (12, 8), rng, 20, size=20))
        y = 60
        for word in words[2:]:
            lines.append(_draw(canvas, word, (10, y), rng, _grey(rng)))
            y += lines[-1].height + 14
        lines.append(_draw(canvas, "W 400 L 40", (columns - 150, rows - 40), rng, _grey(rng)))
    ds = _dataset(SecondaryCaptureImageStorage, "OT", rows, columns)
    ds.ConversionType = "WSD"
    _set_pixels(ds, np.asarray(canvas)[None], "MONOCHROME2", 8)
    return Case(f"screenshot-{seed}", ds, tuple(lines))


def ultrasound(seed: int, *, text: bool = True, rgb: bool = False, frames: int = 2) -> Case:
    """Speckle frames with the patient's line on top and parameters down the side."""
    rng = random.Random(seed)
    rows, columns = 480, 640
    words = _identity(rng)
    planted: list[tuple[str, tuple[int, int], int | tuple[int, int, int], int]] = []
    if text:
        yellow = (250, 220, 40)
        planted.append((f"{words[0]} {words[1]}", (8, 6), yellow if rgb else 255, 16))
        planted.append((words[2], (columns - 200, 6), 255, 14))
        y = 120
        for param in ("Gain 52", "DR 66", "FR 31Hz", words[4]):
            planted.append((param, (columns - 150, y), 200 if not rgb else (255, 255, 255), 16))
            y += 40
    images, lines = [], []
    for f in range(frames):
        back = _sector(rows, columns, seed, f)
        canvas = Image.fromarray(np.stack([back] * 3, axis=-1) if rgb else back)
        frame_rng = random.Random(seed)  # the same fonts in every frame: the same boxes
        drawn = [_draw(canvas, t, xy, frame_rng, fill, size) for t, xy, fill, size in planted]
        lines = drawn
        images.append(np.asarray(canvas))
    ds = _dataset(UltrasoundMultiFrameImageStorage, "US", rows, columns)
    _set_pixels(ds, np.stack(images), "RGB" if rgb else "MONOCHROME2", 8)
    return Case(f"ultrasound-{'rgb' if rgb else 'mono'}-{seed}", ds, tuple(lines))


def dose(seed: int, *, text: bool = True) -> Case:
    """A CT dose screen: a 12-bit secondary capture of a table, the patient above it."""
    rng = random.Random(seed)
    rows = columns = 512
    canvas = Image.new("L", (columns, rows), 8)
    lines: list[Line] = []
    if text:
        words = _identity(rng)
        lines.append(_draw(canvas, words[0], (16, 14), rng, 255))
        lines.append(_draw(canvas, words[1], (16, 50), rng, 255))
        lines.append(_draw(canvas, "Total mAs 2310   Total DLP 612.4 mGy*cm", (16, 100), rng, 230))
        y = 150
        size = rng.choice((14, 16, 20))
        lines.append(_draw(canvas, "Series Type   CTDIvol  DLP", (16, y), rng, 200, size))
        for n in range(1, 4):
            y += size + 16
            ctdi, dlp = f"{rng.randrange(5, 30)}.{rng.randrange(10)}", rng.randrange(80, 700)
            row = f"{n}  Helical  {ctdi}  {dlp}"
            lines.append(_draw(canvas, row, (16, y), rng, 200, size))
    arr = (np.asarray(canvas).astype(np.uint16) * 16)[None]  # 0..4080: 12 bits stored
    ds = _dataset(SecondaryCaptureImageStorage, "CT", rows, columns)
    ds.SeriesDescription = "Dose Info"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    _set_pixels(ds, arr, "MONOCHROME2", 12)
    return Case(f"dose-{seed}", ds, tuple(lines))


def hard(seed: int) -> Case:
    """What Tesseract is known to miss, for the bench only: on ultrasound speckle, text 7 to 9
    pixels high, dim red text (a third of full luminance), a vertical label (rotated 90
    degrees) and text over the speckle inside the fan."""
    rng = random.Random(seed)
    rows, columns = 480, 640
    words = _identity(rng)
    back = _sector(rows, columns, seed)
    canvas = Image.fromarray(np.stack([back] * 3, axis=-1))
    lines = [
        _draw(canvas, f"{words[0]} {words[1]}", (8, 6), rng, (255, 255, 255), size=10),
        _draw(canvas, words[2], (8, 24), rng, (255, 0, 0), size=16),
        _draw(canvas, words[3], (260, 240), rng, (255, 255, 255), size=16),
    ]
    label = Image.new("RGB", (160, 24))
    drawn = _draw(label, words[1], (2, 2), rng, (255, 255, 255), size=16)
    crop = label.crop((drawn.x, drawn.y, drawn.x + drawn.width, drawn.y + drawn.height))
    canvas.paste(crop.rotate(90, expand=True), (columns - 30, 200))
    lines.append(Line(columns - 30, 200, drawn.height, drawn.width))
    ds = _dataset(UltrasoundMultiFrameImageStorage, "US", rows, columns)
    _set_pixels(ds, np.asarray(canvas)[None], "RGB", 8)
    return Case(f"hard-{seed}", ds, tuple(lines))


def clean(seed: int) -> Case:
    """No text at all: a viewer background, ultrasound speckle or a CT phantom slice."""
    which = seed % 3
    if which == 0:
        case = screenshot(seed, text=False)
        canvas = Image.fromarray(_viewer(512, 640, seed))  # no title bar either
        _set_pixels(case.dataset, np.asarray(canvas)[None], "MONOCHROME2", 8)
        return Case(f"clean-viewer-{seed}", case.dataset, ())
    if which == 1:
        return Case(f"clean-us-{seed}", ultrasound(seed, text=False).dataset, ())
    rows = columns = 512
    y, x = np.mgrid[0:rows, 0:columns]
    body = ((x - 256) ** 2 / 200**2 + (y - 256) ** 2 / 160**2) < 1
    noise = np.random.default_rng(seed).normal(0, 20, (rows, columns))
    arr = np.clip(1024 * body + 200 + noise, 0, 4095).astype(np.uint16)[None]
    ds = _dataset(CTImageStorage, "CT", rows, columns)
    _set_pixels(ds, arr, "MONOCHROME2", 12)
    return Case(f"clean-ct-{seed}", ds, ())


def make_case(kind: str, seed: int) -> Case:
    """One case of ``kind`` (:data:`KINDS`); ultrasound alternates mono and RGB."""
    if kind == "screenshot":
        return screenshot(seed)
    if kind == "ultrasound":
        return ultrasound(seed, rgb=seed % 2 == 1)
    if kind == "dose":
        return dose(seed)
    if kind == "clean":
        return clean(seed)
    raise ValueError(f"unknown kind {kind}")


def line_found(line: Line, boxes: Sequence[tuple[int, int, int, int]]) -> bool:
    """Whether ``boxes`` (x, y, width, height) cover at least half of ``line``'s area: enough
    of it is blacked out that what is left cannot be read as the line."""
    mask = np.zeros((line.height, line.width), bool)
    for x, y, w, h in boxes:
        x0, y0 = max(x - line.x, 0), max(y - line.y, 0)
        x1, y1 = min(x + w - line.x, line.width), min(y + h - line.y, line.height)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return bool(mask.mean() >= 0.5) if mask.size else False
