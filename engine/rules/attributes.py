"""Attribute paths: what a condition's ``attr`` names, parsed and checked once at load.

Syntax (one element, or sequence levels joined by ``.``)::

    SeriesDescription                 a keyword from the DICOM dictionary (pydicom's)
    (0018,0024)  or  0x00180024       a tag; private tags (odd group) only this way
    ImageType[2]                      one value of a multi-valued attribute, 0-based
    ImageType[*]                      any value: the condition holds if it holds for one
    ReferencedImageSequence[0].ReferencedSOPClassUID      inside the first sequence item
    ReferencedImageSequence[*].ReferencedSOPClassUID      inside any item
    summary.num_files                 a field of the series summary (see SUMMARY_FIELDS)

Every level but the last must be a sequence with an item index (``[n]`` or ``[*]``). An index
past the end, like a missing element, makes the attribute missing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from pydicom.datadict import get_entry, keyword_dict
from pydicom.dataset import Dataset

from engine.config.issues import close_match, did_you_mean
from engine.rules.values import LookupTag, Opaque, Value, ascii_safe, element_value

__all__ = ["ANY", "SUMMARY_FIELDS", "AttrPath", "Step", "parse_attr"]


class Instance(Protocol):
    """What a path reads of an instance: :class:`engine.rules.instance.RuleInput`, which builds
    on this module (its ``SUMMARY_FIELDS``)."""

    @property
    def dataset(self) -> Dataset: ...

    @property
    def summary(self) -> Mapping[str, Value]: ...

    @property
    def ascii_ok(self) -> bool: ...


#: Index meaning "any value / any item" (``[*]``).
ANY: Final = -1

#: Fields of the series summary a rule can name as ``summary.<field>``, with their VR-like kind.
SUMMARY_FIELDS: Final[dict[str, tuple[str, str]]] = {
    "num_files": ("US", "number of instances of the series received so far"),
    "calling_ae": ("AE", "AE title of the sender (calling AE title)"),
    "called_ae": ("AE", "AE title the sender addressed (called AE title)"),
    "calling_ip": ("LO", "IP address the series was sent from"),
}

_ELEMENT = re.compile(
    r"(?:(?P<kw>[A-Za-z][A-Za-z0-9]*)"
    r"|\(\s*(?P<group>[0-9A-Fa-f]{4})\s*,\s*(?P<elem>[0-9A-Fa-f]{4})\s*\)"
    r"|0[xX](?P<hex>[0-9A-Fa-f]{8}))"
    r"(?:\[(?P<index>\d+|\*)\])?"
)
_SYNTAX = (
    "expected a keyword, (gggg,eeee) or 0xggggeeee, optionally followed by [n] or [*], "
    "with '.' between sequence levels"
)


@dataclass(frozen=True)
class Step:
    """One level of a path: an element, and optionally which value or item of it."""

    tag: int
    name: str
    index: int | None  # None: the whole element; ANY: any value or item; n: value/item n
    multi: bool | None  # dictionary VM is not 1 (None: private or unknown)
    vr: str | None  # dictionary VR (None: private or unknown)


@dataclass(frozen=True)
class AttrPath:
    """A parsed ``attr``: element steps, or a summary field."""

    text: str
    steps: tuple[Step, ...] = ()
    summary: str | None = None

    @property
    def key(self) -> tuple[object, ...]:
        """Identity of what is read: ``(0018,0024)`` and ``SequenceName`` share one key."""
        if self.summary is not None:
            return ("summary", self.summary)
        return tuple((s.tag, s.index) for s in self.steps)

    @property
    def many(self) -> bool:
        """True when the path can yield several candidates (it has ``[*]``)."""
        return any(s.index == ANY for s in self.steps)

    @property
    def vr(self) -> str | None:
        """VR of what the path yields: the element's, or 'SQ item' for ``Seq[n]``."""
        if self.summary is not None:
            return SUMMARY_FIELDS[self.summary][0]
        last = self.steps[-1]
        if last.vr == "SQ" and last.index is not None:
            return "SQ item"
        return last.vr

    @property
    def top_tag(self) -> int | None:
        """The top-level tag this path reads (None for a summary field)."""
        return self.steps[0].tag if self.steps else None

    def read(self, inp: Instance) -> tuple[Value, ...]:
        """The candidate values for this instance: () when missing."""
        if self.summary is not None:
            value = inp.summary.get(self.summary)
            return () if value is None else (value,)
        if len(self.steps) == 1 and self.steps[0].index is None:  # the common case
            step = self.steps[0]
            value = element_value(inp.dataset, step.tag, step.multi, inp.ascii_ok)
            return () if value is None else (value,)
        level = [(inp.dataset, inp.ascii_ok)]
        last = len(self.steps) - 1
        out: list[Value] = []
        for depth, step in enumerate(self.steps):
            below = []
            for ds, ok in level:
                value = element_value(ds, step.tag, step.multi, ok)
                if value is None:
                    continue
                for picked in _pick(value, step.index):
                    if depth == last:
                        out.append(picked)
                    elif isinstance(picked, Opaque) and len(picked.items) == 1:
                        item = picked.items[0]
                        below.append((item, ascii_safe(item, ok)))
            level = below
        return tuple(out)


