"""A stand-in REDCap for tests: a threaded HTTP server that speaks REDCap's API on loopback.

REDCap cannot be installed here, so this is the one stand-in of the test suite. It answers what
fiona calls, in REDCap's shapes, so that PyCap (``redcap.Project``) runs unchanged against it
over real HTTP; ``tests/test_redcap_contract.py`` pins those shapes. Facts it follows, from
REDCap's API help and its API sources (``API/index.php``, ``API/record/export.php``,
``Classes/RestUtility.php``) and PyCap:

- one URL ``<base>/api/``, POST only, form-encoded; ``token`` (32 hexadecimal characters) and
  ``content`` select the call; arrays are sent as ``records[0]=..&records[1]=..``;
- ``returnFormat`` (else ``format``, else xml) is the format of errors: ``{"error": "..."}`` in
  JSON, ``<hash><error>..</error></hash>`` in XML, the bare text in CSV;
- status codes: 403 "You do not have permissions to use the API" for a missing or unknown token,
  400 for a bad parameter ('The value of the parameter "content" is not valid', 'The following
  values in the parameter "fields" are not valid: ...'), 501 for a method other than POST;
- a record import answers ``{"count": n}`` (records touched); unknown fields give 400 "The
  following fields were not found in the project as real data fields: a, b"; invalid values
  give 400 with one ``"record","field","value","message"`` line per value;
- flat exports hold one row per record, event and repeat instance; ``redcap_event_name`` and
  ``redcap_repeat_instrument``/``redcap_repeat_instance`` follow the record ID field (only
  when it is exported); dates are exported as Y-M-D whatever their display format.

Choices of this stand-in (REDCap's exact behaviour or wording was not found in public sources):
``filterLogic`` is evaluated per exported row (``[field]``, ``[event][field]``, ``=``, ``<>``,
``!=``, ``<``, ``>``, ``<=``, ``>=``, ``and``, ``or``, parentheses); API rate limiting answers
429 with :data:`RATE_LIMIT_MESSAGE`; value-validation messages other than REDCap's "not a valid
category" are our own words. Only ``format=json`` is served (the version is plain text).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from tests.peers import free_port

__all__ = [
    "FORBIDDEN",
    "RATE_LIMIT_MESSAGE",
    "LoggedRequest",
    "RedcapServer",
    "meta",
]

FORBIDDEN = "You do not have permissions to use the API"
RATE_LIMIT_MESSAGE = "You have exceeded the maximum number of API requests allowed per minute"
_METADATA_KEYS = (
    "field_name", "form_name", "section_header", "field_type", "field_label",
    "select_choices_or_calculations", "field_note", "text_validation_type_or_show_slider_number",
    "text_validation_min", "text_validation_max", "identifier", "branching_logic",
    "required_field", "custom_alignment", "question_number", "matrix_group_name",
    "matrix_ranking", "field_annotation",
)  # fmt: skip
_CHOICE_TYPES = ("radio", "dropdown", "yesno", "truefalse")
_ARRAY = re.compile(r"^(\w+)\[(\d*)\]$")
#: (record, unique event name or "", repeat instrument or "", repeat instance or 0)
RowKey = tuple[str, str, str, int]


def meta(
    name: str,
    form: str,
    field_type: str = "text",
    *,
    validation: str = "",
    choices: str = "",
    label: str = "",
) -> dict[str, str]:
    """One data dictionary row as ``content=metadata`` exports it (every column present).

    ``choices`` is REDCap's ``"1, Yes | 2, No"``; ``validation`` e.g. ``date_ymd``, ``integer``.
    """
    row = dict.fromkeys(_METADATA_KEYS, "")
    row.update(field_name=name, form_name=form, field_type=field_type, field_label=label or name)
    row["select_choices_or_calculations"] = choices
    row["text_validation_type_or_show_slider_number"] = validation
    return row


class ApiError(Exception):
    """An answer other than 200: REDCap's status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LoggedRequest:
    """One call as the server saw it, without the token: ``at`` is ``time.monotonic()`` on
    arrival; ``form`` the form fields as sent (``records[0]``...); ``params`` the same with
    arrays gathered (``params["records"]``); ``status`` what it answered (0: dropped)."""

    at: float
    content: str
    action: str
    form: dict[str, list[str]]
    params: dict[str, list[str]]
    status: int


