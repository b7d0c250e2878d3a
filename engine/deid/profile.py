"""Load a de-identification profile (PS3.15 Annex E) and resolve it to one action per tag.

A profile is ``rulesets/anonymize/basic.json`` (generated from PS3.15 Table E.1-1), the safe
private table, the hand-written policy for unlisted attributes (``unlisted.json``), the options a
project chose and its per-attribute overrides. :func:`load_profile` resolves all of that once
into a frozen :class:`Profile` whose ``ops`` map a tag to an :class:`Op`, so applying it costs one
dict lookup per element.

Precedence, most specific first:

1. a project override (``keep``, ``remove``, ``set``, ``hash``) for that keyword or tag;
2. the active options' codes for the row: an option's code replaces the Basic Profile code; where
   several active options give a row different codes, the most protective wins
   (X > Z > D > U > C > K), so Retain Device Identity (K) with Retain Longitudinal Modified Dates
   (C) shifts Date Of Last Detector Calibration (0018,700C) rather than keeping it. The two
   longitudinal options exclude each other (an error);
3. the Basic Profile code; a combined code (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) takes the code listed
   in ``unlisted.json`` ``conformance`` for attributes that are Type 1 or 2 in common IODs, else
   its first code (X, or Z for Z/D);
4. for attributes the table does not list: see :mod:`engine.deid.unlisted`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from engine.config.rulesets import rulesets_dir
from engine.config.sections import RulesetKind
from engine.deid.ops import Op, date_mode_of, op_for_code
from engine.deid.unlisted import Unlisted, load_unlisted
from engine.dicom.values import dictionary_vr

OPTIONS = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)
#: Lower is more protective (precedence between options, see the module docstring).
_RANK = {"X": 0, "Z": 1, "D": 2, "U": 3, "C": 4, "K": 5}
TEMPLATE_FIELDS = frozenset(("pseudonym", "project", "subject", "event"))
PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010


class ProfileError(ValueError):
    """A profile, option or override that cannot be used; the message says which and why."""


class OverrideAction(StrEnum):
    KEEP = "keep"
    REMOVE = "remove"
    SET = "set"
    HASH = "hash"


@dataclass(frozen=True)
class Override:
    """A project's decision for one attribute: keep, remove, set to a template, or keyed hash.

    ``template`` (for ``set``) may use ``{pseudonym}``, ``{project}``, ``{subject}`` and
    ``{event}``; any other field is an error at construction.
    """

    action: OverrideAction | str
    template: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "action", OverrideAction(self.action))
        except ValueError:
            allowed = ", ".join(a.value for a in OverrideAction)
            raise ProfileError(
                f"override action {self.action!r}: expected one of {allowed}"
            ) from None
        if self.action is OverrideAction.SET:
            for _, name, _, _ in string.Formatter().parse(self.template):
                if name is not None and name not in TEMPLATE_FIELDS:
                    raise ProfileError(
                        f"template {self.template!r}: unknown field {{{name}}}; "
                        f"allowed: {', '.join(sorted('{' + f + '}' for f in TEMPLATE_FIELDS))}"
                    )

    @classmethod
    def parse(cls, value: object) -> Override:
        """From config: ``"keep"``, ``"remove"``, ``"hash"`` or ``{"set": "<template>"}``."""
        if isinstance(value, Override):
            return value
        if isinstance(value, str):
            if value == "set":
                raise ProfileError("override 'set' needs a template: {set: '<template>'}")
            return cls(value)
        if isinstance(value, Mapping) and list(value) == ["set"]:
            return cls(OverrideAction.SET, str(value["set"]))
        raise ProfileError(f"override {value!r}: expected keep, remove, hash or {{set: ...}}")


@dataclass(frozen=True)
class Code:
    """A CID 7050 code (De-identification Method Code Sequence (0012,0064) item)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Repeating:
    """A repeating-group row: matches when (group & gmask) == gval and (elem & emask) == eval."""

    gmask: int
    gval: int
    emask: int
    evalue: int
    code: str


@dataclass(frozen=True)
class Profile:
    """A resolved profile. ``ops`` holds every listed (and cached unlisted) tag's action."""

    name: str
    edition: str
    options: tuple[str, ...]
    ops: dict[int, Op]
    codes: dict[int, str]
    templates: dict[int, str]
    repeating: tuple[Repeating, ...]
    retain_private: bool
    safe_private: frozenset[tuple[int, str, int]]
    safe_creators: frozenset[tuple[int, str]]
    unlisted: Unlisted
    method_codes: tuple[Code, ...]
    method_text: tuple[str, ...]
    _cache: dict[int, Op] = field(default_factory=dict, compare=False, repr=False)

    @property
    def date_mode(self) -> str:
        """``full``, ``modified`` or ``removed`` (Longitudinal Temporal Information (0028,0303))."""
        return date_mode_of(self.options)

    @property
    def cleans_text(self) -> bool:
        """Whether any action cleans free text (then identifying values are collected first)."""
        return Op.CLEAN in self.ops.values() or "clean_graphics" in self.options

    @property
    def removes_overlays(self) -> bool:
        """Whether Overlay Data (60xx,3000) is not kept (then overlay planes embedded in Pixel
        Data are cleared too, :mod:`engine.deid.overlays`)."""
        tag = 0x60003000
        return (self.ops[tag] if tag in self.ops else self.op(tag, "OW")) is not Op.KEEP

    def op(self, tag: int, vr: str) -> Op:
        """The action for an even-group ``tag`` (``vr`` as found) not in ``ops``; cached."""
        cached = self._cache.get(tag)
        if cached is not None:
            return cached
        for row in self.repeating:
            if (tag >> 16) & row.gmask == row.gval and tag & row.emask == row.evalue:
                return op_for_code(row.code, vr, self.date_mode)  # VR varies: not cached
        result = self.unlisted.op(tag, self.date_mode, "retain_uids" in self.options)
        self._cache[tag] = result
        return result


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


