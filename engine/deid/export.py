"""One instance on its way out: burned-in gate, de-identification, verification.

:meth:`Exporter.export` is what both ``fiona anonymize`` and the ``anonymize`` pipeline step
call for every file. It returns either the de-identified bytes with their new UIDs, or a
:class:`Held` item with a reason code and a detail that quotes no header value:

1. the burned-in gate (:mod:`engine.deid.burned_in`): a file likely to carry text in its
   pixels is held as ``burned_in`` unless a pixel rule cleans it; where the project's OCR
   reads the pixels (:mod:`engine.deid.ocr`), it decides instead: text held or blacked out;
2. de-identification (:class:`engine.deid.Deidentifier`), pixel data copied raw;
3. the verification gate (:mod:`engine.deid.verify`): the output bytes (all but pixel data)
   are searched for the original identifying values; a hit is held as
   ``verification_failed`` with the element paths where they were found.

Compiling a study's values into one search costs milliseconds, so it is kept per study and
patient and compiled again only when a file brings a value the study's earlier files did not (a
later series' date, operator or device); what differs from file to file, the instance's own
UIDs and those it references, is searched for separately: every UID-shaped token of the
original header that is not a UID the standard defines must not appear in the output header.
A deflated data set is searched inflated; the preamble must be zeros and the file meta only
what fiona writes.
"""

from __future__ import annotations

import io
import re
import zlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import pydicom
from pydicom.datadict import tag_for_keyword

from engine.deid.burned_in import (
    BurnedInPolicy,
    Clean,
    Quarantine,
    Verdict,
    check_burned_in,
)
from engine.deid.deidentifier import ZERO_PREAMBLE, Deidentifier, Result
from engine.deid.encapsulated import BadBitstream, text_segments
from engine.deid.keys import is_well_known_uid
from engine.deid.ocr import ocr_pixels
from engine.deid.ops import Op
from engine.deid.overlays import WANTED as OVERLAY_WANTED
from engine.deid.overlays import EmbeddedOverlay, PixelBits, bits_of
from engine.deid.pixels import CleanFailed, HeaderFields, PixelRuleSet, clean_pixels
from engine.deid.rawfile import split_pixels
from engine.deid.study_texts import Texts, dataset_texts, raw_texts
from engine.deid.verify import (
    KEPT_UID_KEYWORDS,
    IdentifyingValues,
    LeakKind,
    ascii_fold,
    find_leaks,
    leak_reason,
)
from engine.deid.video import VIDEO_SYNTAXES, user_data
from engine.dicom.errors import HeaderError
from engine.dicom.uids import is_valid_uid
from engine.dicom.values import SPECIFIC_CHARACTER_SET, decode_fields
from engine.dicom.walk import DEFLATED, PIXEL_TAGS, Scan, Walker, read_meta, scan

#: Verification kinds a profile option deliberately keeps (PS3.15 option -> verify.LeakKind).
OPTION_ALLOWS: dict[str, tuple[str, ...]] = {
    "retain_uids": ("original_uid",),
    "retain_longitudinal_full_dates": ("original_date",),
    "retain_device_identity": ("device_serial",),
    "retain_institution_identity": ("institution",),
}
VERIFICATION_FAILED = "verification_failed"
#: A UID-shaped token: digits and dots, at least 10 characters with 3 dots (not a date or number).
_UID_TOKEN = re.compile(rb"(?<![0-9.])[0-9]+(?:\.[0-9]+){3,}(?![0-9])")
_STUDIES_KEPT = 64
_DIGITS = frozenset(b"0123456789")
_DIGITS_AND_DOT = _DIGITS | {ord(".")}


#: A de-identified instance that passed both gates: the de-identifier's
#: :class:`~engine.deid.deidentifier.Result` (header and pixel data parts, new UIDs, action counts).
Exported = Result


@dataclass(frozen=True)
class Held:
    """An instance that must not leave: a quarantine reason code and a detail without PHI."""

    reason: str
    detail: str


