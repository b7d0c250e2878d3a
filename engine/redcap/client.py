"""fiona's REDCap access: batched exports, look-ups by a key field, imports, over PyCap.

Consent, research IDs and transfer requests live in REDCap. :class:`RedcapClient` is the one way
fiona talks to it, built from a project's ``redcap:`` section (``schemas/redcap.schema.json``):

- the API token comes from ``token_file`` (mode 600), never from a config file;
- calls are serialised and spaced by ``min_interval_seconds`` (from the end of one call to the
  start of the next), so a busy pipeline cannot trip REDCap's API rate limit or its abuse ban;
- record exports ask for ``batch_size`` records per call;
- network errors, timeouts, 5xx and 429 answers are retried ``retries`` times with doubling
  pauses (a ``Retry-After`` header is honoured), then raise :class:`RedcapUnavailable`;
- errors never carry the token or PHI: REDCap's messages that quote record values (validation
  errors) are summarised, and PyCap's exception (which holds REDCap's answer) is not chained.

PyCap does not look at HTTP status codes, so a requests response hook records each one and the
client classifies failures by status: none (no answer), 429/5xx (retry), 401/403 (token or
rights), other 4xx (the request itself).
"""

from __future__ import annotations

import logging
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import requests
from redcap.project import Project
from redcap.request import RedcapError as PycapError