def _resolve_code(
    row: Mapping[str, Any], options: Sequence[str], conformance: Mapping[str, str]
) -> str:
    codes = [row["options"][o] for o in options if o in row.get("options", {})]
    code = min(codes, key=_RANK.__getitem__) if codes else str(row["basic"])
    if "/" in code:
        chosen = conformance.get(row.get("keyword") or "")
        code = str(chosen) if chosen in code.split("/") else code.split("/")[0]
    return code


def _attribute_tag(name: str) -> int:
    """Tag for a keyword or a ``(gggg,eeee)``/``ggggeeee`` tag; error if neither."""
    text = name.strip()
    hexdigits = text.strip("()").replace(",", "")
    if len(hexdigits) == 8 and all(c in string.hexdigits for c in hexdigits):
        return int(hexdigits, 16)
    tag = tag_for_keyword(text)
    if tag is None:
        raise ProfileError(f"override for {name!r}: not a DICOM keyword or (gggg,eeee) tag")
    return int(tag)


def _profile_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if "/" in text or text.endswith(".json"):
        return Path(text)
    return rulesets_dir() / "anonymize" / f"{text}.json"


def load_profile(
    name_or_path: str | Path = "basic",
    options: Sequence[str] = (),
    overrides: Mapping[str, Override | object] | None = None,
) -> Profile:
    """Resolve a profile (``basic`` or a path to a profile JSON) with options and overrides.

    Raises :class:`ProfileError` for an unknown option, conflicting options, an unknown
    attribute in ``overrides`` or a bad override.
    """
    path = _profile_path(name_or_path)
    if not path.is_file():
        raise ProfileError(f"profile {name_or_path!r}: no file {path}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    known = doc["options"]
    for opt in options:
        if opt not in known:
            raise ProfileError(f"unknown option {opt!r}; known: {', '.join(known)}")
    if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(options):
        raise ProfileError("retain_longitudinal_full_dates and _modified_dates exclude each other")
    chosen = tuple(o for o in OPTIONS if o in options)
    unlisted = load_unlisted(path.parent / "unlisted.json")
    date_mode = date_mode_of(chosen)
    ops: dict[int, Op] = {}
    codes: dict[int, str] = {}
    repeating: list[Repeating] = []
    retain_private = False
    for row in [*doc["rows"], *unlisted.rows]:
        code = _resolve_code(row, chosen, unlisted.conformance)
        kind = row.get("tag_kind", "exact")
        if kind == "private":
            retain_private = code != "X"
        elif kind == "repeating_group":
            m = row["match"]
            repeating.append(
                Repeating(
                    int(m["group_mask"], 16),
                    int(m["group_value"], 16),
                    int(m["element_mask"], 16),
                    int(m["element_value"], 16),
                    code,
                )
            )
        else:
            tag = _tag(row["tag"]) if "tag" in row else int(tag_for_keyword(row["keyword"]) or 0)
            codes[tag] = code
            ops[tag] = op_for_code(code, dictionary_vr(tag), date_mode)
    # Without Clean Graphics the overlay data goes, so the rest of each overlay group goes too.
    if "clean_graphics" not in chosen:
        repeating.insert(0, Repeating(0xFF00, 0x6000, 0x0000, 0x0000, "X"))
    for tag in (PATIENT_ID, PATIENT_NAME):
        if ops[tag] is not Op.KEEP:
            ops[tag] = Op.PSEUDO_ID if tag == PATIENT_ID else Op.PSEUDO_NAME
    templates: dict[int, str] = {}
    for name, raw in (overrides or {}).items():
        override = Override.parse(raw)
        tag = _attribute_tag(name)
        vr = dictionary_vr(tag)
        if override.action is OverrideAction.KEEP:
            ops[tag] = Op.RECURSE if vr == "SQ" else Op.KEEP
        elif override.action is OverrideAction.REMOVE:
            ops[tag] = Op.REMOVE
        elif override.action is OverrideAction.HASH:
            ops[tag] = Op.UID if vr == "UI" else Op.HASH
        else:
            ops[tag] = Op.SET
            templates[tag] = override.template
        codes[tag] = "override:" + OverrideAction(override.action).value
    safe_doc = json.loads((path.parent / "safe_private.json").read_text(encoding="utf-8"))
    safe = frozenset(
        (int(r["group"], 16), r["private_creator"], int(r["element_low_byte"], 16))
        for r in safe_doc["rows"]
    )
    method_codes = (
        Code(**doc["code"]),
        *(Code(known[o]["value"], known[o]["scheme"], known[o]["meaning"]) for o in chosen),
    )
    text = [f"DICOM PS3.15 {doc['edition']} {doc['profile']} profile"[:64]]
    text += [known[o]["meaning"][:64] for o in chosen]
    if overrides:
        text.append(f"fiona project overrides on {len(overrides)} attributes"[:64])
    return Profile(
        name=str(doc["profile"]),
        edition=str(doc["edition"]),
        options=chosen,
        ops=ops,
        codes=codes,
        templates=templates,
        repeating=tuple(repeating),
        retain_private=retain_private,
        safe_private=safe,
        safe_creators=frozenset((g, c) for g, c, _ in safe),
        unlisted=unlisted,
        method_codes=method_codes,
        method_text=tuple(text),
    )


#: ``rulesets/anonymize/``: profile data made by ``engine/deid/generate_profile.py``, which the
#: test suite compares with its generator's output (``fiona validate`` leaves it alone);
#: registered by :mod:`engine.projects`.
PROFILE_KIND = RulesetKind("anonymize", "(generated: engine/deid/generate_profile.py)", None)