class Exporter:
    """The gates and the de-identifier of one project (or one ``fiona anonymize`` run)."""

    def __init__(
        self,
        deidentifier: Deidentifier,
        policy: BurnedInPolicy | None = None,
        pixel_rules: PixelRuleSet | None = None,
        *,
        allow_kinds: Collection[str] = (),
    ) -> None:
        self.deid = deidentifier
        self.policy = policy or BurnedInPolicy()
        self.pixel_rules = pixel_rules
        allowed = set(allow_kinds)
        for option in deidentifier.profile.options:
            allowed.update(OPTION_ALLOWS.get(option, ()))
        self.allow_kinds = frozenset(allowed)
        self._studies: OrderedDict[tuple[str, str], _Study] = OrderedDict()

    def export(self, data: bytes, *, subject: str = "", event: str = "") -> Exported | Held:
        """De-identify one Part 10 file held in memory, or say why it is held."""
        bits: PixelBits | Literal[False] | None = False
        original: HeaderFields | None = None
        scanned = _gate_scan(data)
        if scanned is not None:
            original, bits = decode_fields(scanned, _GATE_TAGS), bits_of(scanned)
            if scanned.has_pixels:
                original["PixelData"] = b""
        if original is None:
            try:
                original = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            except Exception as exc:
                return Held("unparseable", f"header could not be read: {type(exc).__name__}")
        verdict = check_burned_in(original, self.policy, self.pixel_rules)
        read_text = self.policy.ocr_reads(original)
        if isinstance(verdict, Quarantine) and not read_text:
            return Held(verdict.reason, verdict.detail)
        try:
            if read_text:
                result = self._read_text(data, original, verdict, subject, event, bits)
            elif isinstance(verdict, Clean):
                result = self._cleaned(data, verdict, subject, event)
            else:
                result = self.deid.process_file(data, subject=subject, event=event, bits=bits)
        except BadBitstream as exc:  # text segments could not be looked for: never passed
            return Held("deidentification_failed", f"pixel data: {exc}")
        except EmbeddedOverlay as exc:
            return Held("burned_in", str(exc))
        except Exception as exc:  # a file the profile cannot handle is held, never passed
            return Held("deidentification_failed", f"{type(exc).__name__} while de-identifying")
        if isinstance(result, Held):
            return result
        source_header = data[: result.source_header_size]
        try:
            values = self._study_values(original, source_header)
        except Exception:
            return Held(VERIFICATION_FAILED, "original header could not be read to verify")
        # A walked file is not deflated (the walk cannot read one): searched as it is.
        held = self._verify(values, source_header, result.header, walked=scanned is not None)
        if held is None:
            held = self._verify_pixel_text(values, result.pixels, _syntax(scanned, original))
        if held is not None:
            return held
        uids = (result.study_uid, result.series_uid, result.sop_instance_uid)
        if not all(is_valid_uid(uid) for uid in uids):  # they become paths on the way out
            return Held("deidentification_failed", "output has no valid study, series or SOP UID")
        return result

    def _cleaned(self, data: bytes, verdict: Clean, subject: str, event: str) -> Result | Held:
        """Blank the rule's regions in the decoded pixels, then de-identify the whole dataset."""
        full = pydicom.dcmread(io.BytesIO(data))
        failed = clean_pixels(full, verdict.regions, covers_all_text=verdict.covers_all_text)
        if failed is not None:
            return Held("burned_in", failed.detail)
        return self._deidentified(full, data, subject, event)

    def _read_text(
        self,
        data: bytes,
        original: HeaderFields,
        verdict: Verdict,
        subject: str,
        event: str,
        bits: PixelBits | Literal[False] | None,
    ) -> Result | Held:
        """The project's OCR (:func:`engine.deid.ocr.ocr_pixels`) on the decoded pixels, after
        a matching pixel rule's regions: held when it says so; the original bytes
        de-identified as usual when it found no text and no rule cleaned anything; else the
        cleaned dataset, written uncompressed."""
        assert self.policy.ocr is not None
        full = pydicom.dcmread(io.BytesIO(data))
        by_rule = isinstance(verdict, Clean)
        if isinstance(verdict, Clean):
            failed = clean_pixels(full, verdict.regions, covers_all_text=verdict.covers_all_text)
            if failed is not None:
                return Held("burned_in", failed.detail)
        burned = str(original.get("BurnedInAnnotation", "") or "").strip().upper()
        found = ocr_pixels(full, self.policy.ocr, text_expected=burned == "YES" and not by_rule)
        if isinstance(found, CleanFailed):
            return Held("burned_in", found.detail)
        if found or by_rule:
            return self._deidentified(full, data, subject, event)
        return self.deid.process_file(data, subject=subject, event=event, bits=bits)

    def _deidentified(self, full: pydicom.Dataset, data: bytes, subject: str, event: str) -> Result:
        """De-identify ``full`` (pixels cleaned, decoded) as one dataset; ``data`` the original."""
        counts, attributes = self.deid.clean_dataset(full, subject=subject, event=event)
        buffer = io.BytesIO()
        full.save_as(buffer, enforce_file_format=True)
        out = buffer.getvalue()
        study, series, instance = (
            str(full.get(k, ""))
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
        size = _header_size(out)
        pixels = memoryview(out)[size:]
        result = Result(
            out[:size], pixels, counts, _header_size(data), study, series, instance, attributes
        )
        return self.deid.finish_pixels(result, data, str(full.file_meta.TransferSyntaxUID))

    def _study_values(self, original: HeaderFields, data: bytes) -> IdentifyingValues:
        """The identifying values of the file's study and patient so far: those of every file
        of it seen yet, this one's included (a later series brings its own date, operator,
        device...). Its UIDs are left out after the first file (:func:`_uid_leaks` searches
        each file's own), so the compiled search is rebuilt only for a file with a new value."""
        key = (str(original.get("StudyInstanceUID", "")), str(original.get("PatientID", "")))
        study = self._studies.get(key)
        texts = raw_texts(data)
        if study is not None and texts is not None and texts <= study.texts:
            self._studies.move_to_end(key)  # the common case: nothing new, nothing parsed
            return study.values
        full = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if texts is None:  # deflated: compared as pydicom reads it
            texts = dataset_texts(full)
        if study is None:
            study = self._studies[key] = _Study(IdentifyingValues.from_dataset(full), texts)
            if len(self._studies) > _STUDIES_KEPT:
                self._studies.popitem(last=False)
        elif not texts <= study.texts:
            own = IdentifyingValues.from_dataset(full)
            study.values.absorb(own, skip=(LeakKind.ORIGINAL_UID,))
            study.texts |= texts
        self._studies.move_to_end(key)
        return study.values

    def _verify(
        self,
        values: IdentifyingValues,
        source_header: bytes,
        out_header: bytes,
        *,
        walked: bool = False,
    ) -> Held | None:
        """Search the output header for the study's identifying ``values`` (see the module);
        ``walked``: the original was walked, so neither it nor the output is deflated."""
        outside = _outside_data_set(out_header)
        if outside is not None:
            return outside
        matcher = values.matcher((), self.allow_kinds)
        source_plain, out_plain = source_header, out_header
        if not walked:  # a deflated data set is searched inflated (the parsed checks read either)
            try:
                source_plain, out_plain = _searchable(source_header), _searchable(out_header)
            except zlib.error:
                return Held(VERIFICATION_FAILED, "data set could not be inflated to verify it")
        leaks: list[object] = []
        if values.needs_decoding and not matcher.empty:  # compare in Unicode, not bytes
            try:
                parsed = pydicom.dcmread(io.BytesIO(out_header))
                leaks = list(find_leaks(parsed, values, allow_kinds=self.allow_kinds))
            except Exception:
                return Held(VERIFICATION_FAILED, "output header could not be read to verify it")
        elif not matcher.empty:
            leaks = [
                _Leak(m.start(), matcher.byte_kind(m.group()))
                for m in matcher.bytes.finditer(out_plain)
            ]
            leaks += [_Leak(-1, f"{k}, digits") for k in matcher.digit_kinds(out_plain)]
            if not leaks and _LATIN_LETTER.search(out_plain):  # accents: compare folded text
                leaks = [
                    _Leak(m.start(), matcher.kind(m.group()))
                    for text in _folded_texts(out_plain)
                    for m in matcher.text.finditer(text)
                ]
        if not leaks and "original_uid" not in self.allow_kinds:
            leaks = _uid_leaks(source_plain, out_plain)
            if leaks:  # rare: UIDs the profile keeps on purpose are not leaks
                leaks = _uid_leaks(source_plain, out_plain, self._kept_uids(source_header))
        if not leaks:
            return None
        # Rare: name the element paths (the byte scans only know offsets).
        try:
            parsed = pydicom.dcmread(io.BytesIO(out_header))
            full = pydicom.dcmread(io.BytesIO(source_header))
            own = IdentifyingValues.from_dataset(full)
            paths = find_leaks(parsed, own, allow_kinds=self.allow_kinds)
            leaks = list(paths) or leaks
        except Exception:
            pass
        return Held(VERIFICATION_FAILED, leak_reason(leaks))  # type: ignore[arg-type]

    def _kept_uids(self, source_header: bytes) -> frozenset[bytes]:
        """UIDs of the original that the output keeps on purpose: coding scheme, class and
        creator UIDs (:data:`engine.deid.verify.KEPT_UID_KEYWORDS`) and UI elements the
        profile keeps."""
        kept: set[bytes] = set()
        try:
            full = pydicom.dcmread(io.BytesIO(source_header))
        except Exception:
            return frozenset()
        ops = self.deid.profile.ops
        for elem in full.iterall():
            if elem.VR != "UI":
                continue
            keyword = elem.keyword
            if (
                keyword in KEPT_UID_KEYWORDS
                or "ClassUID" in keyword
                or ops.get(int(elem.tag)) is Op.KEEP
            ):
                values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
                kept.update(str(v).strip("\0 ").encode("ascii", "replace") for v in values)
        return frozenset(kept)

    def _verify_pixel_text(
        self, values: IdentifyingValues, pixels: bytes | memoryview, syntax: str
    ) -> Held | None:
        """Search what is left of the comment and application segments of compressed frames
        (:func:`engine.deid.encapsulated.text_segments`) and of a video's user data
        (:func:`engine.deid.video.user_data`) for the original's values."""
        if pixels[:4] != b"\xe0\x7f\x10\x00" or pixels[8:12] != b"\xff\xff\xff\xff":
            return None  # not an encapsulated Pixel Data element (explicit VR)
        video = syntax in VIDEO_SYNTAXES
        segments = user_data(pixels, syntax) if video else text_segments(pixels)
        if not segments:
            return None
        matcher = values.matcher((), self.allow_kinds)
        kinds = sorted(
            {matcher.byte_kind(m.group()) for s in segments for m in matcher.bytes.finditer(s)}
        )
        if not kinds:
            return None
        part = "video user data" if video else "frame segment"
        where = ", ".join(f"PixelData {part} ({kind})" for kind in kinds)
        return Held(VERIFICATION_FAILED, f"original identifying values found in {where}")


@dataclass
class _Study:
    """The identifying values of a study's files seen so far, and the raw text elements they
    were collected from (a file with none new brings no new value)."""

    values: IdentifyingValues
    texts: Texts


#: What the burned-in gate and the study cache read of an original (see :func:`gate_fields`).
_GATE_TAGS = {
    tag_for_keyword(k) or 0: k
    for k in (
        "BurnedInAnnotation", "SOPClassUID", "Modality", "ImageType", "ConversionType",
        "SeriesDescription", "Rows", "Columns", "Manufacturer", "ManufacturerModelName",
        "StudyInstanceUID", "PatientID",
    )
}  # fmt: skip
_WANTED = frozenset(_GATE_TAGS) | {SPECIFIC_CHARACTER_SET} | OVERLAY_WANTED


def _syntax(scanned: Scan | None, original: HeaderFields) -> str:
    """The file's Transfer Syntax UID (0002,0010), from the walk or pydicom's file meta."""
    if scanned is not None:
        return str(scanned.transfer_syntax or "")
    meta = getattr(original, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _gate_scan(data: bytes) -> Scan | None:
    """One walk keeping what the gate and the pixel bits need (None: deflated or unwalkable)."""
    try:
        found = scan(data, _WANTED)
    except HeaderError:
        return None
    return None if found.transfer_syntax == DEFLATED else found


def gate_fields(data: bytes) -> dict[str, Any] | None:
    """The gate's elements by keyword, decoded as pydicom would, read in one walk without
    building a Dataset (None: a deflated file, or one the walk cannot read; use pydicom)."""
    found = _gate_scan(data)
    if found is None:
        return None
    fields = decode_fields(found, _GATE_TAGS)
    if found.has_pixels:
        fields["PixelData"] = b""
    return fields


#: A byte that is a Latin letter with a diacritic in latin-1 (or starts one in UTF-8).
_LATIN_LETTER = re.compile(rb"[\xc0-\xff]")


_WINDOW = 72  # bytes either side of a non-ASCII letter: longer than an LO value


def _folded_texts(header: bytes) -> list[str]:
    """The parts of the header around Latin letters with diacritics, as latin-1 and as UTF-8
    text, folded to ASCII (``Sørensen`` -> ``Sorensen``; what has no ASCII form is dropped, so
    this is only for ASCII tokens). Spans are joined with a NUL so no token crosses two."""
    spans: list[list[int]] = []
    for match in _LATIN_LETTER.finditer(header):
        start, end = max(0, match.start() - _WINDOW), match.end() + _WINDOW
        if spans and start <= spans[-1][1]:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    parts = [header[a:b] for a, b in spans]
    return [
        ascii_fold("\0".join(p.decode(codec, "ignore") for p in parts), drop=True)
        for codec in ("latin-1", "utf-8")
    ]


#: The file meta elements fiona writes (Deidentifier._rebuild_meta): group length, version,
#: Media Storage SOP Class and Instance UID, Transfer Syntax UID, Implementation Class UID and
#: Version Name.
_OUTPUT_META = frozenset(
    (0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)
)


def _outside_data_set(out_header: bytes) -> Held | None:
    """Held unless what precedes the data set is what fiona writes: a zero preamble, ``DICM``
    and only the rebuilt file meta elements (whose values the searches cover)."""
    if out_header[:128] != ZERO_PREAMBLE or out_header[128:132] != b"DICM":
        return Held(VERIFICATION_FAILED, "output preamble is not zeros")
    walker = Walker(out_header, little=True)
    pos = 132
    try:
        while out_header[pos : pos + 2] == b"\x02\x00":
            tag, _, length, start = walker.header(pos, implicit=False)
            if tag not in _OUTPUT_META:
                return Held(VERIFICATION_FAILED, f"output file meta has {_tag_text(tag)}")
            pos = walker.after_value(start, length, implicit=False)
    except HeaderError:
        return Held(VERIFICATION_FAILED, "output file meta could not be read to verify it")
    return None


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _searchable(data: bytes) -> bytes:
    """What the byte scans search of a Part 10 file (or its header): as it is, but for a
    deflated one the preamble and meta followed by the inflated data set without its pixel
    data element. Raises zlib.error when a deflated one cannot be inflated."""
    try:
        pos, syntax = read_meta(data)
    except HeaderError:  # no meta to read: searched as it is
        return data
    if syntax != DEFLATED:
        return data
    inflated = zlib.decompress(data[pos:], -zlib.MAX_WBITS)
    walker = Walker(inflated, little=True)
    at = 0
    try:
        while at < len(inflated):
            tag, vr, length, start = walker.header(at, implicit=False)
            end = walker.after_value(start, length, vr == b"UN")
            if tag in PIXEL_TAGS:  # signal, not text (burned-in text is the other gate's)
                return b"".join((data[:pos], inflated[:at], b"\0", inflated[end:]))
            at = end
    except HeaderError:  # searched whole: more to search, never less
        pass
    return data[:pos] + inflated


def _header_size(data: bytes) -> int:
    """Bytes before the pixel data (all of them when there is none or no walk is possible)."""
    try:
        split = split_pixels(data)
    except HeaderError:
        return len(data)
    return split.pixel_start if split is not None and split.pixel_start else len(data)


@dataclass(frozen=True)
class _Leak:
    """Where a byte scan found an original value: an offset and a kind, never the value."""

    offset: int
    kind: str = "original_uid"

    def __str__(self) -> str:
        return f"byte {self.offset} ({self.kind})" if self.offset >= 0 else f"header ({self.kind})"


def _uid_leaks(
    original_header: bytes, out_header: bytes, kept: Collection[bytes] = ()
) -> list[object]:
    """Original UIDs (not defined by the standard, not in ``kept``) found again in the output
    header."""
    leaks: list[object] = []
    for uid in {m.group() for m in _UID_TOKEN.finditer(original_header)}:
        if len(uid) < 10 or uid in kept or is_well_known_uid(uid.decode("ascii")):
            continue
        # bytes.find, not a regex per UID: every instance brings new UIDs, and compiling
        # a pattern for each cost more than the rest of the verification.
        at = out_header.find(uid)
        while at >= 0:
            after = at + len(uid)
            if (at == 0 or out_header[at - 1] not in _DIGITS_AND_DOT) and (
                after == len(out_header) or out_header[after] not in _DIGITS
            ):
                leaks.append(_Leak(at))
            at = out_header.find(uid, at + 1)
    return leaks
