"""The burned-in PHI gate: which image files may carry text in their pixels, and what to do.

A file is *held* when its BurnedInAnnotation (0028,0301) is YES, or when the project's
:class:`BurnedInPolicy` lists its SOP class, modality, an ImageType value, its ConversionType
or a SeriesDescription pattern (the defaults, documented in ``schemas/pixels.schema.json``
``$defs/burned_in_policy``, cover secondary capture, ultrasound, endoscopy and microscopy,
screen captures and dose screens). :func:`check_burned_in` decides:

* a pixel cleaning rule matches the file (device and size): :class:`Clean` with its regions
  (whether or not the file is held: the rule says the device burns text there);
* held and no rule matches: :class:`Quarantine` (reason ``burned_in``) naming the policy
  entries that held it, never a header value beyond the matched policy entry;
* otherwise, or without pixel data (SR, dose SR, encapsulated PDF: text objects are the
  verification gate's business): :class:`Pass`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.multival import MultiValue
from pydicom.uid import UID

from engine.config.issues import format_path
from engine.config.schema import apply_defaults, load_schema
from engine.deid.ocr import OcrPolicy
from engine.deid.pixels import HeaderFields, PixelRuleSet, Region

__all__ = [
    "REASON",
    "BurnedInPolicy",
    "Clean",
    "Pass",
    "Quarantine",
    "Verdict",
    "check_burned_in",
    "policy_schema",
]

#: Quarantine reason code of this gate.
REASON = "burned_in"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def policy_schema() -> dict[str, Any]:
    """The JSON Schema fragment of the policy (``pixels.schema.json`` ``$defs``)."""
    schema: dict[str, Any] = load_schema("pixels")["$defs"]["burned_in_policy"]
    return schema


@dataclass(frozen=True)
class BurnedInPolicy:
    """A project's burned-in PHI policy; see ``schemas/pixels.schema.json`` for each field.

    Construct with :meth:`from_mapping` (the schema's defaults fill missing keys);
    ``BurnedInPolicy()`` is the default policy.
    """

    sop_classes: frozenset[str] = field(default_factory=lambda: _default("sop_classes"))
    modalities: frozenset[str] = field(default_factory=lambda: _default("modalities"))
    image_types: frozenset[str] = field(default_factory=lambda: _default("image_types"))
    conversion_types: frozenset[str] = field(default_factory=lambda: _default("conversion_types"))
    series_descriptions: tuple[str, ...] = field(
        default_factory=lambda: tuple(sorted(_default("series_descriptions")))
    )
    trust_burned_in_no: bool = False
    pixel_rulesets: tuple[str, ...] = ()
    ocr: OcrPolicy | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        patterns = []
        for text in self.series_descriptions:
            try:
                patterns.append(re.compile(text, re.IGNORECASE))
            except re.error as exc:
                raise ValueError(
                    f"series_descriptions: invalid regular expression {text!r}: {exc.msg}"
                ) from None
        object.__setattr__(self, "_patterns", tuple(patterns))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> BurnedInPolicy:
        """The policy from a project's mapping; raises ValueError naming every bad key."""
        from jsonschema import Draft202012Validator  # start-up cost: see engine.config.schema

        schema = policy_schema()
        doc = copy.deepcopy(dict(data or {}))
        errors = [
            f"{format_path(e.absolute_path)}: {e.message}"
            for e in Draft202012Validator(schema).iter_errors(doc)
        ]
        if errors:
            raise ValueError("; ".join(errors))
        apply_defaults(schema, doc, schema)
        return cls(
            sop_classes=frozenset(doc["sop_classes"]),
            modalities=frozenset(m.upper() for m in doc["modalities"]),
            image_types=frozenset(v.upper() for v in doc["image_types"]),
            conversion_types=frozenset(doc["conversion_types"]),
            series_descriptions=tuple(doc["series_descriptions"]),
            trust_burned_in_no=bool(doc["trust_burned_in_no"]),
            pixel_rulesets=tuple(doc["pixel_rulesets"]),
            ocr=OcrPolicy.from_mapping(doc["ocr"]) if "ocr" in doc else None,
        )

    def ocr_reads(self, ds: HeaderFields) -> bool:
        """Whether the project's OCR reads this file's pixels (see ``ocr.apply_to``)."""
        if self.ocr is None or "PixelData" not in ds:
            return False
        sop_class = str(ds.get("SOPClassUID", "") or "")
        held = bool(self.held_because(ds)) if self.ocr.apply_to == "held" else False
        return self.ocr.applies(ds, held=held, implied_modality=_implied_modality(sop_class))

    def held_because(self, ds: HeaderFields) -> list[str]:
        """Why the policy takes ``ds`` to carry burned-in text ([] when it does not).

        Each entry names the rule, with the value only when it is the policy's own entry
        (a SOP class by name, a modality code), never free text from the header.
        """
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned == "YES":
            return ["BurnedInAnnotation YES"]
        if burned == "NO" and self.trust_burned_in_no:
            return []
        why = []
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class in self.sop_classes:
            why.append(f"SOP class {UID(sop_class).name}")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        implied = "" if modality else _implied_modality(sop_class)
        if (modality or implied) in self.modalities:
            why.append(f"modality {modality}" if modality else f"modality {implied} (SOP class)")
        image_type = {str(v).strip().upper() for v in _values(ds.get("ImageType"))}
        why += [f"ImageType {v}" for v in sorted(image_type & self.image_types)]
        conversion = str(ds.get("ConversionType", "") or "")
        if conversion in self.conversion_types:
            why.append(f"ConversionType {conversion}")
        description = str(ds.get("SeriesDescription", "") or "")
        for pattern in self._patterns:
            if pattern.search(description):
                why.append(f"SeriesDescription matches '{pattern.pattern}'")
        return why


#: The modality a SOP class implies, for files whose Modality (0008,0060) is absent (PS3.4 B.5,
#: PS3.3 A.6, A.7, A.32, A.8): ultrasound (current, enhanced volume and the retired classes),
#: visible light endoscopy, microscopy and photography, secondary capture.
_SOP_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.6": "US",
    "1.2.840.10008.5.1.4.1.1.3": "US",
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
    "1.2.840.10008.5.1.4.1.1.3.1": "US",
    "1.2.840.10008.5.1.4.1.1.6.2": "US",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "ES",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "ES",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "GM",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": "GM",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "XC",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "XC",
    "1.2.840.10008.5.1.4.1.1.7": "OT",
}


