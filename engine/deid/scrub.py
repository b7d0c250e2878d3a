"""Clean free text (action C on LO, SH, ST, LT, UT, UC, PN) by removing identifying values.

No software can promise a description holds no name, so cleaning here is deliberate and narrow:
every value the profile removes or replaces in the same instance (Patient's Name (0010,0010)
components, Patient ID (0010,0020), Accession Number (0008,0050), dates, institution and
physician names, removed private text...) is cut out of the cleaned text wherever it appears,
case-insensitively, and so is any run of 5 or more digits (identifiers, phone numbers, dates in
other formats). Each cut becomes ``*``.

A value is cut in the forms the verification gate (:mod:`engine.deid.verify`) hunts, so a
cleaned text leaves rather than being held: names word by word (split on spaces, hyphens and
apostrophes, and joined: ``O'DONNELL`` as ``ODonnell``) and as typed on another keyboard
(``MÜLLER`` as ``Mueller`` or ``Muller``, ``MUELLER`` as ``Müller``); dates in every written
form (``3rd February 1961``, ``14.03.24``, ``1961-2-3``); addresses and institution names word
by word (``Rosebud``, ``Springfield``, ``Kingsbridge``). A project that cannot accept the
remaining risk leaves the Clean options off, and the texts are removed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from pydicom.datadict import tag_for_keyword

from engine.deid.verify import (
    date_languages,
    date_spellings,
    name_words,
    place_words,
    spellings,
    trie,
)

_DIGITS = r"\d{5,}"
_SPLIT = re.compile(r"[\^=\\]+")
MIN_TERM = 3
#: Addresses and institution names: their distinctive words are cut one by one too.
PLACE_TAGS = frozenset(
    tag_for_keyword(k) or 0
    for k in (
        "PatientAddress", "PersonAddress", "ReferringPhysicianAddress", "InstitutionName",
        "InstitutionAddress",
    )
)  # fmt: skip


class Scrubber:
    """Collects identifying terms, then cleans text in one compiled pass."""

    def __init__(self) -> None:
        self._terms: set[str] = set()
        self._dates: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self._date_regex: re.Pattern[str] | None = None

    def add(self, value: str, vr: str, tag: int = 0) -> None:
        """Remember ``value`` (of element ``tag`` with VR ``vr``, being removed or replaced)
        as identifying."""
        value = value.strip("\0 ")
        if not value:
            return
        self._regex = None
        if vr in ("DA", "DT"):  # its digits are a run of 5 or more: cut whatever the time
            for date in _SPLIT.split(value):
                self._dates.update(_date_terms(date.strip()[:8], date_languages()))
            return
        parts: Iterable[str] = _SPLIT.split(value)
        if vr == "PN":
            parts = [w for p in parts for w in [*p.split(), *name_words(p)]]
        elif tag in PLACE_TAGS:
            parts = [*parts, *place_words(value)]
        for part in parts:
            part = part.strip()
            if len(part) >= MIN_TERM or (vr == "PN" and len(part) >= 2):
                self._terms.update(t.lower() for t in _spelt(part) if len(t) >= 2)

    def clean(self, text: str) -> str:
        """``text`` with every known date, term and long digit run replaced by ``*``."""
        if self._regex is None:
            self._regex = _compiled(frozenset(self._terms))
            self._date_regex = _compiled_dates(frozenset(self._dates)) if self._dates else None
        if self._date_regex is not None:
            text = self._date_regex.sub("*", text)
        return self._regex.sub("*", text)


@functools.lru_cache(maxsize=256)
def _date_terms(value: str, languages: tuple[str, ...]) -> frozenset[str]:
    """The renderings of one date in the gate's ``languages``, lower-case (the same dates
    recur in every instance)."""
    return frozenset(f.lower() for f in date_spellings(value))


def _spelt(term: str) -> set[str]:
    """``term`` and its other spellings (:func:`engine.deid.verify.spellings`) when it has
    letters a keyboard may lack or spell out."""
    if term.isascii() and not any(pair in term.upper() for pair in ("UE", "OE", "AE", "AA", "SS")):
        return {term}
    return {term, *spellings(term)}


@functools.lru_cache(maxsize=64)
def _compiled(terms: frozenset[str]) -> re.Pattern[str]:
    """One expression for ``terms`` (and long digit runs), factored as a prefix trie
    (:func:`engine.deid.verify.trie`) so a text costs one pass whatever the number of terms.
    Short terms only as whole words (``LEE`` does not eat ``SLEEP``)."""
    words = {term: ("none", "none") if len(term) > 4 else ("word", "word") for term in terms}
    pattern = trie(words) if words else "(?!)"
    return re.compile(f"{pattern}|{_DIGITS}", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _compiled_dates(dates: frozenset[str]) -> re.Pattern[str]:
    """One expression for the renderings of a few dates (hundreds of them: compiled once per
    set, which is the same for the instances of a study), each not inside a longer number."""
    return re.compile(trie(dict.fromkeys(dates, ("digit", "digit"))), re.IGNORECASE)
