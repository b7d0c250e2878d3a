"""The site's ``pacs`` entries: remote PACS fiona queries and retrieves from.

The schema (``$defs.pacs`` in ``schemas/site.schema.json``) has checked each entry's shape,
including the form of its time windows; :func:`pacs_entries` builds the frozen objects and
:func:`pacs_issues` checks what a schema cannot (unique names, TLS files that exist).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.config.issues import ConfigIssue, format_path

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_WINDOW = re.compile(
    r"^(?:(?P<first>[A-Z][a-z]{2})(?:-(?P<last>[A-Z][a-z]{2}))?)?"
    r" ?(?:(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d))?$"
)


class RetrieveMethod(StrEnum):
    """How studies are fetched: C-MOVE (the PACS sends to an SCP) or C-GET (same association)."""

    MOVE = "move"
    GET = "get"


class OnGetRefused(StrEnum):
    """What a ``retrieve: get`` row does when the PACS refuses C-GET: fail, or C-MOVE instead."""

    FAIL = "fail"
    MOVE = "move"


@dataclass(frozen=True)
class TimeWindow:
    """When retrieval may run: on ``days`` (0 = Monday), from ``start`` to ``end`` (minutes
    after midnight, local time). A window whose end is not after its start runs past midnight
    into the next day; the day is that of its start."""

    days: frozenset[int]
    start: int = 0
    end: int = 24 * 60
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        """``Mon-Fri 19:00-07:00``, ``Sat-Sun``, ``22:00-06:00`` (the schema checked the form)."""
        m = _WINDOW.match(text.strip())
        if m is None or not (m["first"] or m["start"]):
            raise ValueError(f"not a time window: {text!r}")
        days = frozenset(range(7))
        if m["first"]:
            first = DAYS.index(m["first"])
            last = DAYS.index(m["last"]) if m["last"] else first
            days = frozenset((first + i) % 7 for i in range((last - first) % 7 + 1))
        if not m["start"]:
            return cls(days, text=text)
        return cls(days, _minutes(m["start"]), _minutes(m["end"]), text)

    def contains(self, when: dt.datetime) -> bool:
        """Whether the local time ``when`` is inside the window."""
        minute = when.hour * 60 + when.minute
        today = when.weekday()
        if self.start < self.end:
            return today in self.days and self.start <= minute < self.end
        # Past midnight: the evening part on a listed day, the morning part the day after one.
        if today in self.days and minute >= self.start:
            return True
        return (today - 1) % 7 in self.days and minute < self.end


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class PacsTls:
    """TLS towards a PACS (PEM files); ``ca_file`` None means the system's CAs."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class PacsLimits:
    """``max_associations`` at once; ``studies_per_hour`` (0: no limit); ``windows`` when
    retrieval may run (empty: any time)."""

    max_associations: int = 2
    studies_per_hour: int = 0
    windows: tuple[TimeWindow, ...] = ()

    def open_at(self, when: dt.datetime) -> bool:
        """Whether retrieval may run at the local time ``when``."""
        return not self.windows or any(w.contains(when) for w in self.windows)


@dataclass(frozen=True)
class PacsTimeouts:
    """Seconds to connect, to negotiate the association, and to wait for each response."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0


@dataclass(frozen=True)
class PacsConfig:
    """One remote PACS. ``calling_ae`` and ``move_destination`` None mean the site's AE title
    (see :meth:`calling_ae_for`, :meth:`move_destination_for`)."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str | None = None
    retrieve: RetrieveMethod = RetrieveMethod.MOVE
    on_get_refused: OnGetRefused = OnGetRefused.FAIL
    move_destination: str | None = None
    tls: PacsTls = field(default_factory=PacsTls)
    limits: PacsLimits = field(default_factory=PacsLimits)
    timeouts: PacsTimeouts = field(default_factory=PacsTimeouts)

    def calling_ae_for(self, site_ae: str) -> str:
        return self.calling_ae or site_ae

    def move_destination_for(self, site_ae: str) -> str:
        return self.move_destination or site_ae


