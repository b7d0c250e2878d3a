"""The REDCap stand-in (``tests/redcap_server.py``) against REDCap's documented API, via PyCap.

These pin what the stand-in must keep true for the client tests to mean anything: PyCap's
request shapes (form fields, ``records[0]`` arrays, formats) and REDCap's answers (flat rows,
``{"count": n}``, ``{"error": ...}`` bodies with their status codes). Facts and where they come
from are listed in the server's docstring.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import semantic_version  # type: ignore[import-untyped]
from redcap.project import Project
from redcap.request import RedcapError

from tests.redcap_server import FORBIDDEN, RATE_LIMIT_MESSAGE, RedcapServer, meta

METADATA = [
    meta("record_id", "enrolment"),
    meta("mrn", "enrolment", label="Patient ID"),
    meta("consent", "enrolment", "yesno"),
    meta("site", "enrolment", "radio", choices="1, Basel | 2, Bern"),
    meta("dob", "enrolment", validation="date_ymd"),
    meta("visits", "enrolment", validation="integer"),
    meta("accession", "imaging"),
    meta("scan_date", "imaging", validation="date_ymd"),
]
ROWS: list[dict[str, Any]] = [
    {"record_id": "1", "mrn": "A1", "consent": "1", "site": "1", "dob": "1970-01-02"},
    {"record_id": "2", "mrn": "B2", "consent": "0", "site": "2", "dob": "1985-06-30"},
    {"record_id": "3", "mrn": "C3", "consent": "1", "site": "2", "dob": "1990-12-31"},
    {"record_id": "10", "mrn": "D'4", "consent": "1", "site": "1"},
]


@pytest.fixture
def server() -> Iterator[RedcapServer]:
    with RedcapServer(METADATA) as srv:
        srv.put(ROWS)
        yield srv


@pytest.fixture
def project(server: RedcapServer) -> Project:
    return Project(server.url, server.token)


def post(server: RedcapServer, **form: str) -> requests.Response:
    """A raw form POST, for shapes PyCap cannot send (no token, a GET, an unknown content)."""
    return requests.post(server.url, data=form, timeout=10)


# --------------------------------------------------------------------------- simple exports


def test_version_is_plain_text_without_format(project: Project, server: RedcapServer) -> None:
    assert project.export_version() == semantic_version.Version(server.version)
    (call,) = server.calls("version")
    assert call.form == {"content": ["version"]}  # PyCap sends no format for the version


def test_project_info(project: Project, server: RedcapServer) -> None:
    info = project.export_project_info()
    assert info["project_title"] == "fiona test project"
    assert (info["is_longitudinal"], info["has_repeating_instruments_or_events"]) == (0, 0)
    assert server.calls("project")[0].form == {"content": ["project"], "format": ["json"]}


def test_metadata_rows_carry_every_dictionary_column(project: Project) -> None:
    rows = project.export_metadata()
    assert [r["field_name"] for r in rows] == [m["field_name"] for m in METADATA]
    assert len(rows[0]) == 18 and rows[3]["select_choices_or_calculations"] == "1, Basel | 2, Bern"
    assert [r["field_name"] for r in project.export_metadata(forms=["imaging"])] == [
        "accession",
        "scan_date",
    ]


# --------------------------------------------------------------------------- record export


def test_export_by_records_and_fields(project: Project, server: RedcapServer) -> None:
    rows = project.export_records(records=["3", "1"], fields=["dob", "mrn"])
    # Rows come in record order, columns in dictionary order, the record ID first (PyCap adds
    # it to the fields); dates as Y-M-D.
    assert rows == [
        {"record_id": "1", "mrn": "A1", "dob": "1970-01-02"},
        {"record_id": "3", "mrn": "C3", "dob": "1990-12-31"},
    ]
    call = server.calls("record")[-1]
    assert call.form["records[0]"] == ["3"] and call.form["records[1]"] == ["1"]
    assert call.params["fields"] == ["dob", "mrn", "record_id"]
    assert (call.params["type"], call.params["format"]) == (["flat"], ["json"])
    assert call.action == "export" and "token" not in call.form


def test_export_everything_adds_form_status_fields(project: Project) -> None:
    rows = project.export_records(records=["10"])
    assert list(rows[0]) == [
        *("record_id", "mrn", "consent", "site", "dob", "visits", "enrolment_complete"),
        *("accession", "scan_date", "imaging_complete"),
    ]
    assert rows[0]["mrn"] == "D'4" and rows[0]["scan_date"] == ""


def test_export_labels_of_choice_fields(project: Project) -> None:
    rows = project.export_records(records=["2"], fields=["consent", "site"], raw_or_label="label")
    assert rows == [{"record_id": "2", "consent": "No", "site": "Bern"}]


def test_export_eav(project: Project) -> None:
    rows = project.export_records(records=["2"], fields=["mrn", "site"], record_type="eav")
    assert rows == [
        {"record": "2", "field_name": "mrn", "value": "B2"},
        {"record": "2", "field_name": "site", "value": "2"},
    ]


@pytest.mark.parametrize(
    ("logic", "expected"),
    [
        ("[mrn] = 'A1'", ["1"]),
        ("[mrn] = 'A1' or [mrn] = \"C3\"", ["1", "3"]),
        ('[mrn] = "D\'4"', ["10"]),
        ("[consent] = '1' and [site] = 2", ["3"]),
        ("[consent] = 1 AND ([site] = 1 OR [mrn] = 'C3')", ["1", "3", "10"]),
        ("[dob] > '1980-01-01'", ["2", "3"]),
        ("[mrn] <> 'A1' and [dob] <> ''", ["2", "3"]),
        ("[visits] >= 1", []),
        ("[mrn] = 'nobody'", []),
    ],
)
def test_export_filter_logic(project: Project, logic: str, expected: list[str]) -> None:
    rows = project.export_records(fields=["mrn"], filter_logic=logic)
    assert [r["record_id"] for r in rows] == expected


# --------------------------------------------------------------------------- longitudinal, repeats


def test_longitudinal_rows_per_event() -> None:
    events = ["baseline_arm_1", "followup_arm_1"]
    with RedcapServer(METADATA, events=events) as srv:
        srv.put([
            {"record_id": "1", "redcap_event_name": "baseline_arm_1", "mrn": "A1"},
            {"record_id": "1", "redcap_event_name": "followup_arm_1", "accession": "ACC9"},
            {"record_id": "2", "mrn": "B2"},  # no event: REDCap puts it in the first event
        ])  # fmt: skip
        project = Project(srv.url, srv.token)
        rows = project.export_records(fields=["mrn", "accession"], event_name="unique")
        assert [list(r.values()) for r in rows] == [
            ["1", "baseline_arm_1", "A1", ""],
            ["1", "followup_arm_1", "", "ACC9"],
            ["2", "baseline_arm_1", "B2", ""],
        ]
        assert list(rows[0]) == ["record_id", "redcap_event_name", "mrn", "accession"]
        only = project.export_records(fields=["accession"], events=["followup_arm_1"])
        assert [r["redcap_event_name"] for r in only] == ["followup_arm_1"]
        assert srv.calls("record")[-1].form["events[0]"] == ["followup_arm_1"]
        logic = "[baseline_arm_1][mrn] = 'A1'"
        assert len(project.export_records(fields=["mrn"], filter_logic=logic)) == 2
        assert project.export_project_info()["is_longitudinal"] == 1
        assert project.is_longitudinal


def test_repeating_instrument_rows() -> None:
    with RedcapServer(METADATA, repeating_forms=["imaging"]) as srv:
        srv.put([
            {"record_id": "1", "mrn": "A1"},
            {"record_id": "1", "redcap_repeat_instrument": "imaging", "redcap_repeat_instance": 2,
             "accession": "ACC2"},
            {"record_id": "1", "redcap_repeat_instrument": "imaging", "redcap_repeat_instance": 1,
             "accession": "ACC1"},
        ])  # fmt: skip
        rows = Project(srv.url, srv.token).export_records(fields=["mrn", "accession"])
    assert [(r["redcap_repeat_instrument"], r["redcap_repeat_instance"]) for r in rows] == [
        ("", ""),
        ("imaging", 1),
        ("imaging", 2),
    ]
    assert list(rows[0]) == [
        *("record_id", "redcap_repeat_instrument", "redcap_repeat_instance", "mrn", "accession"),
    ]
    assert [r["accession"] for r in rows] == ["", "ACC1", "ACC2"]


# --------------------------------------------------------------------------- import


def test_import_counts_records_and_keeps_blanks_unless_overwrite(
    project: Project, server: RedcapServer
) -> None:
    answer = project.import_records([
        {"record_id": "1", "mrn": "", "visits": "3"},
        {"record_id": "20", "mrn": "E5"},
    ])  # fmt: skip
    assert answer == {"count": 2}
    call = server.calls("record")[-1]
    assert call.action == "import" and call.params["overwriteBehavior"] == ["normal"]
    assert project.export_records(records=["1"], fields=["mrn", "visits"]) == [
        {"record_id": "1", "mrn": "A1", "visits": "3"}
    ]
    assert project.import_records([{"record_id": "1", "mrn": ""}], overwrite="overwrite") == {
        "count": 1
    }
    assert project.export_records(records=["1"], fields=["mrn"])[0]["mrn"] == ""
    assert project.import_records([{"record_id": "30"}], return_content="ids") == ["30"]


def test_import_dates_in_the_given_format(project: Project) -> None:
    project.import_records([{"record_id": "2", "dob": "07/04/1999"}], date_format="MDY")
    project.import_records([{"record_id": "3", "dob": "07/04/1999"}], date_format="DMY")
    rows = project.export_records(records=["2", "3"], fields=["dob"])
    assert [r["dob"] for r in rows] == ["1999-07-04", "1999-04-07"]


def test_import_of_an_unknown_field_is_a_400(project: Project, server: RedcapServer) -> None:
    with pytest.raises(RedcapError) as caught:
        project.import_records([{"record_id": "1", "mrn": "X", "nope": "1", "nada": ""}])
    assert caught.value.args[0] == {
        "error": "The following fields were not found in the project as real data fields: "
        "nope, nada"
    }
    assert server.log[-1].status == 400
    assert project.export_records(records=["1"], fields=["mrn"])[0]["mrn"] == "A1"  # unchanged


def test_import_of_invalid_values_is_a_400_listing_each(project: Project) -> None:
    with pytest.raises(RedcapError) as caught:
        project.import_records([
            {"record_id": "1", "site": "7", "dob": "1970-13-40"},
            {"record_id": "2", "visits": "many"},
        ])  # fmt: skip
    lines = caught.value.args[0]["error"].splitlines()
    assert lines[0] == '"1","site","7","The value is not a valid category for site"'
    assert [line.split(",")[:3] for line in lines[1:]] == [
        ['"1"', '"dob"', '"1970-13-40"'],
        ['"2"', '"visits"', '"many"'],
    ]


# --------------------------------------------------------------------------- errors


def test_bad_token_raises_redcap_message(server: RedcapServer) -> None:
    project = Project(server.url, "0" * 32)
    with pytest.raises(RedcapError) as caught:
        project.export_records()
    assert caught.value.args[0] == {"error": FORBIDDEN}
    with pytest.raises(RedcapError, match=FORBIDDEN):  # no format: the error comes as XML
        project.export_version()
    assert [c.status for c in server.log] == [403, 403]


def test_unknown_export_field_is_a_400(project: Project) -> None:
    with pytest.raises(RedcapError) as caught:
        project.export_records(fields=["mrn", "ghost"])
    assert caught.value.args[0] == {
        "error": "The following values in the parameter \"fields\" are not valid: 'ghost'"
    }


BAD_CONTENT = 'The value of the parameter "content" is not valid'
CLASSIC = "You cannot export form/event mappings for classic projects"


@pytest.mark.parametrize(
    ("form", "status", "body"),
    [
        ({"token": None, "content": "record", "format": "json"}, 403, {"error": FORBIDDEN}),
        ({"token": "A" * 32, "content": "version"}, 403, f"<error>{FORBIDDEN}</error>"),
        ({"content": "bogus", "format": "json"}, 400, {"error": BAD_CONTENT}),
        ({"content": "bogus", "format": "json", "returnFormat": "csv"}, 400, BAD_CONTENT),
        ({"content": "bogus", "returnFormat": "xml"}, 400, f"<hash><error>{BAD_CONTENT}</error>"),
        ({"content": "formEventMapping", "format": "json"}, 400, {"error": CLASSIC}),
    ],
)
def test_error_bodies_follow_return_format(
    server: RedcapServer, form: dict[str, str | None], status: int, body: Any
) -> None:
    """Errors come in ``returnFormat`` (else ``format``, else XML); a missing token is a 403."""
    sent = {k: v for k, v in {"token": server.token, **form}.items() if v is not None}
    answer = post(server, **sent)
    assert answer.status_code == status
    if isinstance(body, dict):
        assert answer.json() == body
    else:
        assert body in answer.text


def test_only_post_is_served(server: RedcapServer) -> None:
    assert requests.get(server.url, timeout=10).status_code == 501


def test_test_controls(server: RedcapServer) -> None:
    """What the client tests lean on: 503 pages, dropped connections, 429, the log."""
    form = {"token": server.token, "content": "version"}
    server.set_down(True, calls=1)
    assert post(server, **form).status_code == 503
    assert post(server, **form).text == server.version
    server.set_down(True, mode="close")
    with pytest.raises(requests.ConnectionError):
        post(server, **form)
    server.set_down(False)
    server.rate_limit = (1, 60.0)
    answer = post(server, **form, returnFormat="json")
    assert (answer.status_code, answer.json()) == (429, {"error": RATE_LIMIT_MESSAGE})
    assert [c.status for c in server.log] == [503, 200, 0, 429]
