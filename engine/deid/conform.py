"""Keep the attributes an IOD requires after de-identification (issue 16, valid objects out).

PS3.15 Table E.1-1 removes or empties attributes that some IODs need (Type 1 or 2, or 1C when
their condition holds): SEG Segment Label, Enhanced MR Stack ID, SR Verifying Observer
Sequence, ... ``rulesets/anonymize/iod_types.json`` lists them per SOP class (hand-curated from
the PS3.3 module tables it cites). :class:`Conformer` notes which of them the input has
(:meth:`Conformer.before`, before the walk) and writes back, after the walk, what each one
needs (:meth:`Restore.apply`): an empty value for Type 2, a dummy valid for the VR (or a keyed
hash, so distinct values stay distinct) for Type 1 and 1C, one dummy item for a required
sequence; a Type 1C sequence left with no items is removed, its condition no longer holding.
Only attributes present in the input are restored: a 1C condition is taken as the input's.

The byte path does not do this: it hands these SOP classes to the pydicom path
(:data:`Conformer.sop_classes`, checked on SOP Class UID (0008,0016)).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence

from engine.dicom.values import dictionary_vr

#: keyed hash (tag, value as text, maximum length) -> text; see engine.deid.keys.keyed_hash.
Hasher = Callable[[int, str, int], str]
_MAX = {"SH": 16, "CS": 16, "LO": 64}


@dataclass(frozen=True)
class Row:
    """One required attribute: ``tag`` inside the items of the sequences ``path``."""

    tag: int
    vr: str
    path: tuple[int, ...]
    kind: str
    dummy: Any
    item: dict[str, Any] | None
    drop_empty: bool


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"iod_types.json: unknown keyword {keyword!r}")
    return int(tag)


def _row(doc: dict[str, Any]) -> Row:
    tag = _tag(doc["keyword"])
    return Row(
        tag,
        dictionary_vr(tag),
        tuple(_tag(k) for k in doc["in"]),
        str(doc["type"]),
        doc.get("dummy"),
        doc.get("item"),
        bool(doc.get("drop_empty", False)),
    )


def _containers(ds: Dataset, path: tuple[int, ...]) -> Iterator[Dataset]:
    """Every dataset the sequence ``path`` leads to from ``ds`` (``ds`` itself for ())."""
    if not path:
        yield ds
        return
    if path[0] not in ds or ds.get_item(path[0]).VR not in ("SQ", None):
        return  # absent, or a sequence stored as UN: nothing to restore into
    for item in ds[path[0]].value or ():
        if isinstance(item, Dataset):
            yield from _containers(item, path[1:])


def _has_value(ds: Dataset, tag: int) -> bool:
    """Whether ``tag`` is in ``ds`` with a value (a sequence: at least one item)."""
    if tag not in ds:
        return False
    value = ds[tag].value
    if isinstance(value, int | float):
        return True
    return value is not None and len(value) > 0


@dataclass
class Restore:
    """What one instance's input had: (container, row, original value text) to check after."""

    found: list[tuple[Dataset, Row, str]]

    def apply(self, hasher: Hasher, dummies: dict[str, Any]) -> list[tuple[int, str]]:
        """Write back each noted attribute the walk removed or emptied; return, per element
        written back or removed, its tag and ``replaced`` or ``removed``."""
        fixed: list[tuple[int, str]] = []
        for container, row, original in self.found:
            if row.drop_empty:
                if row.tag in container and not container[row.tag].value:
                    del container[row.tag]
                    fixed.append((row.tag, "removed"))
                continue
            if _has_value(container, row.tag) or (
                row.kind.startswith("2") and row.tag in container
            ):
                continue
            container[row.tag] = DataElement(
                row.tag, row.vr, self._value(row, original, hasher, dummies)
            )
            fixed.append((row.tag, "replaced"))
        return fixed

    @staticmethod
    def _value(row: Row, original: str, hasher: Hasher, dummies: dict[str, Any]) -> Any:
        if row.kind.startswith("2"):
            return PydicomSequence() if row.vr == "SQ" else None
        if row.item is not None:
            item = Dataset()
            for keyword, value in row.item.items():
                tag = _tag(keyword)
                vr = dictionary_vr(tag)
                item[tag] = DataElement(tag, vr, PydicomSequence() if vr == "SQ" else value)
            return PydicomSequence([item])
        if row.dummy == "hash":
            return hasher(row.tag, original, _MAX.get(row.vr, 64))
        return row.dummy if row.dummy is not None else dummies.get(row.vr, "ANONYMIZED")


class Conformer:
    """The rows of ``iod_types.json`` by SOP Class UID."""

    def __init__(self, path: Path) -> None:
        doc = json.loads(path.read_text(encoding="utf-8"))
        by_class: dict[str, list[Row]] = {}
        for raw in doc["rows"]:
            row = _row(raw)
            uids = {uid for name in raw["sets"] for uid in doc["sop_class_sets"][name]}
            for uid in sorted(uids):
                by_class.setdefault(uid, []).append(row)
        self.rows = by_class
        self.sop_classes = frozenset(by_class)

    def before(self, ds: Dataset) -> Restore | None:
        """Note which listed attributes ``ds`` (not yet cleaned) has; None when none apply."""
        sop_class = str(ds.get("SOPClassUID", "")).strip("\0 ")
        rows = self.rows.get(sop_class)
        if not rows:
            return None
        found = []
        for row in rows:
            for container in _containers(ds, row.path):
                if row.tag in container:
                    value = container[row.tag].value
                    text = "" if row.vr == "SQ" or value is None else str(value)
                    found.append((container, row, text))
        return Restore(found)
