"""Pixel cleaning: rules that say where a device burns text into its images, and the blanking.

A pixel rule set (``rulesets/pixels/*.yaml``, ``schemas/pixels.schema.json``; in the spirit of
RSNA CTP's DicomPixelAnonymizer script) lists, per manufacturer, model and image size
(Rows x Columns), the rectangles to blank::

    rules:
      - name: acme_us_800x600
        manufacturer: "^ACME"            # regex on Manufacturer (0008,0070)
        model: "SONO ?1"                 # regex on ManufacturerModelName (0008,1090)
        rows: 600
        columns: 800
        regions:
          - {x: 0, y: 0, width: 800, height: 60}
        covers_all_text: false           # true: BurnedInAnnotation becomes NO after cleaning

:func:`clean_pixels` blanks the rectangles in every frame and sample. Needs numpy (as does
anything touching pixel data in pydicom) and, for compressed input, the decoders of
:mod:`engine.dicom.codecs`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from engine.config.files import ParsedFile, parse_file
from engine.config.issues import ConfigError, ConfigIssue, format_path, found_value, issue_order
from engine.config.rulesets import PROJECT_SUFFIXES
from engine.config.schema import load_schema, schema_issues
from engine.config.sections import RulesetKind
from engine.dicom.codecs import DecodeFailed, decompress, is_compressed

__all__ = [
    "PIXELS_KIND",
    "CleanFailed",
    "HeaderFields",
    "PixelRule",
    "PixelRuleSet",
    "Region",
    "check_pixel_rules",
    "clean_pixels",
    "load_pixel_rules",
    "native_pixels",
    "pixel_rule_files",
    "pixels_dir",
    "resolve_pixel_rulesets",
]


class HeaderFields(Protocol):
    """What the gate reads of an instance, by keyword: a pydicom Dataset, or a plain dict of
    keyword -> value as pydicom decodes it (see :func:`engine.deid.export.gate_fields`)."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __contains__(self, key: str, /) -> bool: ...


CASES_SUFFIX = ".cases"


@dataclass(frozen=True)
class Region:
    """A rectangle in pixels: ``x`` columns from the left, ``y`` rows from the top."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class PixelRule:
    """Where one device (manufacturer, model, image size) burns text into its pixels."""

    name: str
    manufacturer: re.Pattern[str]
    model: re.Pattern[str] | None
    modalities: tuple[str, ...]
    rows: int
    columns: int
    regions: tuple[Region, ...]
    covers_all_text: bool = False
    description: str = ""
    source: Path | None = None

    def matches(self, ds: HeaderFields) -> bool:
        """Whether ``ds`` is an image of this rule's device and size."""
        if ds.get("Rows") != self.rows or ds.get("Columns") != self.columns:
            return False
        if self.modalities and str(ds.get("Modality", "")) not in self.modalities:
            return False
        if not self.manufacturer.search(str(ds.get("Manufacturer", "") or "")):
            return False
        model = str(ds.get("ManufacturerModelName", "") or "")
        return self.model is None or self.model.search(model) is not None


@dataclass(frozen=True)
class PixelRuleSet:
    """Rules in order; :meth:`match` gives the first that matches."""

    rules: tuple[PixelRule, ...] = ()

    def match(self, ds: HeaderFields) -> PixelRule | None:
        return next((rule for rule in self.rules if rule.matches(ds)), None)

    def __add__(self, other: PixelRuleSet) -> PixelRuleSet:
        return PixelRuleSet(self.rules + other.rules)


# --------------------------------------------------------------------------- loading


def pixels_dir() -> Path:
    """``<repo>/rulesets/pixels``: the shipped pixel rule sets."""
    return Path(__file__).resolve().parents[2] / "rulesets" / "pixels"


