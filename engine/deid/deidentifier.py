"""The public entry points: de-identify a pydicom Dataset, or Part 10 bytes in and out.

:meth:`Deidentifier.process_file` cleans the header and appends the top-level pixel data
element's bytes exactly as they were, so a 0.5 MB image costs little more than a small one.
Little-endian files are cleaned on their bytes (:mod:`engine.deid.rawclean`); the rest, and the
reference the tests hold that path to, read only the header with pydicom
(``stop_before_pixels``), clean the Dataset and write it (:mod:`engine.deid.writer`). Burned-in
text in the pixels is the export gate's business (:mod:`engine.deid.export`).

After cleaning, the top-level dataset gets Patient Identity Removed (0012,0062) ``YES``,
De-identification Method (0012,0063) (one value per profile and option), De-identification
Method Code Sequence (0012,0064) (CID 7050, scheme DCM) and Longitudinal Temporal Information
Modified (0028,0303). The file meta is rebuilt: Media Storage SOP Class/Instance UID (0002,0002),
(0002,0003) from the cleaned dataset, the same Transfer Syntax UID (0002,0010), fiona's
Implementation Class UID (0002,0012) and Version Name (0002,0013); nothing else (no Source
Application Entity Title (0002,0016), no private meta). The 128-byte preamble is zeros on every
path (the input's, application-defined, is never copied).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from engine import __version__
from engine.config.rulesets import rulesets_dir
from engine.deid.apply import DUMMY, Cleaner, attribute_name, per_attribute, start_run, text_of
from engine.deid.conform import Conformer
from engine.deid.encapsulated import STRIPPED_SYNTAXES, BadBitstream, Stripped, strip_text
from engine.deid.keys import (
    DEFAULT_DATE_RANGE,
    DateShifter,
    HashPseudonyms,
    PseudonymSource,
    UidMapper,
    keyed_hash,
)
from engine.deid.ops import REPORT_NAMES, Op
from engine.deid.overlays import (
    EmbeddedOverlay,
    PixelBits,
    clear_unused_bits,
    dataset_bits,
    pixel_bits,
)
from engine.deid.profile import Profile
from engine.deid.rawclean import NotRaw, RawCleaner, RawOutput
from engine.deid.rawfile import split_pixels
from engine.deid.scrub import Scrubber
from engine.deid.video import VIDEO_SYNTAXES, blank_user_data
from engine.deid.writer import write_dataset, write_meta, write_part10
from engine.dicom.errors import HeaderError
from engine.dicom.walk import IMPLICIT_LITTLE

#: What the action counts call attributes written back because the IOD requires them
#: (:mod:`engine.deid.conform`).
IOD_RESTORED = "iod_required_restored"
_CONFORMERS: dict[str, Conformer] = {}


def _conformer() -> Conformer:
    """The IOD table ``rulesets/anonymize/iod_types.json``, read once per process."""
    path = rulesets_dir() / "anonymize" / "iod_types.json"
    key = str(path)
    if key not in _CONFORMERS:
        _CONFORMERS[key] = Conformer(path)
    return _CONFORMERS[key]


#: The same Implementation Class UID (0002,0012) as the receiver (engine.net.dimse).
IMPLEMENTATION_CLASS_UID = "2.25.21208680153880756234421539763416735043"
IMPLEMENTATION_VERSION_NAME = f"FIONA_{__version__}"[:16]
#: The preamble of every output file (PS3.10 7.1): the input's is never copied.
ZERO_PREAMBLE = bytes(128)
_LONGITUDINAL = {"full": "UNMODIFIED", "modified": "MODIFIED", "removed": "REMOVED"}
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_STUDY, _SERIES = 0x0020000D, 0x0020000E


@dataclass(frozen=True)
class Result:
    """One de-identified instance, in two parts, and how many elements got each action.

    The output is ``header`` (preamble, meta and every element before the pixel data) followed
    by ``pixels`` (the pixel data element, usually a view of the input: a 0.5 MB image is not
    copied until it is written); :attr:`data` joins them. ``source_header_size`` is where the
    input's pixel data element starts (its length when there is none). ``study_uid``,
    ``series_uid`` and ``sop_instance_uid`` are the values written (empty when removed).
    """

    header: bytes
    pixels: bytes | memoryview
    counts: dict[str, int]
    source_header_size: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    #: Per attribute (keyword or tag), how many elements were kept, cleaned, replaced or
    #: removed; filled only when the Deidentifier counts per attribute.
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        """The whole de-identified Part 10 file."""
        return b"".join((self.header, self.pixels))


class Deidentifier:
    """De-identifies instances with one profile and one project's secret.

    ``secret`` is the project key (see :func:`engine.deid.keys.load_secret`); ``pseudonyms``
    defaults to :class:`~engine.deid.keys.HashPseudonyms` with that key. ``uid_root`` and
    ``date_range`` (days, inclusive) configure :class:`UidMapper` and :class:`DateShifter`.
    """

    def __init__(
        self,
        profile: Profile,
        secret: bytes,
        pseudonyms: PseudonymSource | None = None,
        project: str = "",
        *,
        uid_root: str = "2.25",
        date_range: tuple[int, int] = DEFAULT_DATE_RANGE,
        per_attribute: bool = False,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("the project secret must be at least 32 bytes")
        self.profile = profile
        self.project = project
        self.uids = UidMapper(secret, uid_root)
        self.cleaner = Cleaner(
            profile,
            secret,
            self.uids,
            DateShifter(secret, *date_range),
            pseudonyms or HashPseudonyms(secret),
            project,
        )
        self.cleaner.per_attribute = per_attribute
        self.conformer = _conformer()
        self.cleaner.not_raw = self.conformer.sop_classes
        self.raw = RawCleaner(self.cleaner, {v: self._additions(v) for v in (False, True)})

    # ------------------------------------------------------------------ datasets

    def process_dataset(self, ds: Dataset, *, subject: str = "", event: str = "") -> dict[str, int]:
        """De-identify ``ds`` in place (header, sequences, file meta); return action counts."""
        return self.clean_dataset(ds, subject=subject, event=event)[0]

    def clean_dataset(
        self, ds: Dataset, *, subject: str = "", event: str = ""
    ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """As :meth:`process_dataset`; also the per-attribute outcomes (see :class:`Result`)."""
        counts, attributes = self._clean(ds, subject, event)
        self._rebuild_meta(ds)
        return counts, attributes

    def deidentify_dataset(self, ds: Dataset, *, subject: str = "", event: str = "") -> Dataset:
        """De-identify ``ds`` in place (header, sequences, file meta) and return it."""
        self.process_dataset(ds, subject=subject, event=event)
        return ds

    def _clean(
        self, ds: Dataset, subject: str, event: str
    ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        run = start_run(ds, subject, event)
        if self.cleaner.per_attribute:
            run.per_tag = {}
        if self.profile.cleans_text:
            run.scrubber = Scrubber()
            self.cleaner.collect(ds, run.scrubber)
        restore = self.conformer.before(ds)
        self.cleaner.walk(ds, run)
        if restore is not None:
            secret = self.cleaner.secret
            run.restored = restore.apply(lambda t, v, n: keyed_hash(secret, t, v, n), DUMMY)
        for tag, elem in self._marks().items():
            ds[tag] = elem
        counts = _report(run.counts)
        attributes = per_attribute(run.per_tag)
        if run.restored:
            counts[IOD_RESTORED] = len(run.restored)
            if run.per_tag is not None:
                for tag, outcome in run.restored:
                    row = f"{attribute_name(tag)} (required by the IOD)"
                    attributes = _add_row(attributes, row, outcome, 1)
        return counts, attributes

    def _marks(self) -> dict[int, DataElement]:
        """What every output gets at the top level: Patient Identity Removed (0012,0062),
        De-identification Method (0012,0063) and Code Sequence (0012,0064), Longitudinal
        Temporal Information Modified (0028,0303)."""
        items = [_code_item(c.value, c.scheme, c.meaning) for c in self.profile.method_codes]
        return {
            0x00120062: DataElement(0x00120062, "CS", "YES"),
            0x00120063: DataElement(0x00120063, "LO", list(self.profile.method_text)),
            0x00120064: DataElement(0x00120064, "SQ", PydicomSequence(items)),
            0x00280303: DataElement(0x00280303, "CS", _LONGITUDINAL[self.profile.date_mode]),
        }

    def _additions(self, implicit: bool) -> list[tuple[int, bytes]]:
        """:meth:`_marks` encoded once, for the byte path (:mod:`engine.deid.rawclean`)."""
        encoded = []
        for tag, elem in self._marks().items():
            one = Dataset()
            one[tag] = elem
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, implicit
            write_dataset(fp, one, implicit, ["ISO_IR 6"])
            encoded.append((tag, bytes(fp.getvalue())))
        return encoded

    @staticmethod
    def _rebuild_meta(ds: Dataset) -> None:
        old = getattr(ds, "file_meta", None)
        syntax = old.get("TransferSyntaxUID") if old is not None else None
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
        meta.TransferSyntaxUID = UID(syntax or ExplicitVRLittleEndian)
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        # The 128-byte preamble is the writer's to fill (a TIFF header, say) and pydicom
        # writes the one it read: an original's preamble could carry anything.
        ds.preamble = ZERO_PREAMBLE

    # ------------------------------------------------------------------ files

    def process_file(
        self,
        data: bytes,
        *,
        subject: str = "",
        event: str = "",
        byte_path: bool = True,
        bits: PixelBits | Literal[False] | None = False,
    ) -> Result:
        """Part 10 bytes in, de-identified Part 10 bytes and action counts out.

        Pixel data is copied raw; elements after it (Data Set Trailing Padding (FFFC,FFFC),
        Digital Signatures Sequence (FFFA,FFFA)) are dropped and counted as removed. Most files
        take the byte path (:mod:`engine.deid.rawclean`); the rest, and every file when
        ``byte_path`` is False (the reference the tests compare it with), are read with pydicom.
        ``bits``: the file's :class:`~engine.deid.overlays.PixelBits` when the caller has read
        them already (None: it has none), else False.
        """
        if byte_path:
            try:
                raw = self.raw.clean(data, subject, event)
            except (NotRaw, HeaderError, struct.error, UnicodeError, ValueError):
                pass  # the reference path below decides, and raises what it must
            else:
                return self.finish_pixels(self._raw_result(data, raw), data, raw.syntax, bits)
        return self._pydicom_file(data, subject, event, bits)

    def finish_pixels(
        self,
        result: Result,
        data: bytes,
        syntax: str,
        bits: PixelBits | Literal[False] | None = False,
    ) -> Result:
        """``result`` (written in transfer syntax ``syntax`` from the original Part 10
        ``data``) with no text segments in compressed frames and no overlay or other
        bits outside the stored ones in native pixel data (:mod:`engine.deid.overlays`)."""
        if syntax in STRIPPED_SYNTAXES or syntax in _OTHER_COMPRESSED:
            if bits is False:
                bits = pixel_bits(data) if result.pixels else None
            if bits is not None and bits.embedded_planes and self.profile.removes_overlays:
                raise EmbeddedOverlay("an overlay embedded in compressed pixel data")
            return _without_pixel_text(result, syntax)
        return _without_overlay_bits(result, data, syntax, self.profile.removes_overlays, bits)

    def _raw_result(self, data: bytes, raw: RawOutput) -> Result:
        meta = self._meta(raw.uids.get(_SOP_CLASS, ""), raw.uids.get(_SOP_INSTANCE, ""), raw.syntax)
        fp = DicomBytesIO()
        write_meta(fp, meta)
        header = fp.getvalue() + raw.header
        counts = _report(raw.counts)
        if raw.trailing:
            counts["X"] = counts.get("X", 0) + raw.trailing
        return Result(
            header,
            memoryview(data)[raw.pixel_start : raw.pixel_end],
            counts,
            raw.pixel_start,
            raw.uids.get(_STUDY, ""),
            raw.uids.get(_SERIES, ""),
            raw.uids.get(_SOP_INSTANCE, ""),
            _trailing(per_attribute(raw.per_tag), raw.trailing, self.cleaner.per_attribute),
        )

    def _pydicom_file(
        self, data: bytes, subject: str, event: str, bits: PixelBits | Literal[False] | None
    ) -> Result:
        """The reference path: the header through a pydicom Dataset, pixel data raw."""
        split = split_pixels(data)
        if split is None:  # deflated: read (and write) the whole dataset with pydicom
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            found = dataset_bits(ds) if "PixelData" in ds else None
            counts, attributes = self.clean_dataset(ds, subject=subject, event=event)
            if found is not None and found.needs_clearing():
                remove = self.profile.removes_overlays
                cleared = clear_unused_bits(ds.PixelData, found, remove_overlays=remove)
                if cleared is not None:
                    ds.PixelData = cleared
                    counts[OVERLAY_BITS] = counts.get(OVERLAY_BITS, 0) + 1
            return _result(_write(ds), b"", counts, len(data), ds, attributes)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if not split.little:  # big endian (retired): pydicom writes it
            counts, attributes = self.clean_dataset(ds, subject=subject, event=event)
            header = _write(ds)
        else:
            counts, attributes = self._clean(ds, subject, event)
            meta = self._meta(_uid_text(ds, _SOP_CLASS), _uid_text(ds, _SOP_INSTANCE), split.syntax)
            header = write_part10(ds, meta, split.implicit)
        pixels = memoryview(data)[split.pixel_start : split.pixel_end]
        if split.trailing:
            counts["X"] = counts.get("X", 0) + split.trailing
        attributes = _trailing(attributes, split.trailing, self.cleaner.per_attribute)
        result = _result(header, pixels, counts, split.pixel_start, ds, attributes)
        return self.finish_pixels(result, data, split.syntax, bits)

    @staticmethod
    def _meta(sop_class: str, sop_instance: str, syntax: str) -> list[tuple[int, str, bytes]]:
        """File meta: (0002,0001), (0002,0002), (0002,0003), (0002,0010), (0002,0012-13)."""
        return [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", sop_class.encode("ascii")),
            (0x00020003, "UI", sop_instance.encode("ascii")),
            (0x00020010, "UI", syntax.encode("ascii")),
            (0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            (0x00020013, "SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        ]

    def deidentify_file(self, data: bytes, *, subject: str = "", event: str = "") -> bytes:
        """Part 10 bytes in, de-identified Part 10 bytes out."""
        return self.process_file(data, subject=subject, event=event).data


#: Pixel Data (7FE0,0010) and the Extended Offset Table (7FE0,0001) and its lengths (7FE0,0002),
#: as explicit VR little endian element headers start.
_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_EXTENDED_OFFSETS = b"\xe0\x7f\x01\x00OV\0\0"
_EXTENDED_LENGTHS = b"\xe0\x7f\x02\x00OV\0\0"
_PIXEL_DATA_BIG = b"\x7f\xe0\x00\x10"
#: What the action counts call segments removed from compressed frames (see encapsulated.py)
#: and images whose bits outside Bits Stored or embedded overlay planes were cleared.
PIXEL_TEXT = "pixel_text_removed"
OVERLAY_BITS = "pixel_overlay_bits_cleared"
#: Compressed syntaxes without text segments fiona strips (RLE, deflated image frames, video):
#: their pixel data is not rewritten.
_OTHER_COMPRESSED = frozenset(
    ["1.2.840.10008.1.2.5", *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 111)), *VIDEO_SYNTAXES]
)


def _without_pixel_text(result: Result, syntax: str) -> Result:
    """``result`` with comment and application segments stripped from every frame of an
    encapsulated Pixel Data (:mod:`engine.deid.encapsulated`), the Extended Offset Table
    (7FE0,0001-2) rewritten to match; raises BadBitstream for frames it cannot read."""
    if bytes(result.pixels[:4]) != _PIXEL_DATA:
        return result
    if syntax in VIDEO_SYNTAXES:
        return _without_video_text(result, syntax)
    if syntax not in STRIPPED_SYNTAXES:
        return result
    stripped = strip_text(result.pixels)
    if stripped is None:
        return result
    header = _extended_offsets(result.header, stripped)
    counts = dict(result.counts)
    counts[PIXEL_TEXT] = counts.get(PIXEL_TEXT, 0) + stripped.removed
    attributes = result.attributes
    if attributes:
        attributes = _add_row(attributes, PIXEL_TEXT_ROW, "removed", stripped.removed)
    return replace(
        result, header=header, pixels=stripped.element, counts=counts, attributes=attributes
    )


def _without_video_text(result: Result, syntax: str) -> Result:
    """``result`` with the user data of its video stream blanked in place
    (:mod:`engine.deid.video`); raises BadBitstream for user data that cannot be."""
    blanked = blank_user_data(result.pixels, syntax)
    if blanked is None:
        return result
    element, spans = blanked
    counts = dict(result.counts)
    counts[PIXEL_TEXT] = counts.get(PIXEL_TEXT, 0) + spans
    attributes = result.attributes
    if attributes:
        attributes = _add_row(attributes, PIXEL_TEXT_ROW, "removed", spans)
    return replace(result, pixels=element, counts=counts, attributes=attributes)


def _without_overlay_bits(
    result: Result,
    data: bytes,
    syntax: str,
    remove: bool,
    bits: PixelBits | Literal[False] | None = False,
) -> Result:
    """``result`` with native Pixel Data (7FE0,0010) cleared of bits outside the stored ones
    and, when ``remove``, of embedded overlay planes (:func:`clear_unused_bits`)."""
    pixels = result.pixels
    if bytes(pixels[:4]) not in (_PIXEL_DATA, _PIXEL_DATA_BIG):
        return result
    start = 8 if syntax == IMPLICIT_LITTLE else 12
    if len(pixels) <= start or bytes(pixels[start - 4 : start]) == b"\xff\xff\xff\xff":
        return result
    if bits is False:
        bits = pixel_bits(data)
    if bits is None or not bits.needs_clearing():
        return result
    cleared = clear_unused_bits(pixels[start:], bits, remove_overlays=remove)
    if cleared is None:
        return result
    counts = dict(result.counts)
    counts[OVERLAY_BITS] = counts.get(OVERLAY_BITS, 0) + 1
    attributes = result.attributes
    if attributes:
        attributes = _add_row(attributes, OVERLAY_BITS_ROW, "cleaned", 1)
    new = bytes(pixels[:start]) + cleared
    return replace(result, pixels=new, counts=counts, attributes=attributes)


def _extended_offsets(header: bytes, stripped: Stripped) -> bytes:
    """``header`` with its Extended Offset Table and lengths (the last two elements before
    Pixel Data, 8 bytes per frame, PS3.5 A.4) holding the stripped frames' offsets."""
    size = 8 * len(stripped.offsets)
    element = 12 + size
    tail = header[-2 * element :]
    if tail[:8] == _EXTENDED_OFFSETS and tail[element : element + 8] == _EXTENDED_LENGTHS:
        offsets = struct.pack(f"<{len(stripped.offsets)}Q", *stripped.offsets)
        lengths = struct.pack(f"<{len(stripped.lengths)}Q", *stripped.lengths)
        return b"".join(
            (header[: -2 * element], tail[:12], offsets, tail[element : element + 12], lengths)
        )
    if _EXTENDED_OFFSETS in header[-4096:]:
        raise BadBitstream("an extended offset table that does not match the frames")
    return header


