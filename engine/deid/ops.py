"""The actions a resolved profile takes on an element, and how a PS3.15 code becomes one.

PS3.15 Table E.1-1a codes, by the element's VR:

- ``X``: remove. ``Z``: empty value (an empty sequence for SQ).
- ``D``: a dummy value valid for the VR (:data:`engine.deid.values.DUMMY`); a new UID for UI; an
  empty sequence for SQ (a sequence has no dummy value without its IOD's macro).
- ``U``: a keyed UID (:class:`engine.deid.keys.UidMapper`). ``U*`` (from ``X/Z/U*``): keep the
  sequence and apply the profile to its items, so the contained instance UIDs are remapped.
- ``K``: keep; a sequence's items are still cleaned by the profile.
- ``C``: a sequence's items are cleaned; a DA or DT is shifted by the patient's offset under
  Retain Longitudinal Modified Dates (a TM is kept: times alone carry no date); an AE title is
  replaced by a keyed hash; free text (LO, SH, ST, LT, UT, UC, PN) is scrubbed of every
  identifying value found in the instance (:mod:`engine.deid.scrub`); a CS is kept; binary
  values (OB, OW, UN) cannot be cleaned and are removed; numbers are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class Op(IntEnum):
    """One element's action; ints so the per-element dispatch is cheap."""

    KEEP = 0
    REMOVE = 1
    EMPTY = 2
    DUMMY = 3
    UID = 4
    RECURSE = 5
    SHIFT = 6
    CLEAN = 7
    HASH = 8
    SET = 9
    PSEUDO_ID = 10
    PSEUDO_NAME = 11


#: Report key per op: the PS3.15 letter where there is one.
REPORT_NAMES = {
    Op.KEEP: "K",
    Op.REMOVE: "X",
    Op.EMPTY: "Z",
    Op.DUMMY: "D",
    Op.UID: "U",
    Op.RECURSE: "K_sequence",
    Op.SHIFT: "C_date_shift",
    Op.CLEAN: "C_text",
    Op.HASH: "hash",
    Op.SET: "set",
    Op.PSEUDO_ID: "pseudonym_id",
    Op.PSEUDO_NAME: "pseudonym_name",
}

TEXT_VRS = frozenset(("LO", "SH", "ST", "LT", "UT", "UC", "PN"))
BINARY_VRS = frozenset(("OB", "OW", "UN", "OD", "OF", "OL", "OV"))


def date_mode_of(options: Sequence[str]) -> str:
    """``full``, ``modified`` or ``removed``: what the longitudinal options do to dates."""
    if "retain_longitudinal_full_dates" in options:
        return "full"
    return "modified" if "retain_longitudinal_modified_dates" in options else "removed"


def op_for_code(code: str, vr: str, date_mode: str) -> Op:
    """The action for a single (already resolved) code on an element of ``vr``."""
    if code == "X":
        return Op.REMOVE
    if code == "Z":
        return Op.EMPTY
    if code == "D":
        return Op.UID if vr == "UI" else (Op.EMPTY if vr == "SQ" else Op.DUMMY)
    if code == "U":
        return Op.UID if vr == "UI" else Op.HASH
    if code in ("K", "U*"):
        return Op.RECURSE if vr == "SQ" else Op.KEEP
    if code != "C":
        raise ValueError(f"unknown action code {code!r}")
    if vr == "SQ":
        return Op.RECURSE
    if vr in ("DA", "DT"):
        return Op.SHIFT if date_mode == "modified" else Op.KEEP
    if vr == "AE":
        return Op.HASH
    if vr == "UI":
        return Op.UID
    if vr in TEXT_VRS:
        return Op.CLEAN
    if vr in BINARY_VRS:
        return Op.REMOVE
    return Op.KEEP
