"""De-identify a little-endian Part 10 file on its bytes, element by element, without pydicom.

The reference path reads the header into a pydicom Dataset, cleans it
(:meth:`engine.deid.apply.Cleaner.walk`) and writes it (:mod:`engine.deid.writer`): about
3 ms per instance here, most of it pydicom building and re-checking element objects that the
profile keeps unchanged. This path walks the same elements in the same order with the same
:class:`~engine.deid.apply.Cleaner` decisions, copies runs of kept elements as one slice, and
decodes only the values the profile replaces; sequences it recurses into are written with
undefined lengths, as the reference writer does. It gives the same dataset as the reference
path, which the tests check file by file.

Whatever it was not built for raises :class:`NotRaw`, and the caller takes the reference path:
deflated or big-endian files, elements out of tag order or repeated, a kept element of
undefined length (encapsulated pixel data inside an item, a sequence stored as UN), and a value
to replace in a sequence, a private element or one stored as UN. Profiles that clean free text
first collect every value the profile removes or replaces (:meth:`_Walk.collect`), decoded as
pydicom would decode it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import private_dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import VR, PersonName

from engine.deid.apply import CHANGING, COLLECT_VRS, Cleaner, Run, text_of
from engine.deid.ops import Op
from engine.deid.profile import PATIENT_ID, PATIENT_NAME
from engine.deid.scrub import Scrubber
from engine.deid.writer import ITEM, ITEM_END, SEQ_END, element_header
from engine.dicom.values import SPECIFIC_CHARACTER_SET, ValueDecoder, dictionary_vr
from engine.dicom.walk import (
    DEFLATED,
    EXPLICIT_BIG,
    IMPLICIT_LITTLE,
    ITEM_END_TAG,
    ITEM_TAG,
    PIXEL_TAGS,
    SEQ_END_TAG,
    UNDEFINED_LENGTH,
    RawElement,
    Walker,
    read_meta,
)

_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_STUDY, _SERIES = 0x0020000D, 0x0020000E
#: Top-level values the file meta and the caller need, as written.
_KEPT_UIDS = frozenset((_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES))
_VRS = frozenset(str(vr) for vr in VR if len(vr) == 2)
#: VRs whose value pydicom writes as plain text padded to even length (UI with NUL).
_PLAIN_TEXT_VRS = frozenset(
    ("AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT")
)


class NotRaw(Exception):
    """This file needs the reference (pydicom) path; the message says why, with no values."""


@dataclass(frozen=True)
class RawOutput:
    """The cleaned header and where the source's pixel data element is.

    ``header`` is preamble, file meta and every cleaned element before the pixel data; the
    output is ``header + source[pixel_start:pixel_end]``. ``uids`` holds the written values of
    SOP Class, SOP Instance, Study and Series Instance UID (tag -> text; absent when removed).
    ``trailing`` counts top-level elements after the pixel data (dropped); ``syntax`` is the
    file meta's Transfer Syntax UID.
    """

    syntax: str
    header: bytes
    pixel_start: int
    pixel_end: int
    trailing: int
    counts: list[int]
    uids: dict[int, str]
    per_tag: dict[int, list[int]] | None = None


class RawCleaner:
    """Applies one :class:`Cleaner` to Part 10 bytes.

    ``additions`` are the elements the de-identifier sets at the top level after cleaning
    (Patient Identity Removed and the rest), already encoded per VR mode (key: implicit); each
    replaces an element of the same tag, which is still walked and counted as the reference
    path does.
    """

    def __init__(self, cleaner: Cleaner, additions: dict[bool, list[tuple[int, bytes]]]) -> None:
        self.cleaner = cleaner
        self.additions = additions
        self._decoders: dict[bytes | None, ValueDecoder] = {}

    def clean(self, data: bytes, subject: str = "", event: str = "") -> RawOutput:
        """Clean ``data``; raises :class:`NotRaw` (or HeaderError when it is not whole)."""
        pos, syntax = read_meta(data)
        if syntax in (DEFLATED, EXPLICIT_BIG) or not syntax:
            raise NotRaw("not a little-endian transfer syntax")
        walk = _Walk(self, data, syntax == IMPLICIT_LITTLE)
        walk.run = walk.start_run(pos, subject, event)
        if self.cleaner.per_attribute:
            walk.run.per_tag = {}
        if self.cleaner.profile.cleans_text:
            walk.run.scrubber = Scrubber()
            walk.collect(pos, len(data), None, top=True)
        pixel_start = walk.dataset(pos, len(data), None, top=True)
        pixel_end, trailing = pixel_start, 0
        if pixel_start < len(data):
            pixel_end = rest = walk.walker.skip(pixel_start, walk.implicit)
            while rest < len(data):
                rest = walk.walker.skip(rest, walk.implicit)
                trailing += 1
        return RawOutput(
            syntax,
            b"".join(walk.out),
            pixel_start,
            pixel_end,
            trailing,
            walk.run.counts,
            walk.uids,
            walk.run.per_tag,
        )

    def decoder(self, charset: bytes | None) -> ValueDecoder:
        """A value decoder for a dataset whose Specific Character Set value is ``charset``."""
        found = self._decoders.get(charset)
        if found is None:
            raw = RawElement("CS", charset) if charset is not None else None
            found = self._decoders[charset] = ValueDecoder(True, raw)
        return found


class _Walk:
    """One file's walk: the output chunks, the instance's :class:`Run` and the written UIDs."""

    def __init__(self, owner: RawCleaner, data: bytes, implicit: bool) -> None:
        self.owner = owner
        self.cleaner = owner.cleaner
        self.data = data
        self.implicit = implicit
        self.walker = Walker(data, little=True)
        self.out: list[bytes] = []
        self.uids: dict[int, str] = {}
        self.run = Run("", "")

    def start_run(self, pos: int, subject: str, event: str) -> Run:
        """The Run with the original Patient ID and Name (read before the walk needs them)."""
        found: dict[int, RawElement] = {}
        while pos < self.walker.size:
            tag, vr, length, start = self.walker.header(pos, self.implicit)
            if tag > PATIENT_ID:
                break
            pos = self.walker.after_value(start, length, self.implicit or vr == b"UN")
            if tag in (SPECIFIC_CHARACTER_SET, PATIENT_NAME, PATIENT_ID):
                found[tag] = RawElement(_vr(tag, vr), self.data[start:pos])
        charset = found.get(SPECIFIC_CHARACTER_SET)
        decoder = self.owner.decoder(charset.value if charset else None)
        pid, name = (
            text_of(decoder.decode(t, found[t])).strip() if t in found else ""
            for t in (PATIENT_ID, PATIENT_NAME)
        )
        return Run(pid, name, subject, event)

    def dataset(self, pos: int, stop: int | None, charset: bytes | None, top: bool = False) -> int:
        """Clean the elements from ``pos``; return where the walk ended.

        A top-level walk ends at the pixel data or ``stop`` (the end of the file); an item's at
        ``stop`` (defined length) or, when ``stop`` is None, after its Item Delimitation Item.
        """
        data, walker, implicit, out = self.data, self.walker, self.implicit, self.out
        cleaner, counts, per_tag = self.cleaner, self.run.counts, self.run.per_tag
        creators: dict[int, str] = {}
        additions = list(self.owner.additions[implicit]) if top else []
        kept_from = -1  # start of the current run of kept elements
        previous = -1
        while stop is None or pos < stop:
            tag, vr_bytes, length, start = walker.header(pos, implicit)
            if stop is None and tag == ITEM_END_TAG:
                if kept_from >= 0:
                    out.append(data[kept_from:pos])
                return pos + 8
            if top and tag in PIXEL_TAGS:
                break
            if tag <= previous:
                raise NotRaw("elements out of tag order or repeated")
            previous = tag
            vr = _vr(tag, vr_bytes)
            is_creator = tag & 0x10000 and 0x10 <= tag & 0xFFFF < 0x100
            if is_creator and length != UNDEFINED_LENGTH:
                creators[tag] = data[start : start + length].decode("latin-1").strip("\0 ")
            op = cleaner.op_of(tag, vr, creators.get)
            if per_tag is None:
                counts[op] += 1
            else:
                self.run.count(tag, op)
            if is_creator and op is not Op.KEEP:
                creators.pop(tag, None)  # gone from the output: its block is not safe
            if tag == SPECIFIC_CHARACTER_SET and length != UNDEFINED_LENGTH:
                charset = data[start : start + length]
            replaced = False
            if additions and tag >= additions[0][0]:
                if kept_from >= 0:
                    out.append(data[kept_from:pos])
                    kept_from = -1
                while additions and additions[0][0] < tag:
                    out.append(additions.pop(0)[1])
                replaced = bool(additions) and additions[0][0] == tag
            if op is Op.KEEP:
                if length == UNDEFINED_LENGTH:
                    raise NotRaw("a kept element of undefined length")
                end = walker.after_value(start, length, implicit)
                if top and tag in _KEPT_UIDS:
                    self.uids[tag] = text_of(
                        self.owner.decoder(None).decode(tag, RawElement("UI", data[start:end]))
                    )
                    if tag == _SOP_CLASS and self.uids[tag].strip("\0 ") in cleaner.not_raw:
                        raise NotRaw("an IOD whose required attributes need restoring")
                if replaced:
                    out.append(additions.pop(0)[1])
                elif kept_from < 0:
                    kept_from = pos
                pos = end
                continue
            if kept_from >= 0:
                out.append(data[kept_from:pos])
                kept_from = -1
            mark = len(out)
            pos = self._changed(tag, vr, vr_bytes, op, length, start, charset, top)
            if replaced:
                del out[mark:]
                out.append(additions.pop(0)[1])
        if kept_from >= 0:
            out.append(data[kept_from:pos])
        out.extend(chunk for _, chunk in additions)
        return pos

    def _changed(
        self,
        tag: int,
        vr: str,
        vr_bytes: bytes | None,
        op: Op,
        length: int,
        start: int,
        charset: bytes | None,
        top: bool,
    ) -> int:
        """Write what ``op`` makes of one element; return the position after it."""
        if op is Op.RECURSE:
            return self._sequence(tag, vr, vr_bytes, length, start, charset)
        end = self.walker.after_value(start, length, self.implicit or vr_bytes == b"UN")
        if op is Op.REMOVE:
            return end
        if op is Op.EMPTY:
            if vr == "SQ":  # an empty sequence: header and delimiter
                empty = element_header(tag, "SQ", UNDEFINED_LENGTH, self.implicit) + SEQ_END
                self.out.append(empty)
            else:
                self.out.append(element_header(tag, vr, 0, self.implicit))
            return end
        if length == UNDEFINED_LENGTH or vr in ("SQ", "UN") or tag & 0x10000:
            raise NotRaw("a replaced value in a sequence, private or UN element")
        value = ""
        if op is not Op.DUMMY:
            decoded = self.owner.decoder(charset).decode(tag, RawElement(vr, self.data[start:end]))
            value = text_of(decoded)
        new = self.cleaner.replacement(tag, vr, op, value, self.run)
        self.out.append(self._encode(tag, vr, new, charset))
        if top and tag in _KEPT_UIDS:
            self.uids[tag] = text_of(new)
        return end

    def _sequence(
        self,
        tag: int,
        vr: str,
        vr_bytes: bytes | None,
        length: int,
        start: int,
        charset: bytes | None,
    ) -> int:
        """Write a sequence with undefined lengths, cleaning every item."""
        if vr != "SQ" or vr_bytes not in (None, b"SQ"):
            raise NotRaw("a sequence stored with another VR")
        self.out.append(element_header(tag, "SQ", UNDEFINED_LENGTH, self.implicit))

        def item(pos: int, stop: int | None) -> int:
            self.out.append(ITEM)
            end = self.dataset(pos, stop, charset)
            self.out.append(ITEM_END)
            return end

        end = self._items(start, length, item)
        self.out.append(SEQ_END)
        return end

    def _items(self, start: int, length: int, on_item: Callable[[int, int | None], int]) -> int:
        """Call ``on_item(start, stop)`` for each item of a sequence (``stop`` None for an
        undefined-length item); ``on_item`` returns where the item's elements ended."""
        walker = self.walker
        stop = walker.size if length == UNDEFINED_LENGTH else start + length
        pos = start
        while pos < stop:
            item_tag = walker.tag(pos)
            item_length = struct.unpack_from("<L", self.data, pos + 4)[0]
            pos += 8
            if item_tag == SEQ_END_TAG:
                break
            if item_tag != ITEM_TAG:
                raise NotRaw("malformed sequence item")
            if item_length == UNDEFINED_LENGTH:
                pos = on_item(pos, None)
            else:
                end = pos + item_length
                if on_item(pos, end) != end:
                    raise NotRaw("an item whose elements overrun its length")
                pos = end
        if length != UNDEFINED_LENGTH and pos != stop:
            raise NotRaw("a sequence whose items overrun its length")
        return pos

    # ------------------------------------------------------------------ scrub terms

    def collect(self, pos: int, stop: int | None, charset: bytes | None, top: bool = False) -> int:
        """Add the text of every element the profile removes or replaces to the run's
        scrubber, as :meth:`engine.deid.apply.Cleaner.collect` does; return where it ended."""
        data, walker, implicit = self.data, self.walker, self.implicit
        scrubber = self.run.scrubber
        assert scrubber is not None
        creators: dict[int, str] = {}
        while stop is None or pos < stop:
            tag, vr_bytes, length, start = walker.header(pos, implicit)
            if stop is None and tag == ITEM_END_TAG:
                return pos + 8
            if top and tag in PIXEL_TAGS:
                return pos
            vr = _vr(tag, vr_bytes)
            if vr == "SQ":
                in_item = functools.partial(self.collect, charset=charset)
                pos = self._items(start, length, in_item)
                continue
            if length == UNDEFINED_LENGTH:
                raise NotRaw("an element of undefined length that is not a sequence")
            end = walker.after_value(start, length, implicit)
            value = data[start:end]
            if tag & 0x10000 and 0x10 <= tag & 0xFFFF < 0x100:
                creators[tag] = value.decode("latin-1").strip("\0 ")
            elif tag == SPECIFIC_CHARACTER_SET:
                charset = value
            op = self.cleaner.op_of(tag, vr, creators.get)
            if op in CHANGING and (vr in COLLECT_VRS or (vr == "UN" and tag & 0x10000)):
                text = self._text(tag, vr, value, charset, creators)
                if text.isprintable():
                    scrubber.add(text, vr, tag)
            pos = end
        return pos

    def _text(
        self, tag: int, vr: str, value: bytes, charset: bytes | None, creators: dict[int, str]
    ) -> str:
        """An element's value as :func:`text_of` gives it for pydicom's decoded value
        (a private UN element decoded by the VR pydicom's private dictionary gives it)."""
        if vr == "UN" and tag & 0x10000:
            vr = _private_vr(tag, creators)
        if vr in ("DS", "IS"):  # pydicom keeps the original string of these
            return "\\".join(v.strip(" \0") for v in value.decode("latin-1").split("\\"))
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "SQ", "AT"):
            return text_of(value)
        return text_of(self.owner.decoder(charset).decode(tag, RawElement(vr, value)))

    def _encode(self, tag: int, vr: str, value: Any, charset: bytes | None) -> bytes:
        """One replaced element, encoded as pydicom's writer encodes it."""
        text = str(value) if isinstance(value, PersonName) else value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            text = "\\".join(value)
        if vr in _PLAIN_TEXT_VRS and isinstance(text, str) and text.isascii():
            raw = text.encode("ascii")
            if len(raw) % 2:
                raw += b"\0" if vr == "UI" else b" "
            return element_header(tag, vr, len(raw), self.implicit) + raw
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit
        write_data_element(fp, DataElement(tag, vr, value), self.owner.decoder(charset).encodings)
        return bytes(fp.getvalue())


def _private_vr(tag: int, creators: dict[int, str]) -> str:
    """The VR pydicom gives a private element read as UN (PS3.5 6.2.2): LO for a Private
    Creator, else its private dictionary's entry under the block's creator, else UN."""
    element = tag & 0xFFFF
    if 0x10 <= element < 0x100:
        return "LO"
    creator = creators.get((tag & 0xFFFF0000) | (element >> 8)) if element & 0xFF00 else None
    if creator:
        try:
            return str(private_dictionary_VR(tag, creator))
        except KeyError:
            pass
    return "UN"


def _vr(tag: int, vr_bytes: bytes | None) -> str:
    """The element's VR: as written (explicit VR), else the dictionary's."""
    if vr_bytes is None:
        return dictionary_vr(tag)
    vr = vr_bytes.decode("latin-1")
    if vr not in _VRS:
        raise NotRaw("an element with an unknown VR")
    return vr