def pixel_rule_files(folder: Path) -> list[Path]:
    """Rule set files directly in ``folder`` (not hidden, not ``_*``), sorted."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in PROJECT_SUFFIXES and not p.name.startswith((".", "_"))
    )


def resolve_pixel_rulesets(refs: Iterable[str], base: Path) -> list[Path]:
    """Files for a policy's ``pixel_rulesets``: a bare name is ``rulesets/pixels/<name>.yaml``,
    anything with a suffix or a ``/`` a file relative to ``base`` (the project's folder)."""
    out = []
    for ref in refs:
        if "/" in ref or Path(ref).suffix:
            out.append(base / ref)
        else:
            out.append(pixels_dir() / f"{ref}.yaml")
    return out


def _regex(
    value: str, parsed: ParsedFile, path: tuple[str | int, ...]
) -> tuple[re.Pattern[str] | None, list[ConfigIssue]]:
    try:
        return re.compile(value, re.IGNORECASE), []
    except re.error as exc:
        message = f"invalid regular expression: {exc.msg} at position {exc.pos}"
        return None, [ConfigIssue(parsed.file, parsed.line_of(path), format_path(path), message)]


def _rule(
    doc: dict[str, Any], index: int, parsed: ParsedFile
) -> tuple[PixelRule | None, list[ConfigIssue]]:
    base: tuple[str | int, ...] = ("rules", index)
    issues: list[ConfigIssue] = []
    manufacturer, found = _regex(doc["manufacturer"], parsed, (*base, "manufacturer"))
    issues += found
    model = None
    if doc.get("model"):
        model, found = _regex(doc["model"], parsed, (*base, "model"))
        issues += found
    rows, columns = int(doc["rows"]), int(doc["columns"])
    regions = []
    for i, r in enumerate(doc["regions"]):
        region = Region(int(r["x"]), int(r["y"]), int(r["width"]), int(r["height"]))
        where = (*base, "regions", i)
        line = parsed.line_of(where)
        if region.x + region.width > columns:
            message = (
                f"region extends past the image: x + width = {region.x + region.width}, "
                f"expected at most columns ({columns})"
            )
            issues.append(ConfigIssue(parsed.file, line, format_path(where), message))
        if region.y + region.height > rows:
            message = (
                f"region extends past the image: y + height = {region.y + region.height}, "
                f"expected at most rows ({rows})"
            )
            issues.append(ConfigIssue(parsed.file, line, format_path(where), message))
        regions.append(region)
    if issues or manufacturer is None:
        return None, issues
    rule = PixelRule(
        name=doc["name"],
        manufacturer=manufacturer,
        model=model,
        modalities=tuple(doc.get("modality", ())),
        rows=rows,
        columns=columns,
        regions=tuple(regions),
        covers_all_text=bool(doc.get("covers_all_text", False)),
        description=str(doc.get("description", "")),
        source=parsed.file,
    )
    return rule, []


def check_pixel_rules(paths: Iterable[Path]) -> tuple[PixelRuleSet | None, list[ConfigIssue]]:
    """Load ``paths`` as one pixel rule set (rule names unique across them); every problem
    of every file as a line-numbered :class:`ConfigIssue`."""
    schema = load_schema("pixels")
    rules: list[PixelRule] = []
    issues: list[ConfigIssue] = []
    names: dict[str, str] = {}
    for path in paths:
        parsed = parse_file(path)
        issues += parsed.issues
        if parsed.data is None:
            if not parsed.issues:
                issues.append(ConfigIssue(path, None, "(root)", "expected object, found null"))
            continue
        if not isinstance(parsed.data, dict):
            message = f"expected object, {found_value(parsed.data)}"
            issues.append(ConfigIssue(path, None, "(root)", message))
            continue
        found = sorted(schema_issues(parsed.data, schema, path, parsed.line_of), key=issue_order)
        issues += found
        if found:
            continue
        for index, doc in enumerate(parsed.data["rules"]):
            where = ("rules", index, "name")
            if doc["name"] in names:
                message = f"rule name '{doc['name']}' is already used ({names[doc['name']]})"
                issues.append(ConfigIssue(path, parsed.line_of(where), format_path(where), message))
                continue
            names[doc["name"]] = f"{path}:{parsed.line_of(where)}"
            rule, problems = _rule(doc, index, parsed)
            issues += problems
            if rule is not None:
                rules.append(rule)
    issues.sort(key=issue_order)
    return (None if issues else PixelRuleSet(tuple(rules))), issues


def load_pixel_rules(paths: Iterable[Path]) -> PixelRuleSet:
    """Several files as one pixel rule set, in order; raises :class:`ConfigError`."""
    ruleset, issues = check_pixel_rules(list(paths))
    if ruleset is None:
        raise ConfigError(issues)
    return ruleset


# --------------------------------------------------------------------------- cleaning


@dataclass(frozen=True)
class CleanFailed:
    """Pixel cleaning was not possible; the caller quarantines with this detail."""

    detail: str


_DTYPES = {8: "u1", 16: "u2", 32: "u4"}


def _fill(ds: Dataset, samples: int) -> list[int]:
    """Blank value per sample: black for the photometric interpretation: the lowest value
    (MONOCHROME2; for signed data, Pixel Representation (0028,0103) 1, -2^(BitsStored-1) in
    two's complement over Bits Allocated), the highest (MONOCHROME1), or black (colour)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1 and samples == 1 and bits > 1
    if photometric == "MONOCHROME1":
        return [(1 << (bits - 1)) - 1 if signed else (1 << bits) - 1]
    if signed:
        return [(1 << int(ds.BitsAllocated)) - (1 << (bits - 1))]
    if photometric == "YBR_FULL" and samples == 3:
        return [0, 1 << (bits - 1), 1 << (bits - 1)]
    return [0] * samples


def _blank(arr: Any, regions: Sequence[Region], fill: Sequence[int], planar: bool) -> None:
    """Blank ``regions`` in ``arr`` shaped (frames, rows, cols, samples) or, when
    ``planar``, (frames, samples, rows, cols)."""
    for region in regions:
        ys = slice(region.y, region.y + region.height)
        xs = slice(region.x, region.x + region.width)
        for s, value in enumerate(fill):
            if planar:
                arr[:, s, ys, xs] = value
            else:
                arr[:, ys, xs, s] = value


def _clean_native(ds: Dataset, regions: Sequence[Region], syntax: UID) -> CleanFailed | None:
    import numpy as np

    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    planar = samples > 1 and int(ds.get("PlanarConfiguration", 0) or 0) == 1
    value = bytes(ds.PixelData)
    count = frames * rows * columns * samples
    shape = (frames, samples, rows, columns) if planar else (frames, rows, columns, samples)
    fill = _fill(ds, samples)
    if bits == 1:
        flat = np.unpackbits(np.frombuffer(value, np.uint8), bitorder="little")
        if flat.size < count:
            return CleanFailed("pixel data is shorter than its image size")
        arr = flat[:count].reshape(shape)
        _blank(arr, regions, [min(v, 1) for v in fill], planar)
        flat[:count] = arr.ravel()
        ds.PixelData = np.packbits(flat, bitorder="little").tobytes()[: len(value)]
        return None
    if bits not in _DTYPES:
        return CleanFailed(f"pixel data with {bits} bits allocated cannot be cleaned")
    dtype = np.dtype((">" if syntax == ExplicitVRBigEndian else "<") + _DTYPES[bits])
    if len(value) < count * dtype.itemsize:
        return CleanFailed("pixel data is shorter than its image size")
    arr = np.frombuffer(value, dtype, count=count).reshape(shape).copy()
    _blank(arr, regions, fill, planar)
    ds.PixelData = arr.tobytes() + value[count * dtype.itemsize :]
    return None


def _to_rgb(ds: Dataset) -> CleanFailed | None:
    """Uncompressed subsampled YCbCr (YBR_FULL_422): decode to RGB, write back uncompressed."""
    try:
        arr = ds.pixel_array
    except Exception:
        return CleanFailed("pixel data cannot be decoded for cleaning")
    ds.set_pixel_data(arr, "RGB", int(ds.BitsStored), generate_instance_uid=False)
    return None


def native_pixels(ds: Dataset) -> CleanFailed | None:
    """Make ``ds``'s Pixel Data (7FE0,0010) native and full-resolution, in place: compressed
    data decoded (:func:`engine.dicom.codecs.decompress`; YCbCr becomes RGB, the transfer
    syntax Explicit VR Little Endian, a lossy source keeps Lossy Image Compression (0028,2110)
    01), uncompressed subsampled YCbCr (YBR_FULL_422) converted to RGB. Returns
    :class:`CleanFailed` when there is no pixel data or it cannot be decoded."""
    if "PixelData" not in ds:
        return CleanFailed("no pixel data to clean")
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str((meta or {}).get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    if is_compressed(syntax):
        try:
            decompress(ds)
        except DecodeFailed as exc:
            return CleanFailed(f"pixel data cannot be decoded for cleaning: {exc}")
    elif str(ds.get("PhotometricInterpretation", "")).endswith("_422"):
        return _to_rgb(ds)
    return None


def clean_pixels(
    ds: Dataset, regions: Sequence[Region], *, covers_all_text: bool = False
) -> CleanFailed | None:
    """Blank ``regions`` in every frame and sample of ``ds``'s Pixel Data (7FE0,0010), in place.

    Uncompressed data is edited in its own layout (bit depth, planar configuration, byte
    order kept). Compressed data (RLE, JPEG baseline, extended and lossless, JPEG-LS, JPEG
    2000: :func:`engine.dicom.codecs.decompress`) is decoded, YCbCr converted to RGB
    (PhotometricInterpretation and PlanarConfiguration updated), blanked and written back
    uncompressed with the transfer syntax set to Explicit VR Little Endian; a lossy source
    keeps Lossy Image Compression (0028,2110) 01; the SOP Instance UID is kept (the
    de-identification profile owns UIDs). Black is 0, or the maximum for MONOCHROME1. The
    Icon Image Sequence (0088,0200) is removed: its thumbnail shows the same text.
    BurnedInAnnotation (0028,0301) becomes NO only when ``covers_all_text``.

    Returns None when done, :class:`CleanFailed` when the pixels cannot be cleaned (the
    caller quarantines; ``ds`` is then unchanged unless decompression had succeeded).
    """
    failed = native_pixels(ds)
    if failed is not None:
        return failed
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str((meta or {}).get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    failed = _clean_native(ds, regions, syntax)
    if failed is not None:
        return failed
    if "IconImageSequence" in ds:
        del ds.IconImageSequence
    if covers_all_text:
        ds.BurnedInAnnotation = "NO"
    return None


def _check_file(path: Path) -> list[ConfigIssue]:
    return check_pixel_rules([path])[1]


#: ``rulesets/pixels/``: pixel cleaning rules, registered by :mod:`engine.projects`.
PIXELS_KIND = RulesetKind("pixels", "pixels.schema.json", _check_file)