# --------------------------------------------------------------------------- the project


@dataclass
class Project:
    """The in-memory REDCap project: data dictionary, events, repeating forms and data."""

    metadata: list[dict[str, str]]
    events: list[str] = field(default_factory=list)
    repeating_forms: set[str] = field(default_factory=set)
    rows: dict[RowKey, dict[str, str]] = field(default_factory=dict)
    title: str = "fiona test project"

    @property
    def pk(self) -> str:
        """The record ID field: the first field of the data dictionary."""
        return self.metadata[0]["field_name"]

    def field_meta(self, name: str) -> dict[str, str] | None:
        return next((m for m in self.metadata if m["field_name"] == name), None)

    def forms(self) -> list[str]:
        return list(dict.fromkeys(m["form_name"] for m in self.metadata))

    def columns(self, name: str) -> list[str]:
        """The export columns of field ``name`` (checkboxes as ``name___code``)."""
        m = self.field_meta(name)
        if m is not None and m["field_type"] == "checkbox":
            return [f"{name}___{code}" for code, _ in choices(m)]
        return [name]

    def data_columns(self) -> dict[str, str]:
        """Every importable column (besides ``redcap_*``) and the form it belongs to."""
        out: dict[str, str] = {}
        for m in self.metadata:
            if m["field_type"] != "descriptive":
                out.update(dict.fromkeys(self.columns(m["field_name"]), m["form_name"]))
        for form in self.forms():
            out[f"{form}_complete"] = form
        return out

    def info(self) -> dict[str, Any]:
        """``content=project``: the project attributes REDCap exports."""
        return {
            "project_id": 1,
            "project_title": self.title,
            "creation_time": "2024-01-01 00:00:00",
            "production_time": "",
            "in_production": 0,
            "project_language": "English",
            "purpose": 2,
            "purpose_other": "",
            "project_notes": "",
            "custom_record_label": "",
            "secondary_unique_field": "",
            "is_longitudinal": int(bool(self.events)),
            "has_repeating_instruments_or_events": int(bool(self.repeating_forms)),
            "surveys_enabled": 0,
            "scheduling_enabled": 0,
            "record_autonumbering_enabled": 0,
            "randomization_enabled": 0,
            "ddp_enabled": 0,
            "project_irb_number": "",
            "project_grant_number": "",
            "project_pi_firstname": "",
            "project_pi_lastname": "",
            "display_today_now_button": 1,
            "missing_data_codes": "",
            "external_modules": "",
            "bypass_branching_erase_field_prompt": 0,
        }


def choices(m: Mapping[str, str]) -> list[tuple[str, str]]:
    """(code, label) pairs of a choice field; yesno/truefalse have fixed ones."""
    if m["field_type"] == "yesno":
        return [("1", "Yes"), ("0", "No")]
    if m["field_type"] == "truefalse":
        return [("1", "True"), ("0", "False")]
    pairs = []
    for item in m["select_choices_or_calculations"].split("|"):
        code, _, label = item.partition(",")
        if code.strip():
            pairs.append((code.strip(), label.strip()))
    return pairs


# --------------------------------------------------------------------------- filter logic

_TOKEN = re.compile(
    r"\s*(?:(?P<ref>(?:\[[A-Za-z0-9_]+\]){1,2})|(?P<str>'[^']*'|\"[^\"]*\")"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><>|!=|<=|>=|=|<|>)|(?P<paren>[()])"
    r"|(?P<word>and|or)\b)",
    re.IGNORECASE,
)


