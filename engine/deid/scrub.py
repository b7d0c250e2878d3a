"""Clean free text (action C on LO, SH, ST, LT, UT, UC, PN) by removing identifying values.

No software can promise a description holds no name, so cleaning here is deliberate and narrow:
every value the profile removes or replaces in the same instance (Patient's Name (0010,0010)
components, Patient ID (0010,0020), Accession Number (0008,0050), dates, institution and
physician names, removed private text...) is cut out of the cleaned text wherever it appears,
case-insensitively, and so is any run of 5 or more digits (identifiers, phone numbers, dates in
other formats). Each cut becomes ``*``. A project that cannot accept the remaining risk leaves
the Clean options off, and the texts are removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_DIGITS = r"\d{5,}"
_SPLIT = re.compile(r"[\^=\\]+")
MIN_TERM = 3


class Scrubber:
    """Collects identifying terms, then cleans text in one compiled pass."""

    def __init__(self) -> None:
        self._terms: set[str] = set()
        self._regex: re.Pattern[str] | None = None

    def add(self, value: str, vr: str) -> None:
        """Remember ``value`` (of an element being removed or replaced) as identifying."""
        value = value.strip("\0 ")
        if not value:
            return
        self._regex = None
        parts: Iterable[str] = _SPLIT.split(value)
        if vr == "PN":
            parts = [w for p in parts for w in p.split()]
        for part in parts:
            part = part.strip()
            if len(part) >= MIN_TERM or (vr == "PN" and len(part) >= 2):
                self._terms.add(part.lower())

    def clean(self, text: str) -> str:
        """``text`` with every known term and long digit run replaced by ``*``."""
        if self._regex is None:
            alternatives = []
            for term in sorted(self._terms, key=len, reverse=True):
                escaped = re.escape(term)
                # short terms only as whole words, so 'LEE' does not eat 'SLEEP'
                alternatives.append(escaped if len(term) > 4 else rf"(?<!\w){escaped}(?!\w)")
            alternatives.append(_DIGITS)
            self._regex = re.compile("|".join(alternatives), re.IGNORECASE)
        return self._regex.sub("*", text)
