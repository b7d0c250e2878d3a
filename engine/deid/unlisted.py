"""Policy for attributes PS3.15 Table E.1-1 does not list (``rulesets/anonymize/unlisted.json``).

The table lists what the standard knows to identify; a file may carry anything else. What a
data protection officer can sign is an allow-list for free text, so an attribute that is not in
the table is treated by its PS3.6 VR:

- ``rows``: a few attributes known to carry identity that the table omits, such as SR Text Value
  (0040,A160), handled like table rows (with their options);
- free-text VRs (``free_text_vrs``: AE, LO, LT, PN, SH, ST, UC, UR, UT, UN): removed unless the
  keyword is in ``keep_text`` (equipment and coding text such as Manufacturer (0008,0070),
  Code Meaning (0008,0104));
- UI: remapped (U) unless in ``keep_uids`` (class UIDs such as SOP Class UID (0008,0016)) or under
  Retain UIDs; well-known DICOM UIDs are never remapped (:class:`engine.deid.keys.UidMapper`);
- DA, DT, TM: handled like the table's dates: removed, kept (full dates) or DA/DT shifted
  (modified dates);
- SQ: kept, items cleaned; CS, numbers, AT and binary (OB, OW...) values: kept;
- group lengths (gggg,0000) and tags unknown to the PS3.6 dictionary: removed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from engine.deid.ops import Op
from engine.dicom.values import dictionary_vr


def _tags(keywords: list[str], path: Path) -> frozenset[int]:
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{path}: {keyword!r} is not a DICOM keyword")
        tags.add(int(tag))
    return frozenset(tags)


@dataclass(frozen=True)
class Unlisted:
    """The parsed ``unlisted.json``."""

    rows: tuple[Mapping[str, Any], ...]
    free_text_vrs: frozenset[str]
    keep_text: frozenset[int]
    keep_uids: frozenset[int]
    conformance: Mapping[str, str]

    def op(self, tag: int, date_mode: str, retain_uids: bool) -> Op:
        """The action for an even-group ``tag`` that no table row lists."""
        if tag & 0xFFFF == 0:
            return Op.REMOVE
        vr = dictionary_vr(tag)
        if vr == "UN":  # not in the PS3.6 dictionary: nothing is known about it
            return Op.REMOVE
        if tag in self.keep_text or tag in self.keep_uids:
            return Op.KEEP
        if vr == "SQ":
            return Op.RECURSE
        if vr == "UI":
            return Op.KEEP if retain_uids else Op.UID
        if vr in ("DA", "DT", "TM"):
            if date_mode == "full":
                return Op.KEEP
            if date_mode == "modified":
                return Op.KEEP if vr == "TM" else Op.SHIFT
            return Op.REMOVE
        if vr in self.free_text_vrs:
            return Op.REMOVE
        return Op.KEEP


def load_unlisted(path: Path) -> Unlisted:
    """Parse ``unlisted.json``; an unknown keyword is an error naming the file."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    return Unlisted(
        rows=tuple(doc["rows"]),
        free_text_vrs=frozenset(doc["free_text_vrs"]),
        keep_text=_tags(doc["keep_text"], path),
        keep_uids=_tags(doc["keep_uids"], path),
        conformance={k: v for k, v in doc["conformance"].items() if not k.startswith("$")},
    )