def _tokens(logic: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(logic.rstrip()):
        match = _TOKEN.match(logic, pos)
        if not match or match.lastgroup is None:
            raise ApiError(400, f"The filter logic is not valid near: {logic[pos : pos + 20]}")
        out.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    return out


class FilterLogic:
    """A parsed ``filterLogic``: evaluated on one row, with the record's other rows at hand."""

    def __init__(self, logic: str, project: Project) -> None:
        self.project = project
        self.tokens = _tokens(logic)
        self.pos = 0
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise ApiError(400, "The filter logic is not valid")

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("", "")

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        self.pos += 1
        return token

    def _or(self) -> Any:
        node = self._and()
        while self._peek()[1].lower() == "or":
            self._take()
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._atom()
        while self._peek()[1].lower() == "and":
            self._take()
            node = ("and", node, self._atom())
        return node

    def _atom(self) -> Any:
        if self._peek() == ("paren", "("):
            self._take()
            node = self._or()
            if self._take() != ("paren", ")"):
                raise ApiError(400, "The filter logic is not valid: unbalanced parentheses")
            return node
        left, (kind, op), right = self._operand(), self._take(), self._operand()
        if kind != "op":
            raise ApiError(400, "The filter logic is not valid: a comparison was expected")
        return ("cmp", op, left, right)

    def _operand(self) -> tuple[str, ...]:
        kind, text = self._take()
        if kind == "ref":
            parts = tuple(re.findall(r"\[([A-Za-z0-9_]+)\]", text))
            name = parts[-1]
            if name not in self.project.data_columns() or (
                len(parts) == 2 and parts[0] not in self.project.events
            ):
                raise ApiError(400, f"The filter logic refers to an unknown field: {text}")
            return ("ref", *parts)
        if kind == "str":
            return ("lit", text[1:-1])
        if kind == "num":
            return ("lit", text)
        raise ApiError(400, "The filter logic is not valid: a field or value was expected")

    def matches(self, key: RowKey, row: Mapping[str, str]) -> bool:
        return bool(self._eval(self.tree, key, row))

    def _eval(self, node: Any, key: RowKey, row: Mapping[str, str]) -> bool:
        if node[0] == "or":
            return self._eval(node[1], key, row) or self._eval(node[2], key, row)
        if node[0] == "and":
            return self._eval(node[1], key, row) and self._eval(node[2], key, row)
        _, op, left, right = node
        return _compare(op, self._value(left, key, row), self._value(right, key, row))

    def _value(self, operand: tuple[str, ...], key: RowKey, row: Mapping[str, str]) -> str:
        if operand[0] == "lit":
            return operand[1]
        if len(operand) == 3:  # [event][field]: the record's row in that event
            other = self.project.rows.get((key[0], operand[1], "", 0), {})
            return other.get(operand[2], "")
        return row.get(operand[1], "")


def _compare(op: str, a: str, b: str) -> bool:
    """REDCap compares numbers as numbers, anything else as text."""
    try:
        order = (float(a) > float(b)) - (float(a) < float(b))
    except ValueError:
        order = (a > b) - (a < b)
    if op == "=":
        return order == 0
    if op in ("<>", "!="):
        return order != 0
    if a == "" or b == "":  # an empty value is neither smaller nor larger than anything
        return False
    return {"<": order < 0, ">": order > 0, "<=": order <= 0, ">=": order >= 0}[op]


# --------------------------------------------------------------------------- export


def _quoted(values: Iterable[str]) -> str:
    """REDCap's list in error messages: ``'a', 'b'``."""
    return ", ".join(f"'{v}'" for v in values)


def selected_fields(project: Project, fields: list[str], forms: list[str]) -> list[str]:
    """The fields (and ``<form>_complete`` pseudo-fields) an export returns, in dictionary order;
    a bad field or form name is REDCap's 400."""
    known = {m["field_name"] for m in project.metadata}
    completes = {f"{form}_complete" for form in project.forms()}
    bad = [f for f in dict.fromkeys(fields) if f not in known | completes]
    if bad:
        raise ApiError(
            400, f'The following values in the parameter "fields" are not valid: {_quoted(bad)}'
        )
    bad = [f for f in dict.fromkeys(forms) if f not in project.forms()]
    if bad:
        raise ApiError(
            400, f'The following values in the parameter "forms" are not valid: {_quoted(bad)}'
        )
    wanted = set(fields) | {m["field_name"] for m in project.metadata if m["form_name"] in forms}
    wanted |= {f"{form}_complete" for form in forms}
    everything = not fields and not forms
    out: list[str] = []
    for form in project.forms():
        names = [
            m["field_name"]
            for m in project.metadata
            if m["form_name"] == form and m["field_type"] != "descriptive"
        ]
        out += [n for n in [*names, f"{form}_complete"] if everything or n in wanted]
    return out


def export_columns(project: Project, names: list[str]) -> list[str]:
    """Flat export columns: checkboxes expanded, ``redcap_*`` columns after the record ID."""
    columns: list[str] = []
    for name in names:
        columns += project.columns(name)
        if name == project.pk:
            columns += ["redcap_event_name"] if project.events else []
            if project.repeating_forms:
                columns += ["redcap_repeat_instrument", "redcap_repeat_instance"]
    return columns


def _natural(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)


def _sort_key(project: Project, key: RowKey) -> tuple[Any, ...]:
    event = project.events.index(key[1]) if key[1] in project.events else 0
    return (_natural(key[0]), event, key[2], key[3])


def _cell(project: Project, key: RowKey, row: Mapping[str, str], column: str, labels: bool) -> Any:
    """One exported value: raw code, or its label for choice fields when ``labels``."""
    special = {
        project.pk: key[0],
        "redcap_event_name": key[1],
        "redcap_repeat_instrument": key[2],
        "redcap_repeat_instance": key[3] or "",
    }
    if column in special:
        return special[column]
    name, _, code = column.partition("___")
    m = project.field_meta(name)
    own_row = m is not None and (
        m["form_name"] == key[2] or (not key[2] and m["form_name"] not in project.repeating_forms)
    )
    if m is not None and m["field_type"] == "checkbox" and code:
        value = row.get(column, "0" if own_row else "")
        return {"1": "Checked", "0": "Unchecked"}.get(value, value) if labels else value
    value = row.get(column, "")
    if labels and m is not None and m["field_type"] in _CHOICE_TYPES:
        return dict(choices(m)).get(value, value)
    return value


def export_records(project: Project, params: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """``content=record`` export, flat or EAV, filtered by records, events, fields/forms and
    ``filterLogic``."""
    bad = [e for e in params.get("events", []) if e not in project.events]
    if bad:
        raise ApiError(
            400, f'The following values in the parameter "events" are not valid: {_quoted(bad)}'
        )
    names = selected_fields(project, params.get("fields", []), params.get("forms", []))
    columns = export_columns(project, names)
    logic_text = _one(params, "filterLogic")
    logic = FilterLogic(logic_text, project) if logic_text.strip() else None
    records, events = set(params.get("records", [])), set(params.get("events", []))
    forms = {project.data_columns().get(n, "") for n in names}
    labels = _one(params, "rawOrLabel", "raw").lower() == "label"
    out: list[dict[str, Any]] = []
    for key in sorted(project.rows, key=lambda k: _sort_key(project, k)):
        row = project.rows[key]
        if (records and key[0] not in records) or (events and key[1] not in events):
            continue
        if key[2] and key[2] not in forms:  # a repeat of a form none of whose fields are asked for
            continue
        if logic is not None and not logic.matches(key, row):
            continue
        flat = {c: _cell(project, key, row, c, labels) for c in columns}
        out += [flat] if _one(params, "type", "flat").lower() != "eav" else _eav(project, flat)
    return out


def _eav(project: Project, flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One item per non-empty value: record, [event], [repeat columns], field_name, value."""
    head = {"record": flat.get(project.pk, "")}
    head.update({k: v for k, v in flat.items() if k.startswith("redcap_")})
    return [
        {**head, "field_name": k, "value": v}
        for k, v in flat.items()
        if not k.startswith("redcap_") and k != project.pk and v not in ("", None)
    ]


def _one(params: Mapping[str, list[str]], name: str, default: str = "") -> str:
    values = params.get(name)
    return values[0] if values else default


# --------------------------------------------------------------------------- import

_SPECIAL = ("redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance")
_DATE_FORMATS = {"YMD": "%Y-%m-%d", "MDY": "%m/%d/%Y", "DMY": "%d/%m/%Y"}


def _check_value(project: Project, column: str, value: str, date_format: str) -> tuple[str, str]:
    """(stored value, problem): dates are stored as Y-M-D; problem is "" when valid."""
    m = project.field_meta(column)
    if value == "":
        return "", ""
    if m is None:  # a checkbox column or <form>_complete
        allowed = ("0", "1", "2") if column.endswith("_complete") else ("0", "1")
        ok = value in allowed
        return value, "" if ok else f"The value is not a valid category for {column}"
    if m["field_type"] in _CHOICE_TYPES and value not in dict(choices(m)):
        return value, f"The value is not a valid category for {column}"
    return _check_text(m["text_validation_type_or_show_slider_number"], column, value, date_format)


def _check_text(validation: str, column: str, value: str, date_format: str) -> tuple[str, str]:
    """Text validation types: dates, datetimes (minutes), integers and numbers."""
    pattern = _DATE_FORMATS.get(date_format.upper(), _DATE_FORMATS["YMD"])
    try:
        if validation.startswith("date_"):
            return datetime.strptime(value, pattern).date().isoformat(), ""
        if validation.startswith("datetime_"):
            moment = datetime.strptime(value, f"{pattern} %H:%M")
            return moment.strftime("%Y-%m-%d %H:%M"), ""
        if validation == "integer":
            return str(int(value)), ""
        if validation == "number":
            float(value)
    except ValueError:
        return value, f"The value is not a valid {validation.split('_')[0]} for {column}"
    return value, ""


def import_records(project: Project, data: Any, overwrite: bool, date_format: str) -> list[str]:
    """``content=record`` import (flat JSON): validate everything, then apply; the record IDs
    touched. ``overwrite`` False ("normal") ignores blank values; True erases with them."""
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ApiError(400, "The data being imported is not formatted correctly")
    columns = project.data_columns()
    unknown = [k for item in data for k in item if k not in columns and k not in _SPECIAL]
    if unknown:
        names = ", ".join(dict.fromkeys(unknown))
        raise ApiError(
            400, f"The following fields were not found in the project as real data fields: {names}"
        )
    staged: list[tuple[RowKey, str, str]] = []
    problems: list[str] = []
    keys: list[RowKey] = []
    for item in data:
        key = _row_key(project, item)
        keys.append(key)
        for column, raw in item.items():
            if column in _SPECIAL or column == project.pk:
                continue
            value = "" if raw is None else str(raw).strip()
            stored, problem = _check_value(project, column, value, date_format)
            if problem:
                problems.append(f'"{key[0]}","{column}","{value}","{problem}"')
            staged.append((key, column, stored))
    if problems:
        raise ApiError(400, "\n".join(problems))
    for key in keys:
        project.rows.setdefault(key, {})
    for key, column, stored in staged:
        if stored != "":
            project.rows[key][column] = stored
        elif overwrite:
            project.rows[key].pop(column, None)
    return list(dict.fromkeys(key[0] for key in keys))


def _row_key(project: Project, item: Mapping[str, Any]) -> RowKey:
    record = str(item.get(project.pk, "") or "").strip()
    if not record:
        raise ApiError(400, f"The record id, {project.pk}, cannot be empty")
    event = ""
    if project.events:  # REDCap puts a row without an event in the first event
        event = str(item.get("redcap_event_name") or project.events[0])
        if event not in project.events:
            raise ApiError(400, f"The following values of redcap_event_name are invalid: {event}")
    form = str(item.get("redcap_repeat_instrument") or "")
    if form and form not in project.repeating_forms:
        raise ApiError(400, f"The following values of redcap_repeat_instrument are invalid: {form}")
    instance = int(item.get("redcap_repeat_instance") or 1) if form else 0
    return (record, event, form, instance)


# --------------------------------------------------------------------------- HTTP


def parse_form(body: bytes) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(raw form fields, params with ``name[i]`` arrays gathered under ``name`` in order)."""
    form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    params: dict[str, list[str]] = {}
    indexed: dict[str, list[tuple[int, str]]] = {}
    for key, values in form.items():
        match = _ARRAY.match(key)
        if match:
            index = int(match.group(2) or len(indexed.get(match.group(1), [])))
            indexed.setdefault(match.group(1), []).append((index, values[0]))
        else:
            params[key] = values
    for name, items in indexed.items():
        params[name] = [value for _, value in sorted(items)]
    for name in ("records", "fields", "forms", "events"):  # REDCap also takes "a,b,c"
        if len(params.get(name, [])) == 1 and "," in params[name][0] and name not in indexed:
            params[name] = [v.strip() for v in params[name][0].split(",") if v.strip()]
    return form, params


def error_body(message: str, return_format: str) -> tuple[str, str]:
    """(content type, body) of an error in ``returnFormat`` (RestUtility::sendResponse)."""
    if return_format == "json":
        return "application/json", json.dumps({"error": message})
    if return_format == "csv":
        return "text/html", message
    return (
        "text/xml",
        f'<?xml version="1.0" encoding="UTF-8" ?><hash><error>{message}</error></hash>',
    )


@dataclass
class Answer:
    status: int
    content_type: str
    body: str


class RedcapServer:
    """REDCap's API on ``http://127.0.0.1:<port>/api/`` for one project and one token.

    Test controls: :meth:`set_down`; ``delay`` (seconds to wait before answering);
    ``rate_limit`` = (calls, window in seconds): further calls in the window get 429; ``log``
    (every call received, with arrival time and answer status).
    """

    def __init__(
        self,
        metadata: Iterable[dict[str, str]],
        *,
        events: Iterable[str] = (),
        repeating_forms: Iterable[str] = (),
        token: str | None = None,
        version: str = "14.5.10",
    ) -> None:
        self.project = Project(list(metadata), list(events), set(repeating_forms))
        self.token = token or secrets.token_hex(16).upper()
        self.version = version
        self.port = free_port()
        self.delay = 0.0
        self.rate_limit: tuple[int, float] | None = None
        self.log: list[LoggedRequest] = []
        self._down: str | None = None
        self._down_calls: int | None = None
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def start(self) -> RedcapServer:
        handler = type("Handler", (_Handler,), {"redcap": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        serve = self._httpd.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> RedcapServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_down(self, down: bool = True, *, mode: str = "503", calls: int | None = None) -> None:
        """Make the server unavailable: ``mode`` "503" answers 503 Service Unavailable with an
        HTML page (as a proxy in front of REDCap does), "close" drops the connection unanswered.
        ``calls``: only for that many calls, then it is up again."""
        if mode not in ("503", "close"):
            raise ValueError("mode is '503' or 'close'")
        with self._lock:
            self._down = mode if down else None
            self._down_calls = calls if down else None

    def put(self, rows: list[dict[str, Any]], *, overwrite: bool = False) -> int:
        """Load test data as a record import would (same validation); the records touched."""
        with self._lock:
            return len(import_records(self.project, rows, overwrite, "YMD"))

    def calls(self, content: str | None = None, status: int | None = 200) -> list[LoggedRequest]:
        """Logged calls of one ``content`` (all when None) that got ``status`` (any: None)."""
        with self._lock:
            return [
                c for c in self.log
                if (content is None or c.content == content)
                and (status is None or c.status == status)
            ]  # fmt: skip

    # ------------------------------------------------------------------ answering

    def answer(self, body: bytes, arrived: float) -> Answer | None:
        """The answer to one POST body; None closes the connection unanswered."""
        form, params = parse_form(body)
        content = _one(params, "content").lower()
        action = _one(params, "action") or ("import" if "data" in params else "export")
        down = self._take_down()
        answer = None
        if down != "close":
            if self.delay:
                time.sleep(self.delay)
            answer = self._dispatch(down, content, action, params, arrived)
        entry = LoggedRequest(
            arrived,
            content,
            action,
            {k: v for k, v in form.items() if k != "token"},
            {k: v for k, v in params.items() if k != "token"},
            answer.status if answer else 0,
        )
        with self._lock:
            self.log.append(entry)
        return answer

    def _take_down(self) -> str | None:
        with self._lock:
            down = self._down
            if down and self._down_calls is not None:
                self._down_calls -= 1
                if self._down_calls <= 0:
                    self._down, self._down_calls = None, None
            return down

    def _limited(self, arrived: float) -> bool:
        if self.rate_limit is None:
            return False
        count, window = self.rate_limit
        with self._lock:
            recent = [c for c in self.log if c.at > arrived - window and c.status != 429]
        return len(recent) >= count

    def _dispatch(
        self,
        down: str | None,
        content: str,
        action: str,
        params: dict[str, list[str]],
        arrived: float,
    ) -> Answer:
        fmt = _one(params, "format", "xml").lower()
        return_format = (_one(params, "returnFormat") or fmt).lower()
        if down == "503":
            page = "<html><body><h1>503 Service Unavailable</h1></body></html>"
            return Answer(503, "text/html", page)
        try:
            if _one(params, "token") != self.token:
                raise ApiError(403, FORBIDDEN)
            if self._limited(arrived):  # REDCap limits the calls of a user, known by the token
                raise ApiError(429, RATE_LIMIT_MESSAGE)
            with self._lock:
                return self._content(content, action, fmt, params)
        except ApiError as exc:
            return Answer(exc.status, *error_body(exc.message, return_format))

    def _content(self, content: str, action: str, fmt: str, params: dict[str, list[str]]) -> Answer:
        if content == "version":
            return Answer(200, "text/html", self.version)
        if content not in ("project", "metadata", "record", "formeventmapping"):
            raise ApiError(400, 'The value of the parameter "content" is not valid')
        if fmt != "json":
            raise ApiError(400, "this test server answers only format=json")
        if content == "project":
            return _json(self.project.info())
        if content == "metadata":
            names = selected_fields(self.project, params.get("fields", []), params.get("forms", []))
            return _json([m for m in self.project.metadata if m["field_name"] in names])
        if content == "formeventmapping":
            return _json(self._mapping())
        return self._record_call(action, params)

    def _record_call(self, action: str, params: dict[str, list[str]]) -> Answer:
        if action == "export":
            return _json(export_records(self.project, params))
        if action != "import":
            raise ApiError(400, 'The value of the parameter "action" is not valid')
        try:
            data = json.loads(_one(params, "data"))
        except ValueError:
            raise ApiError(400, "The data being imported is not formatted correctly") from None
        overwrite = _one(params, "overwriteBehavior", "normal").lower() == "overwrite"
        ids = import_records(self.project, data, overwrite, _one(params, "dateFormat", "YMD"))
        returned = _one(params, "returnContent", "count").lower()
        if returned == "ids":
            return _json(ids)
        if returned == "nothing":
            return Answer(200, "application/json", "")
        return _json({"count": len(ids)})

    def _mapping(self) -> list[dict[str, Any]]:
        if not self.project.events:
            raise ApiError(400, "You cannot export form/event mappings for classic projects")
        forms = self.project.forms()
        return [
            {"arm_num": 1, "unique_event_name": e, "form": f}
            for e in self.project.events
            for f in forms
        ]


def _json(value: Any) -> Answer:
    return Answer(200, "application/json", json.dumps(value))


class _Handler(BaseHTTPRequestHandler):
    """Hands each request to :meth:`RedcapServer.answer`; only POST /api/ is served."""

    redcap: RedcapServer

    def do_POST(self) -> None:
        arrived = time.monotonic()
        if self.path.split("?")[0] != "/api/":
            self._send(Answer(404, "text/html", f"The requested URI {self.path} was not found."))
            return
        length = int(self.headers.get("Content-Length") or 0)
        answer = self.redcap.answer(self.rfile.read(length), arrived)
        if answer is None:
            self.close_connection = True
            return
        self._send(answer)

    def do_GET(self) -> None:
        self._send(Answer(501, "text/html", "The requested method is not implemented."))

    def _send(self, answer: Answer) -> None:
        data = answer.body.encode("utf-8")
        self.send_response(answer.status)
        self.send_header("Content-Type", f"{answer.content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return None
