"""Series labels: what a series is, accumulated instance by instance.

A label from an ordinary rule belongs to the series as soon as one instance has it (the labels
accumulate as instances arrive). A label from a ``series_level: true`` rule (FIONA's
SeriesLevel) belongs to the series only while every instance added so far has it: one instance
without it removes it for good. The accumulator is kept per series by the engine and stored in
the index as JSON (:meth:`SeriesLabels.to_json`, :meth:`SeriesLabels.from_json`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SeriesLabels"]


def _names(doc: Mapping[str, Any], key: str) -> frozenset[str]:
    value = doc.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"series labels: '{key}' must be a list of strings")
    return frozenset(value)


class SeriesLabels:
    """The labels of one series so far; ``series_level`` names the series-level labels."""

    __slots__ = ("count", "every", "seen", "series_level")

    def __init__(self, series_level: Iterable[str] = ()) -> None:
        self.series_level: frozenset[str] = frozenset(series_level)
        #: instances added
        self.count = 0
        #: ordinary labels of any instance
        self.seen: set[str] = set()
        #: series-level labels every instance had (meaningless while count is 0)
        self.every: set[str] = set()

    def add(self, labels: Iterable[str]) -> None:
        """Add one instance's labels (``RuleSet.classify``)."""
        labels = frozenset(labels)
        self.seen |= labels - self.series_level
        if self.count == 0:
            self.every = set(labels & self.series_level)
        else:
            self.every &= labels
        self.count += 1

    @property
    def labels(self) -> frozenset[str]:
        """The series' labels now (none before the first instance)."""
        return frozenset(self.seen | self.every)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document (sorted lists, so equal states serialise equally)."""
        return {
            "instances": self.count,
            "labels": sorted(self.seen),
            "series_level": sorted(self.series_level),
            "every": sorted(self.every),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SeriesLabels:
        """The accumulator saved by :meth:`to_json`; ValueError when the document is not one."""
        count = doc.get("instances")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("series labels: 'instances' must be a non-negative integer")
        out = cls(_names(doc, "series_level"))
        out.count = count
        out.seen = set(_names(doc, "labels"))
        out.every = set(_names(doc, "every"))
        if out.seen & out.series_level or not out.every <= out.series_level:
            raise ValueError("series labels: 'labels' and 'every' disagree with 'series_level'")
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeriesLabels):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SeriesLabels({sorted(self.labels)!r}, instances={self.count})"
