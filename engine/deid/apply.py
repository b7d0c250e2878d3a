"""Apply a resolved :class:`~engine.deid.profile.Profile` to a pydicom Dataset, in place.

Every element at every level of every sequence gets exactly one :class:`~engine.deid.ops.Op`:
one dict lookup for listed tags, a cached one for unlisted standard tags, a Private Creator
lookup for private tags. Elements kept as they are (most of them) are never decoded: pydicom's
raw element stays raw and is written back byte for byte.

Private attributes (odd groups) are removed, except under Retain Safe Private where an element
whose block's Private Creator (gggg,00bb) value is exactly the one PS3.15 Table E.3.10-1 lists
(trailing padding and surrounding spaces, which DICOM ignores in LO, aside) for that group and
whose low element byte matches is kept; such a Private Creator is kept too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from engine.deid.keys import DateShifter, Pseudonym, PseudonymSource, UidMapper, keyed_hash
from engine.deid.ops import TEXT_VRS, Op
from engine.deid.profile import PATIENT_ID, PATIENT_NAME, Profile
from engine.deid.scrub import Scrubber
from engine.dicom.values import dictionary_vr

#: D (dummy) values by VR: non-empty, valid for the VR, carrying nothing.
DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DS": "0",
    "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
    "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
    "UC": "ANONYMIZED", "UR": "urn:anonymized", "UT": "ANONYMIZED",
    "FD": 0.0, "FL": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0, "AT": 0,
    "OB": b"\0\0", "OW": b"\0\0", "UN": b"\0\0", "OD": b"\0" * 8, "OF": b"\0" * 4,
    "OL": b"\0" * 4, "OV": b"\0" * 8,
}  # fmt: skip
#: Maximum value length (characters) for keyed hashes and templates.
MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "AS": 4, "DS": 16, "IS": 12, "TM": 14, "DA": 8}
#: What :meth:`Cleaner.collect` gathers: VRs that hold text, of elements the profile changes.
COLLECT_VRS = TEXT_VRS | {"AE", "DA", "DT", "CS", "UR"}
CHANGING = frozenset(Op) - {Op.KEEP, Op.RECURSE, Op.CLEAN}


@dataclass
class Run:
    """State for one instance: lazily computed offsets and pseudonym, and action counts."""

    patient_id: str
    patient_name: str
    subject: str = ""
    event: str = ""
    counts: list[int] = field(default_factory=lambda: [0] * len(Op))
    days: int | None = None
    alias: Pseudonym | None = None
    scrubber: Scrubber | None = None
    #: Per tag, how many elements got each Op (at any level); None unless a report asks.
    per_tag: dict[int, list[int]] | None = None
    #: Tags written back (``replaced``) or emptied sequences removed (``removed``) because of
    #: the IOD (engine.deid.conform), one per element.
    restored: list[tuple[int, str]] = field(default_factory=list)

    def count(self, tag: int, op: Op) -> None:
        """Count one element ``tag`` given ``op`` (and per tag when :attr:`per_tag` is on)."""
        self.counts[op] += 1
        if self.per_tag is not None:
            row = self.per_tag.get(tag)
            if row is None:
                row = self.per_tag[tag] = [0] * len(Op)
            row[op] += 1


def _vr(elem: DataElement | RawDataElement, tag: int) -> str:
    vr = elem.VR
    return str(vr) if vr and len(vr) == 2 else dictionary_vr(tag)


def text_of(value: Any) -> str:
    """A decoded element value as DICOM text (multiple values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(text_of(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


class Cleaner:
    """Applies one profile with one project's keys; reusable across instances."""

    def __init__(
        self,
        profile: Profile,
        secret: bytes,
        uids: UidMapper,
        dates: DateShifter,
        pseudonyms: PseudonymSource,
        project: str,
    ) -> None:
        self.profile = profile
        self.secret = secret
        self.uids = uids
        self.dates = dates
        self.pseudonyms = pseudonyms
        self.project = project
        self._ops = profile.ops
        #: Count actions per attribute too (``fiona anonymize --report``).
        self.per_attribute = False
        #: SOP Class UIDs the byte path hands to the pydicom path (engine.deid.conform).
        self.not_raw: frozenset[str] = frozenset()

    def op(self, ds: Dataset, tag: int, vr: str) -> Op:
        """The action for ``tag`` in ``ds`` (``ds`` is needed for private creators)."""
        return self.op_of(tag, vr, lambda creator_tag: self._creator(ds, creator_tag))

    def op_of(self, tag: int, vr: str, creator: Callable[[int], str | None]) -> Op:
        """The action for ``tag`` with VR ``vr`` as found; ``creator`` as for :meth:`private_op`."""
        op = self._ops.get(tag)
        if op is not None:
            return op
        if tag & 0x10000:
            return self.private_op(tag, vr, creator)
        return self.profile.op(tag, vr)

    def private_op(self, tag: int, vr: str, creator: Callable[[int], str | None]) -> Op:
        """The action for private ``tag`` (VR ``vr``); ``creator`` gives the stripped value of
        a Private Creator element (gggg,00bb) still present at the same level, or None."""
        if not self.profile.retain_private:
            return Op.REMOVE
        group, elem = tag >> 16, tag & 0xFFFF
        if elem < 0x10:
            return Op.REMOVE
        if elem < 0x100:
            return Op.KEEP if (group, creator(tag)) in self.profile.safe_creators else Op.REMOVE
        block_creator = creator((group << 16) | (elem >> 8))
        if (group, block_creator, elem & 0xFF) not in self.profile.safe_private:
            return Op.REMOVE
        return Op.RECURSE if vr == "SQ" else Op.KEEP

    @staticmethod
    def _creator(ds: Dataset, tag: int) -> str | None:
        if tag not in ds:
            return None
        value = ds.get_item(tag).value
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return str(value).strip("\0 ") if value is not None else None

    # ------------------------------------------------------------------ the walk

    def walk(self, ds: Dataset, run: Run) -> None:
        """Apply the profile to every element of ``ds`` and, recursively, its sequences."""
        counts, per_tag = run.counts, run.per_tag
        for tag in sorted(ds.keys()):
            raw = ds.get_item(tag)
            vr = _vr(raw, tag)
            op = self.op(ds, tag, vr)
            if per_tag is None:
                counts[op] += 1
            else:
                run.count(tag, op)
            if op is Op.KEEP:
                continue
            if op is Op.REMOVE:
                del ds[tag]
            elif op is Op.RECURSE:
                for item in ds[tag].value or ():
                    self.walk(item, run)
            elif op is Op.EMPTY:
                ds[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)
            else:
                self._replace(ds, tag, vr, op, run)

    def _replace(self, ds: Dataset, tag: int, vr: str, op: Op, run: Run) -> None:
        value = "" if op is Op.DUMMY else text_of(ds[tag].value)
        ds[tag] = DataElement(tag, vr, self.replacement(tag, vr, op, value, run))

    def replacement(self, tag: int, vr: str, op: Op, value: str, run: Run) -> Any:
        """The new value of an element ``op`` replaces (not KEEP, REMOVE, EMPTY or RECURSE);
        ``value`` is its current value as DICOM text (:func:`text_of`)."""
        if op is Op.DUMMY:
            return DUMMY.get(vr, b"\0\0")
        if op is Op.UID:
            uids = [self.uids.map(u) for u in value.split("\\")]
            new = uids if len(uids) > 1 else uids[0]
            return new or self.uids.map(f"empty:{tag:08x}:{run.patient_id}")
        if op is Op.SHIFT:
            days = self.days(run)
            return (
                self.dates.shift_da(value, days) if vr == "DA" else self.dates.shift_dt(value, days)
            )
        if op is Op.CLEAN:
            if run.scrubber is None:
                run.scrubber = Scrubber()
            return run.scrubber.clean(value)
        if op is Op.HASH:
            return keyed_hash(self.secret, tag, value, MAX_LENGTH.get(vr, 64)) if value else ""
        if op is Op.SET:
            alias = self.alias(run)
            return self.profile.templates[tag].format(
                pseudonym=alias.id, project=self.project, subject=run.subject, event=run.event
            )[: MAX_LENGTH.get(vr, 64)]
        if op is Op.PSEUDO_ID:
            return self.alias(run).id
        # Op.PSEUDO_NAME
        return PersonName(self.alias(run).name) if vr == "PN" else self.alias(run).name

    def days(self, run: Run) -> int:
        if run.days is None:
            run.days = self.dates.offset_days(run.patient_id)
        return run.days

    def alias(self, run: Run) -> Pseudonym:
        if run.alias is None:
            run.alias = self.pseudonyms.pseudonym(run.patient_id, run.patient_name)
        return run.alias

    # ------------------------------------------------------------------ scrub terms

    def collect(self, ds: Dataset, scrubber: Scrubber) -> None:
        """Add the text of every element this profile removes or replaces to ``scrubber``."""
        for tag in sorted(ds.keys()):  # iterating a Dataset would decode every element
            raw = ds.get_item(tag)
            vr = _vr(raw, tag)
            op = self.op(ds, tag, vr)
            if vr == "SQ":
                for item in ds[tag].value or ():
                    self.collect(item, scrubber)
            elif op in CHANGING and (vr in COLLECT_VRS or (vr == "UN" and tag & 0x10000)):
                value = text_of(ds[tag].value)
                if value.isprintable():
                    scrubber.add(value, vr, tag)


def start_run(ds: Dataset, subject: str = "", event: str = "") -> Run:
    """A :class:`Run` for ``ds`` with its original Patient ID and Patient's Name."""
    pid = text_of(ds[PATIENT_ID].value).strip() if PATIENT_ID in ds else ""
    name = text_of(ds[PATIENT_NAME].value).strip() if PATIENT_NAME in ds else ""
    return Run(pid, name, subject, event)


#: The report's four outcomes for an attribute, by Op (``fiona anonymize --report``).
OUTCOMES: dict[Op, str] = {
    Op.KEEP: "kept", Op.RECURSE: "kept",
    Op.CLEAN: "cleaned", Op.SHIFT: "cleaned",
    Op.DUMMY: "replaced", Op.UID: "replaced", Op.HASH: "replaced", Op.SET: "replaced",
    Op.PSEUDO_ID: "replaced", Op.PSEUDO_NAME: "replaced",
    Op.REMOVE: "removed", Op.EMPTY: "removed",
}  # fmt: skip


def attribute_name(tag: int) -> str:
    """A tag as the report names it: its keyword, else ``(gggg,eeee)`` (private, unknown)."""
    keyword = "" if tag & 0x10000 else keyword_for_tag(tag)
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def per_attribute(per_tag: dict[int, list[int]] | None) -> dict[str, dict[str, int]]:
    """``Run.per_tag`` as attribute name -> outcome -> count (no values)."""
    out: dict[str, dict[str, int]] = {}
    for tag, row in (per_tag or {}).items():
        outcomes = out.setdefault(attribute_name(tag), {})
        for op, n in enumerate(row):
            if n:
                name = OUTCOMES[Op(op)]
                outcomes[name] = outcomes.get(name, 0) + n
    return out