def pacs_entries(
    docs: Sequence[Mapping[str, Any]], path_of: Callable[[str], Path]
) -> tuple[PacsConfig, ...]:
    """The ``pacs`` entries (schema-checked, defaults applied); ``path_of`` resolves a file
    path written in the site file."""
    return tuple(_entry(doc, path_of) for doc in docs)


def _entry(doc: Mapping[str, Any], path_of: Callable[[str], Path]) -> PacsConfig:
    tls, limits, timeouts = doc["tls"], doc["limits"], doc["timeouts"]

    def file(key: str) -> Path | None:
        value = tls[key]
        return None if value is None else path_of(value)

    return PacsConfig(
        name=str(doc["name"]),
        ae_title=str(doc["ae_title"]),
        host=str(doc["host"]),
        port=int(doc["port"]),
        calling_ae=doc["calling_ae"],
        retrieve=RetrieveMethod(doc["retrieve"]),
        on_get_refused=OnGetRefused(doc["on_get_refused"]),
        move_destination=doc["move_destination"],
        tls=PacsTls(
            enabled=bool(tls["enabled"]),
            ca_file=file("ca_file"),
            cert_file=file("cert_file"),
            key_file=file("key_file"),
        ),
        limits=PacsLimits(
            max_associations=int(limits["max_associations"]),
            studies_per_hour=int(limits["studies_per_hour"]),
            windows=tuple(TimeWindow.parse(w) for w in limits["windows"]),
        ),
        timeouts=PacsTimeouts(
            connect=float(timeouts["connect"]),
            acse=float(timeouts["acse"]),
            dimse=float(timeouts["dimse"]),
        ),
    )


def pacs_issues(
    entries: Iterable[PacsConfig], file: Path, line_of: Callable[[Iterable[object]], int | None]
) -> list[ConfigIssue]:
    """Names used twice; a client certificate without its key (or the reverse); TLS files
    that do not exist."""
    issues: list[ConfigIssue] = []
    first: dict[str, int] = {}
    for n, entry in enumerate(entries):
        if entry.name in first:
            where = ("pacs", n, "name")
            message = f"PACS name '{entry.name}' is already used by pacs[{first[entry.name]}]"
            issues.append(ConfigIssue(file, line_of(where), format_path(where), message))
        if entry.name in RESERVED_NAMES:
            where = ("pacs", n, "name")
            message = (
                f"'{entry.name}' is a word of fiona retrieve ({', '.join(RESERVED_NAMES)}):"
                " choose another PACS name"
            )
            issues.append(ConfigIssue(file, line_of(where), format_path(where), message))
        first.setdefault(entry.name, n)
        issues += _tls_issues(entry.tls, n, file, line_of)
    return issues


#: Words ``fiona retrieve`` takes in the place of a PACS name.
RESERVED_NAMES = ("status", "cancel", "retry")


def _tls_issues(
    tls: PacsTls, n: int, file: Path, line_of: Callable[[Iterable[object]], int | None]
) -> list[ConfigIssue]:
    issues = []
    given = {"cert_file": tls.cert_file, "key_file": tls.key_file}
    if (tls.cert_file is None) != (tls.key_file is None):
        have = "cert_file" if tls.cert_file is not None else "key_file"
        missing = "key_file" if have == "cert_file" else "cert_file"
        where = ("pacs", n, "tls", have)
        message = f"{have} is set but {missing} is not"
        issues.append(ConfigIssue(file, line_of(where), format_path(where[:3]), message))
    for key, value in {"ca_file": tls.ca_file, **given}.items():
        if value is not None and not value.is_file():
            where = ("pacs", n, "tls", key)
            issues.append(
                ConfigIssue(file, line_of(where), format_path(where), f"no such file: {value}")
            )
    return issues