def _pick(value: Value, index: int | None) -> list[Value]:
    if index is None:
        return [value]
    if isinstance(value, Opaque) and value.sequence:
        items: list[Value] = [Opaque("sequence item", (item,)) for item in value.items]
        return items if index == ANY else items[index : index + 1]
    values: list[Value] = list(value) if isinstance(value, tuple) else [value]
    return values if index == ANY else values[index : index + 1]


@functools.cache
def _keywords() -> tuple[str, ...]:
    return tuple(keyword_dict)


def _public(tag: int) -> tuple[str | None, str | None, bool]:
    """(VR, VM, known) of a public tag, repeating groups (50xx, 60xx) included."""
    try:
        vr, vm = get_entry(tag)[:2]
    except KeyError:
        return None, None, False
    return (None if " " in vr else vr), vm, True


def _step(match: re.Match[str]) -> tuple[Step | None, str | None]:
    index_text = match["index"]
    index = None if index_text is None else ANY if index_text == "*" else int(index_text)
    if match["kw"]:
        keyword = match["kw"]
        tag = keyword_dict.get(keyword)
        if tag is None:
            hint = did_you_mean(keyword, _keywords(), cutoff=0.8)
            return None, f"unknown attribute keyword '{keyword}'{hint}"
        name = keyword
    else:
        tag = int(match["hex"] or match["group"] + match["elem"], 16)
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    tag = LookupTag(tag)
    if tag >> 16 & 1:  # private: no dictionary, nothing to check
        return Step(tag, name, index, None, None), None
    vr, vm, known = _public(tag)
    if not known:
        return None, f"{name} is not a known public tag (private tags have an odd group number)"
    return Step(tag, name, index, vm != "1" if vm else None, vr), None


def parse_attr(text: str) -> tuple[AttrPath | None, str | None]:
    """(path, None) for a valid ``attr``, else (None, what is wrong)."""
    if text.startswith("summary."):
        field = text[len("summary.") :]
        if field in SUMMARY_FIELDS:
            return AttrPath(text, summary=field), None
        close = close_match(field, SUMMARY_FIELDS)
        hint = f"did you mean '{close}'?; " if close else ""
        fields = ", ".join(sorted(SUMMARY_FIELDS))
        return None, f"unknown summary field '{field}' ({hint}fields: {fields})"
    steps: list[Step] = []
    pos = 0
    while True:
        match = _ELEMENT.match(text, pos)
        if match is None:
            return None, f"cannot read attribute '{text}' at position {pos + 1}: {_SYNTAX}"
        step, problem = _step(match)
        if step is None:
            return None, problem
        steps.append(step)
        pos = match.end()
        if pos == len(text):
            break
        if text[pos] != "." or pos + 1 == len(text):
            return None, f"cannot read attribute '{text}' at position {pos + 1}: {_SYNTAX}"
        if step.vr not in ("SQ", None):
            return None, f"{step.name} is not a sequence (VR {step.vr}); only a sequence has '.'"
        if step.index is None:
            return None, (
                f"give an item index before '.': {step.name}[0]. for the first item "
                f"or {step.name}[*]. for any item"
            )
        pos += 1
    return AttrPath(text, tuple(steps)), None
