"""A project's ``redcap:`` section, the shared connection per REDCap, and record keys.

The section (``schemas/project.schema.json``, ``redcap``) holds the connection keys of
``schemas/redcap.schema.json`` plus what the pipeline features need (outage backoff, consent
re-check interval, transfer requests). Steps only get their own options and the project file, so
:func:`settings_for_file` reads the section from the project file itself (cached per file
version); scheduler jobs read it from the loaded project with :func:`settings_of`.

:func:`connection` hands out one :class:`Connection` per REDCap configuration, so that a consent
step, an anonymize step and the scheduler jobs of one project share one client (its spacing and
serialisation then hold for all of them) and one outage backoff.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.config.files import ParsedFile, parse_file
from engine.config.issues import ConfigIssue
from engine.config.model import ProjectConfig
from engine.config.sections import ProjectSection
from engine.dicom.header import parse_header
from engine.redcap.client import RedcapClient, RedcapConfig, TokenFileError, load_token

__all__ = [
    "SECTION",
    "Connection",
    "KeySource",
    "RecordKey",
    "RedcapSettings",
    "RequestFields",
    "connection",
    "settings_for_file",
    "settings_of",
    "token_file_issues",
]


class KeySource(StrEnum):
    """What of a study a REDCap record is looked up by."""

    PATIENT_ID = "patient_id"  # (0010,0020) of the study's first archived file
    ACCESSION_NUMBER = "accession_number"  # (0008,0050) of the study's first archived file
    SUBJECT = "subject"  # the coupling list's subject of the run


@dataclass(frozen=True)
class RecordKey:
    """``key: {field, from}``: the REDCap ``field`` that holds the study's ``source`` value."""

    field: str
    source: KeySource

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RecordKey:
        return cls(str(options["field"]), KeySource(str(options["from"])))

    def value(self, subject: str, files: Sequence[Path]) -> str:
        """The study's value to look up: ``subject`` or a header value of ``files[0]`` (empty
        when there is none). Reads only the first file: these values are per study."""
        if self.source is KeySource.SUBJECT:
            return subject.strip()
        if not files:
            return ""
        header = parse_header(files[0].read_bytes())
        found = (
            header.patient_id if self.source is KeySource.PATIENT_ID else header.accession_number
        )
        return found.strip()

    def describe(self) -> str:
        """For details and logs: which value, never the value itself."""
        what = {"patient_id": "PatientID", "accession_number": "AccessionNumber"}
        return f"{what.get(self.source.value, 'subject')} in REDCap field {self.field}"


@dataclass(frozen=True)
class RequestFields:
    """``redcap.requests``: the transfer-request fields and how often they are polled."""

    poll_seconds: float = 300.0
    events: tuple[str, ...] = ()
    study: str = "study"
    project: str = "project"
    subject: str = "subject"
    event: str = "event"
    status: str = "status"
    status_date: str = "status_date"
    error: str = "error"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RequestFields:
        names = ("study", "project", "subject", "event", "status", "status_date", "error")
        return cls(
            poll_seconds=float(options.get("poll_seconds", 300.0)),
            events=tuple(str(e) for e in options.get("events", [])),
            **{n: str(options[n]) for n in names if n in options},
        )


@dataclass(frozen=True)
class RedcapSettings:
    """A project's ``redcap:`` section; times in seconds."""

    config: RedcapConfig
    outage_backoff: float = 60.0
    outage_max_backoff: float = 3600.0
    consent_recheck: float = 3600.0
    requests: RequestFields | None = None

    def backoff(self, failures: int) -> float:
        """The wait after ``failures`` (>= 1) unavailable tries in a row."""
        return min(self.outage_max_backoff, self.outage_backoff * 2.0 ** max(0, failures - 1))


def settings_of(raw: Mapping[str, Any], folder: Path) -> RedcapSettings | None:
    """The ``redcap`` section of a project document (None when it has none); relative paths
    are relative to ``folder``, the project file's folder."""
    section = raw.get("redcap")
    if not isinstance(section, Mapping):
        return None
    requests = section.get("requests")
    return RedcapSettings(
        config=RedcapConfig.from_options(section, folder),
        outage_backoff=float(section.get("outage_backoff_seconds", 60.0)),
        outage_max_backoff=float(section.get("outage_max_backoff_seconds", 3600.0)),
        consent_recheck=float(section.get("consent_recheck_seconds", 3600.0)),
        requests=RequestFields.from_options(requests) if isinstance(requests, Mapping) else None,
    )


_FILES: dict[Path, tuple[tuple[int, int], RedcapSettings | None]] = {}
_FILES_LOCK = threading.Lock()


def settings_for_file(project_file: Path) -> RedcapSettings | None:
    """The ``redcap`` section of ``project_file`` (None: it has none, or cannot be read).

    Parsed with the config loader (the file passed its schema when the project was loaded);
    cached until the file changes.
    """
    try:
        stat = project_file.stat()
    except OSError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _FILES_LOCK:
        hit = _FILES.get(project_file)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    data = parse_file(project_file).data
    found = settings_of(data, project_file.parent) if isinstance(data, Mapping) else None
    with _FILES_LOCK:
        _FILES[project_file] = (stamp, found)
    return found


def token_file_issues(project: ProjectConfig) -> list[ConfigIssue]:
    """``fiona validate``'s check of a project's REDCap ``token_file``: it can be read, only
    its owner can read or write it (chmod 600), and it holds an API token. Not checked when
    projects load, so that a project still loads and picks up a token fixed later."""
    section = project.raw.get("redcap")
    if not isinstance(section, Mapping) or not section.get("token_file"):
        return []
    path = Path(str(section["token_file"])).expanduser()
    path = path if path.is_absolute() else project.source.parent / path
    try:
        load_token(path)
    except TokenFileError as exc:
        line = parse_file(project.source).line_of(("redcap", "token_file"))
        return [ConfigIssue(project.source, line, "redcap.token_file", str(exc))]
    return []


def _check_section(project: ProjectConfig, parsed: ParsedFile) -> list[ConfigIssue]:
    return []  # the schema covers the section; what uses it checks the rest (consent step)


#: The ``redcap`` section of a project file, registered by :mod:`engine.projects`.
SECTION = ProjectSection(
    "redcap", "redcap.schema.json", _check_section, validate=token_file_issues
)


class Connection:
    """One REDCap (url, token file, settings): a client made on first use, and the outage
    count that spaces the retries of the studies waiting on it.

    The client is made lazily so that a token file fixed after the engine started is read on
    the next try, and a project whose REDCap token is broken still loads.
    """

    def __init__(self, config: RedcapConfig) -> None:
        self.config = config
        self._client: RedcapClient | None = None
        self._lock = threading.Lock()
        self.failures = 0

    def client(self) -> RedcapClient:
        """The client (raises :class:`~engine.redcap.client.TokenFileError` for a bad token
        file; tried again on the next call)."""
        with self._lock:
            if self._client is None:
                self._client = RedcapClient(self.config)
            return self._client

    def failed(self) -> int:
        """Count one more unavailable try in a row; the count."""
        with self._lock:
            self.failures += 1
            return self.failures

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0


_CONNECTIONS: dict[RedcapConfig, Connection] = {}
_CONNECTIONS_LOCK = threading.Lock()


def connection(config: RedcapConfig) -> Connection:
    """The shared connection for ``config`` (one per distinct configuration)."""
    with _CONNECTIONS_LOCK:
        found = _CONNECTIONS.get(config)
        if found is None:
            found = _CONNECTIONS[config] = Connection(config)
        return found