__all__ = [
    "RedcapClient",
    "RedcapConfig",
    "RedcapError",
    "RedcapRefused",
    "RedcapRejected",
    "RedcapUnavailable",
    "TokenFileError",
    "load_token",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_Overwrite = Literal["normal", "overwrite"]

#: A REDCap project API token: 32 hexadecimal characters (PyCap checks the length too).
_TOKEN = re.compile(r"^[0-9A-Fa-f]{32}$")
#: REDCap variable names: lower-case letters, digits and underscores.
_FIELD = re.compile(r"^[a-z][a-z0-9_]*$")
#: Messages of REDCap that name only parameters, fields or events, never record data.
_SAFE_MESSAGES = (
    "You do not have permissions to use the API",
    "You do not have API",
    'The value of the parameter "',
    'The following values in the parameter "',
    "The following fields were not found in the project as real data fields",
    "The following values of redcap_event_name are invalid",
    "The data being imported is not formatted correctly",
)


class RedcapError(Exception):
    """REDCap could not do what fiona asked. Messages are for operators: no token, no PHI."""


class RedcapUnavailable(RedcapError):
    """No usable answer after the retries: unreachable, timed out, 5xx, or rate limited."""


class RedcapRefused(RedcapError):
    """REDCap refused the token (401/403): wrong token, or the user lacks API rights."""


class RedcapRejected(RedcapError):
    """REDCap rejected the request itself (400...), e.g. a field that is not in the project."""


class TokenFileError(RedcapError, ValueError):
    """A token file that must not be used; the message says why (never what it holds)."""


def load_token(path: str | Path) -> str:
    """The API token in ``path`` (surrounding whitespace dropped).

    Refuses a file that group or other users can read or write (chmod 600 it), like
    ``engine.deid.keys.load_secret``, and one that does not hold 32 hexadecimal characters.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise TokenFileError(f"REDCap token file {path}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH):
        raise TokenFileError(
            f"REDCap token file {path} is readable or writable by other users "
            f"(mode {stat.filemode(mode)}); run: chmod 600 {path}"
        )
    if not _TOKEN.match(text):
        raise TokenFileError(
            f"REDCap token file {path} does not hold an API token "
            "(32 hexadecimal characters, from the project's API page)"
        )
    return text


@dataclass(frozen=True)
class RedcapConfig:
    """A project's ``redcap:`` section; defaults as in ``schemas/redcap.schema.json``.

    ``url`` is the API URL (``https://redcap.example.org/api/``); ``token_file`` holds the
    token; times are in seconds; ``batch_size`` is records per export call (and per import).
    ``ca_file`` (PEM) replaces the system's CAs for a REDCap with an in-house certificate.
    """

    url: str
    token_file: Path
    timeout_seconds: float = 30.0
    batch_size: int = 100
    min_interval_seconds: float = 0.5
    retries: int = 3
    retry_backoff_seconds: float = 1.0
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"REDCap url {self.url!r}: expected http(s)://<host>/.../api/")
        if not self.url.endswith("/api/"):
            raise ValueError(f"REDCap url {self.url!r}: REDCap's API URL ends with /api/")
        if self.timeout_seconds <= 0 or self.batch_size < 1 or self.retries < 0:
            raise ValueError("REDCap timeout_seconds > 0, batch_size >= 1 and retries >= 0")
        if self.min_interval_seconds < 0 or self.retry_backoff_seconds < 0:
            raise ValueError("REDCap min_interval_seconds and retry_backoff_seconds are >= 0")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], folder: Path) -> RedcapConfig:
        """From a ``redcap:`` mapping that passed the schema; relative paths are relative to
        ``folder`` (the project file's folder)."""

        def path(value: Any) -> Path:
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else folder / p

        known = {k: options[k] for k in _NUMBERS if k in options}
        ca_file = options.get("ca_file") or None
        return cls(
            url=str(options["url"]),
            token_file=path(options["token_file"]),
            ca_file=path(ca_file) if ca_file else None,
            **known,
        )

    @property
    def host(self) -> str:
        """Host (and port) of the URL, for messages: never user info or path."""
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


_NUMBERS = (
    "timeout_seconds",
    "batch_size",
    "min_interval_seconds",
    "retries",
    "retry_backoff_seconds",
)


class RedcapClient:
    """One REDCap project, reached through PyCap with spacing, batching and retries.

    Thread-safe: calls are serialised (they must be spaced anyway). The data dictionary is read
    once, on first need, and kept for the client's lifetime.
    """

    def __init__(self, config: RedcapConfig) -> None:
        self.config = config
        token = load_token(config.token_file)
        verify: bool | str = str(config.ca_file) if config.ca_file else True
        self._project = Project(
            config.url,
            token,
            verify_ssl=verify,
            timeout=config.timeout_seconds,
            hooks={"response": self._on_response},
        )
        self._lock = threading.Lock()
        self._last_end = float("-inf")
        self._status: int | None = None
        self._retry_after = 0.0
        self._dictionary: list[dict[str, Any]] | None = None

    def __repr__(self) -> str:  # never the token
        return f"RedcapClient({self.config.url!r})"

    # ------------------------------------------------------------------ what fiona uses

    def ping(self) -> str:
        """REDCap's version (``content=version``): proves the URL and the token work."""
        version = self._call("version call", lambda p: p.export_version())
        if version is None:
            raise RedcapRejected(
                f"REDCap at {self.config.host} did not answer the version call with a version "
                "number; is the url REDCap's API URL?"
            )
        return str(version)

    def metadata_fields(self) -> set[str]:
        """The field names of the project's data dictionary (``content=metadata``)."""
        return {str(row.get("field_name", "")) for row in self._metadata()} - {""}

    def id_field(self) -> str:
        """The record ID field: the first field of the data dictionary."""
        rows = self._metadata()
        if not rows:
            raise RedcapRejected(f"REDCap at {self.config.host} sent an empty data dictionary")
        return str(rows[0].get("field_name", ""))

    def records(
        self,
        ids: Sequence[str],
        fields: Sequence[str],
        *,
        id_field: str | None = None,
        events: Sequence[str] | None = None,
    ) -> dict[str, list[dict[str, str]]]:
        """Rows of the records ``ids``, keyed by record ID (unknown IDs are left out).

        A record has one row per event (``redcap_event_name``) and repeat instance
        (``redcap_repeat_instrument``/``redcap_repeat_instance``); each row holds ``fields``,
        the ID field and those columns, all as text. ``batch_size`` IDs per export call;
        ``events`` limits a longitudinal project to those unique event names.
        """
        wanted_ids = list(dict.fromkeys(str(i) for i in ids if str(i)))
        if not wanted_ids:
            return {}
        key = id_field or self.id_field()
        wanted = _fields([key, *fields])
        out: dict[str, list[dict[str, str]]] = {}
        for chunk in _chunks(wanted_ids, self.config.batch_size):
            for row in self._export(wanted, records=chunk, events=events):
                out.setdefault(row.get(key, ""), []).append(row)
        return out

    def find(
        self, field: str, values: Sequence[str], fields: Sequence[str]
    ) -> dict[str, list[dict[str, str]]]:
        """The records whose ``field`` (a key such as a PatientID or accession number field)
        equals one of ``values``: value -> every row of those records (as :meth:`records`).

        Two steps, each batched by ``batch_size``: ``filterLogic`` exports of the ID and key
        fields (``[field] = 'a' or [field] = 'b' ...``) find the record IDs, then
        :meth:`records` fetches ``fields`` of those records. Asking REDCap to filter sends
        only the matching subjects over the wire (rather than every subject's key), and the
        second step also finds the rows of other events of a longitudinal project. Matches are
        re-checked as exact text, since REDCap compares numbers as numbers ('007' = '7').
        """
        key_field = _fields([field])[0]
        wanted = [v for v in dict.fromkeys(str(v) for v in values) if v]
        if not wanted:
            return {}
        key = self.id_field()
        owners: dict[str, list[str]] = {}
        for chunk in _chunks(wanted, self.config.batch_size):
            logic = " or ".join(f"[{key_field}] = {_quote(v)}" for v in chunk)
            for row in self._export(_fields([key, key_field]), filter_logic=logic):
                value = row.get(key_field, "")
                if value in chunk and row.get(key, "") not in owners.get(value, []):
                    owners.setdefault(value, []).append(row.get(key, ""))
        ids = [record for records in owners.values() for record in records]
        rows = self.records(ids, [key_field, *fields], id_field=key)
        return {v: [r for rec in owners[v] for r in rows.get(rec, [])] for v in owners}

    def select(
        self, fields: Sequence[str], logic: str, *, events: Sequence[str] | None = None
    ) -> list[dict[str, str]]:
        """Every row for which REDCap's filter ``logic`` holds, with the ID field and
        ``fields`` (one export). ``logic`` must be built from field names and constants only,
        never from record data (REDCap's logic has no escapes): for small sets such as open
        transfer requests, not for subjects (use :meth:`find`)."""
        return self._export(_fields([self.id_field(), *fields]), events=events, filter_logic=logic)

    def write(self, rows: Sequence[Mapping[str, str]], *, overwrite: bool = False) -> int:
        """Import ``rows`` (flat: the ID field, ``redcap_event_name`` / repeat columns when
        needed, then fields); the number of records REDCap reports touched.

        ``overwrite`` False is REDCap's ``overwriteBehavior=normal`` (blank values are left
        out); True erases stored values with blanks. ``batch_size`` records per call, a
        record's rows kept together; a retried import writes the same values again.
        """
        if not rows:
            return 0
        key = self.id_field()
        groups: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            if not str(row.get(key, "")):
                raise ValueError(f"a row to import has no value for the record ID field {key}")
            groups.setdefault(str(row[key]), []).append(dict(row))
        behaviour: _Overwrite = "overwrite" if overwrite else "normal"
        total = 0
        for chunk in _chunks(list(groups.values()), self.config.batch_size):
            total += self._import([row for group in chunk for row in group], behaviour)
        return total

    # ------------------------------------------------------------------ one call each

    def _export(
        self,
        fields: list[str],
        *,
        records: list[str] | None = None,
        events: Sequence[str] | None = None,
        filter_logic: str | None = None,
    ) -> list[dict[str, str]]:
        """One flat JSON record export; every value as text."""
        self._metadata()  # PyCap reads the dictionary before an export: keep that call spaced

        def export(p: Project) -> Any:
            return p.export_records(
                records=records,
                fields=fields,
                events=list(events) if events else None,
                filter_logic=filter_logic,
                event_name="unique",
                raw_or_label="raw",
            )

        return self._rows(self._call("record export", export), "record export")

    def _import(self, batch: list[dict[str, str]], behaviour: _Overwrite) -> int:
        """One record import of ``batch``; REDCap's count of records touched."""

        def load(p: Project) -> Any:
            return p.import_records(batch, overwrite=behaviour)

        answer = self._call("record import", load)
        if not isinstance(answer, dict) or not str(answer.get("count", "")).isdigit():
            raise RedcapRejected(f"REDCap at {self.config.host} answered an import oddly")
        return int(answer["count"])

    def _metadata(self) -> list[dict[str, Any]]:
        """The data dictionary, read once through PyCap (which keeps it for its exports)."""
        if self._dictionary is None:
            rows = self._call("metadata export", lambda p: p.metadata)
            self._dictionary = [dict(r) for r in rows if isinstance(r, dict)]
        return self._dictionary

    def _rows(self, answer: Any, what: str) -> list[dict[str, str]]:
        if not isinstance(answer, list) or not all(isinstance(r, dict) for r in answer):
            raise RedcapRejected(f"REDCap at {self.config.host} answered the {what} oddly")
        return [{str(k): "" if v is None else str(v) for k, v in r.items()} for r in answer]

    # ------------------------------------------------------------------ spacing and retries

    def _call(self, what: str, fn: Callable[[Project], T]) -> T:
        """``fn`` (one HTTP call through PyCap), spaced from the previous call and retried on
        failures worth retrying; ``what`` names the call in messages ("record export")."""
        with self._lock:
            for attempt in range(self.config.retries + 1):
                outcome = self._attempt(what, fn)
                if not isinstance(outcome, RedcapError):
                    return outcome
                if not isinstance(outcome, RedcapUnavailable) or attempt == self.config.retries:
                    raise outcome
                pause = max(self.config.retry_backoff_seconds * 2**attempt, self._retry_after)
                log.warning(
                    "%s (retry %d of %d in %.1f s)",
                    outcome,
                    attempt + 1,
                    self.config.retries,
                    pause,
                )
                time.sleep(pause)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _attempt(self, what: str, fn: Callable[[Project], T]) -> T | RedcapError:
        """One try: the result, or the failure as one of our errors (raised by the caller)."""
        wait = self._last_end + self.config.min_interval_seconds - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._status, self._retry_after = None, 0.0
        try:
            result = fn(self._project)
        except PycapError as exc:
            # PyCap's error holds REDCap's answer (record data) and requests' holds the URL:
            # keep neither; the status and the kind of failure say enough.
            return self._failure(what, exc)
        finally:
            self._last_end = time.monotonic()
        if self._status is not None and self._status >= 500:
            return self._failure(what, None)
        return result

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests hook: note the status (PyCap ignores it) and any Retry-After seconds."""
        self._status = response.status_code
        after = response.headers.get("Retry-After", "")
        self._retry_after = min(float(after), 300.0) if after.isdigit() else 0.0

    def _failure(self, what: str, exc: Exception | None) -> RedcapError:
        """Our error for a failed call, by HTTP status (None: no answer)."""
        where, status = f"REDCap at {self.config.host}", self._status
        if status is None:
            if isinstance(exc, requests.Timeout):
                reason = f"no answer within {self.config.timeout_seconds:g} s"
            elif isinstance(exc, requests.exceptions.SSLError):
                reason = "TLS failed (is the server's certificate trusted? see ca_file)"
            else:
                reason = "no connection, or it was dropped before an answer"
            return RedcapUnavailable(f"{where}: {what} failed: {reason}")
        if status == 429:
            return RedcapUnavailable(f"{where}: {what} refused: API rate limit reached (HTTP 429)")
        if status >= 500:
            return RedcapUnavailable(f"{where}: {what} failed: HTTP {status}")
        if status in (401, 403):
            return RedcapRefused(
                f"{where} refused the API token from {self.config.token_file} (HTTP {status}: "
                f"{_message(exc)}); check the token and the user's API rights in the project"
            )
        if status < 400:  # an answer that is not REDCap's (a login page at a wrong url)
            return RedcapRejected(
                f"{where}: {what}: the answer is not REDCap's API; is the url REDCap's API URL?"
            )
        return RedcapRejected(f"{where} rejected the {what} (HTTP {status}): {_message(exc)}")


def _message(exc: Exception | None) -> str:
    """REDCap's error text when it names only fields or parameters; a summary otherwise."""
    answer = exc.args[0] if exc is not None and exc.args else ""
    text = str(answer.get("error", "")) if isinstance(answer, dict) else str(answer)
    inner = re.search(r"<error>(.*?)</error>", text, re.DOTALL)
    text = (inner.group(1) if inner else text).strip()
    if text.startswith(_SAFE_MESSAGES):
        return text[:300]
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if lines:
        return f"{len(lines)} value(s) failed REDCap's validation (not shown: they are data)"
    return "REDCap's message is not shown, as it may quote record data"


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fields(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, each checked to be a REDCap variable name (they go into
    filter logic, so nothing else may pass)."""
    for name in names:
        if not _FIELD.match(name):
            raise ValueError(f"{name!r} is not a REDCap field name (a-z, 0-9, _)")
    return list(dict.fromkeys(names))


def _quote(value: str) -> str:
    """``value`` as a filter-logic string; REDCap's logic has no escapes, so a value holding
    both quote characters cannot be looked up."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError("a lookup value holds both ' and \"; REDCap's filter logic cannot express it")