def _uid_text(ds: Dataset, tag: int) -> str:
    return text_of(ds[tag].value) if tag in ds else ""


def _report(counts: list[int]) -> dict[str, int]:
    """Per-op counts as the report's action names (ops that never happened left out)."""
    return {REPORT_NAMES[Op(i)]: n for i, n in enumerate(counts) if n}


def _result(
    header: bytes,
    pixels: bytes | memoryview,
    counts: dict[str, int],
    source: int,
    ds: Dataset,
    attributes: dict[str, dict[str, int]],
) -> Result:
    study, series, instance = (_uid_text(ds, tag) for tag in (_STUDY, _SERIES, _SOP_INSTANCE))
    return Result(header, pixels, counts, source, study, series, instance, attributes)


#: Report rows for what happens to pixel data and to elements after it.
TRAILING_ROW = "(elements after Pixel Data)"
PIXEL_TEXT_ROW = "PixelData (comment and application segments)"
OVERLAY_BITS_ROW = "PixelData (overlay planes and bits outside Bits Stored)"


def _trailing(
    attributes: dict[str, dict[str, int]], trailing: int, on: bool
) -> dict[str, dict[str, int]]:
    """``attributes`` with the dropped elements after Pixel Data counted as removed."""
    if on and trailing:
        attributes = _add_row(attributes, TRAILING_ROW, "removed", trailing)
    return attributes


def _add_row(
    attributes: dict[str, dict[str, int]], row: str, outcome: str, n: int
) -> dict[str, dict[str, int]]:
    out = dict(attributes)
    counts = dict(out.get(row, {}))
    counts[outcome] = counts.get(outcome, 0) + n
    out[row] = counts
    return out


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _write(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
