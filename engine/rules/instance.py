"""What rules are evaluated on: one instance's header plus its series summary."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from engine.rules.attributes import SUMMARY_FIELDS
from engine.rules.values import NOT_MEMOISABLE, Value, ascii_safe, fingerprint, normalise

__all__ = ["STORE_SUMMARY_KEYS", "RuleInput"]

#: The series summary document (engine/store/summary.py) key behind each rule summary field.
STORE_SUMMARY_KEYS = {
    "num_files": "NumFiles",
    "calling_ae": "CallingAETitle",
    "called_ae": "CalledAETitle",
    "calling_ip": "PeerIP",
}

_NO_JSON = object()


def _summary_value(field: str, value: object) -> Value | None:
    if type(value) is str:  # the common case, as normalise would do it
        return value.strip(" \x00")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, list | tuple):
        return normalise(value, None, SUMMARY_FIELDS[field][0])
    if isinstance(value, int | float | str):
        return normalise([value], None, SUMMARY_FIELDS[field][0])
    raise ValueError(f"summary field {field}: expected text, a number or a list")


class RuleInput:
    """One instance as the rules see it.

    ``dataset`` is a pydicom ``Dataset`` as read by ``dcmread(path, stop_before_pixels=True)``
    (or built with ``Dataset.from_json``); rules never change it (pydicom may decode an element
    in place, as reading one through pydicom does). ``summary`` holds the series summary
    fields of :data:`~engine.rules.attributes.SUMMARY_FIELDS` (``num_files``, ``calling_ae``,
    ``called_ae``, ``calling_ip``); a list value (a series sent from several AE titles) is a
    multi-valued value; an absent or None field is missing. Unknown fields are a ValueError.

    Values read, memo keys and the DICOM JSON model are computed once per instance and kept
    here, so rule sets asked about one RuleInput share that work.
    """

    __slots__ = (
        "_ascii",
        "_json",
        "_unkeyable",
        "dataset",
        "results",
        "summary",
        "values",
    )

    def __init__(self, dataset: Dataset, summary: Mapping[str, object] | None = None) -> None:
        self.dataset = dataset
        self.summary: dict[str, Value] = {}
        for field, value in (summary or {}).items():
            if field not in SUMMARY_FIELDS:
                fields = ", ".join(sorted(SUMMARY_FIELDS))
                raise ValueError(f"unknown summary field {field!r} (fields: {fields})")
            if type(value) is str:  # the common cases, as _summary_value would do them
                self.summary[field] = value.strip(" \x00")
                continue
            if type(value) is int:
                self.summary[field] = value
                continue
            normalised = _summary_value(field, value)
            if normalised is not None:
                self.summary[field] = normalised
        self._ascii: bool | None = None
        #: attribute path key -> candidate values (see AttrPath.read)
        self.values: dict[object, tuple[Value, ...]] = {}
        #: evaluator -> its result for this instance
        self.results: dict[object, Any] = {}
        self._json: object = _NO_JSON
        self._unkeyable = False

    @property
    def ascii_ok(self) -> bool:
        """Whether ASCII text decodes the same under the dataset's character set
        (:func:`~engine.rules.values.ascii_safe`), looked up on first use."""
        if self._ascii is None:
            self._ascii = ascii_safe(self.dataset)
        return self._ascii

    @classmethod
    def from_series_summary(cls, dataset: Dataset, doc: Mapping[str, Any]) -> RuleInput:
        """A RuleInput whose summary comes from a series summary document (NumFiles, ...)."""
        fields = {f: doc.get(key) for f, key in STORE_SUMMARY_KEYS.items()}
        return cls(dataset, fields)

    def fingerprints_of(self, tags: tuple[int, ...]) -> tuple[object, ...] | None:
        """:func:`~engine.rules.values.fingerprint` of each tag, or None when one of them
        cannot be keyed.

        This is the hot path of every memo lookup: a raw element (not yet decoded) is keyed by
        its VR, bytes and byte order read straight from pydicom's namedtuple, in one list
        comprehension; anything else goes through :func:`fingerprint`.
        """
        raw = RawDataElement
        slow = self._slow_fingerprint
        elements = cast(dict[int, Any], self.dataset._dict)
        found = tuple(
            [
                (elem[1], elem[3], elem[6])  # VR, value bytes, is_little_endian
                if type(elem) is raw and elem[3] is not None
                else (() if elem is None and tag >> 16 != 2 else slow(tag))
                for tag, elem in zip(tags, map(elements.get, tags), strict=True)
            ]
        )
        if self._unkeyable and NOT_MEMOISABLE in found:
            return None
        return found

    def _slow_fingerprint(self, tag: int) -> object:
        found = fingerprint(self.dataset, tag)
        if found is NOT_MEMOISABLE:
            self._unkeyable = True
        return found

    def json_model(self) -> dict[str, Any] | None:
        """The DICOM JSON model of the dataset (PS3.18 F.2), computed on first use only.

        None when pydicom cannot express the dataset as JSON; JMESPath conditions then see
        nothing (every one is missing).
        """
        if self._json is _NO_JSON:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._json = self.dataset.to_json_dict()
            except Exception:  # undecodable values: no JSON model, and no value in any log
                self._json = None
        return self._json if isinstance(self._json, dict) else None