def _implied_modality(sop_class: str) -> str:
    """The modality ``sop_class`` implies ('' when it implies none this gate knows)."""
    return _SOP_MODALITY.get(sop_class.strip(), "")


def _default(key: str) -> frozenset[str]:
    return frozenset(policy_schema()["properties"][key]["default"])


def _values(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, list | tuple | MultiValue):
        return list(value)
    return [value]


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Pass:
    """No burned-in text expected: export as is."""


@dataclass(frozen=True)
class Clean:
    """Blank ``regions`` (from pixel rule ``rule``) with :func:`engine.deid.pixels.clean_pixels`."""

    rule: str
    regions: tuple[Region, ...]
    covers_all_text: bool = False


@dataclass(frozen=True)
class Quarantine:
    """Hold the file: reason :data:`REASON`, ``detail`` naming the policy rules (no values)."""

    detail: str
    reason: str = REASON


Verdict = Pass | Clean | Quarantine


def check_burned_in(
    ds: HeaderFields, policy: BurnedInPolicy, cleaner: PixelRuleSet | None = None
) -> Verdict:
    """The gate's decision for one instance.

    The header is enough (pixels are not read): a dataset read with ``stop_before_pixels``
    counts as an image when it has Rows and Columns.
    """
    is_image = any(tag in ds for tag in _PIXEL_TAGS) or ("Rows" in ds and "Columns" in ds)
    if not is_image:
        return Pass()
    rule = cleaner.match(ds) if cleaner is not None else None
    if rule is not None:
        return Clean(rule.name, rule.regions, rule.covers_all_text)
    why = policy.held_because(ds)
    if not why:
        return Pass()
    return Quarantine("; ".join(why) + "; no pixel cleaning rule matches")
