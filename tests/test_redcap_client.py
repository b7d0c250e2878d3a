"""fiona's REDCap client against the REDCap stand-in over real HTTP (``tests/redcap_server.py``).

Batching, spacing and retries are asserted through the server's request log (what REDCap would
have seen), never through timings of the client itself.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engine.redcap import (
    RedcapClient,
    RedcapConfig,
    RedcapRefused,
    RedcapRejected,
    RedcapUnavailable,
    TokenFileError,
    load_token,
)
from tests.redcap_server import RedcapServer, meta

REPO = Path(__file__).resolve().parents[1]
METADATA = [
    meta("record_id", "enrolment"),
    meta("patient_id", "enrolment"),
    meta("research_id", "enrolment"),
    meta("consent", "enrolment", "yesno"),
    meta("dob", "enrolment", validation="date_ymd"),
    meta("accession", "imaging"),
    meta("transfer", "imaging", "radio", choices="0, pending | 1, sent"),
]
EVENTS = ["baseline_arm_1", "followup_arm_1"]


def subjects(n: int) -> list[dict[str, Any]]:
    return [
        {"record_id": str(i), "patient_id": f"PID{i:04d}", "research_id": f"R{i}", "consent": "1"}
        for i in range(1, n + 1)
    ]


@pytest.fixture
def server() -> Iterator[RedcapServer]:
    with RedcapServer(METADATA) as srv:
        srv.put(subjects(7))
        yield srv


def token_file(folder: Path, token: str, mode: int = 0o600) -> Path:
    path = folder / "redcap.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def client_for(srv: RedcapServer, folder: Path, **options: Any) -> RedcapClient:
    """A client with quick test settings (no spacing, short pauses) unless overridden."""
    settings: dict[str, Any] = {
        "timeout_seconds": 5.0,
        "min_interval_seconds": 0.0,
        "retry_backoff_seconds": 0.01,
        **options,
    }
    return RedcapClient(RedcapConfig(srv.url, token_file(folder, srv.token), **settings))


# --------------------------------------------------------------------------- config and token


def test_schema_defaults_are_the_config_defaults() -> None:
    schema = json.loads((REPO / "schemas" / "redcap.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    properties = schema["properties"]
    for item in dataclass_fields(RedcapConfig):
        assert "description" in properties[item.name], item.name
        if item.name in schema["required"]:
            continue
        default = properties[item.name]["default"]
        assert (item.default or "") == default, item.name


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"url": "https://redcap.example.org/api/", "token_file": "t"}, None),
        ({"url": "https://redcap.example.org/redcap/api/", "token_file": "t", "ca_file": ""}, None),
        ({"url": "https://redcap.example.org/", "token_file": "t"}, "does not match"),
        ({"url": "https://redcap.example.org/api/"}, "'token_file' is a required property"),
        ({"url": "https://r.example.org/api/", "token_file": "t", "token": "x"}, "not allowed"),
        ({"url": "https://r.example.org/api/", "token_file": "t", "batch_size": 0}, "minimum"),
    ],
)
def test_schema_table(options: dict[str, Any], problem: str | None) -> None:
    schema = json.loads((REPO / "schemas" / "redcap.schema.json").read_text())
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(options)]
    if problem is None:
        assert errors == []
    else:
        assert any(problem in e or problem in str(e) for e in errors), errors


def test_config_from_options_resolves_paths(tmp_path: Path) -> None:
    config = RedcapConfig.from_options(
        {"url": "https://redcap.example.org/api/", "token_file": "keys/t", "batch_size": 5},
        tmp_path,
    )
    assert config.token_file == tmp_path / "keys" / "t" and config.batch_size == 5
    assert config.ca_file is None and config.host == "redcap.example.org"
    with pytest.raises(ValueError, match="ends with /api/"):
        RedcapConfig("https://redcap.example.org/", tmp_path / "t")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_token_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    token = "0123456789ABCDEF0123456789ABCDEF"
    path = token_file(tmp_path, token, mode)
    with pytest.raises(TokenFileError, match="chmod 600") as caught:
        load_token(path)
    assert token not in str(caught.value)
    path.chmod(0o600)
    assert load_token(path) == token


def test_token_file_must_hold_a_token(tmp_path: Path) -> None:
    path = token_file(tmp_path, "my-password-123")
    with pytest.raises(TokenFileError, match="32 hexadecimal") as caught:
        load_token(path)
    assert "my-password" not in str(caught.value)
    with pytest.raises(TokenFileError, match="cannot read"):
        load_token(tmp_path / "missing")


# --------------------------------------------------------------------------- reading


def test_ping_and_metadata_fields(server: RedcapServer, tmp_path: Path) -> None:
    client = client_for(server, tmp_path)
    assert client.ping() == server.version
    assert client.metadata_fields() == {m["field_name"] for m in METADATA}
    assert client.id_field() == "record_id"
    assert len(server.calls("metadata")) == 1  # read once per client
    assert server.token not in repr(client)


@pytest.mark.parametrize(("count", "batch_size"), [(7, 3), (7, 7), (7, 100), (1, 1)])
def test_records_are_exported_in_batches(
    server: RedcapServer, tmp_path: Path, count: int, batch_size: int
) -> None:
    client = client_for(server, tmp_path, batch_size=batch_size)
    ids = [str(i) for i in range(1, count + 1)]
    got = client.records([*ids, "404", ids[0]], ["research_id", "consent"])
    assert sorted(got, key=int) == ids  # unknown IDs are left out, repeats asked once
    assert got["1"] == [{"record_id": "1", "research_id": "R1", "consent": "1"}]
    calls = server.calls("record")
    assert len(calls) == math.ceil((count + 1) / batch_size)
    assert all(len(c.params["records"]) <= batch_size for c in calls)
    assert len(server.calls("metadata")) == 1


def test_records_of_a_longitudinal_project_with_repeats(tmp_path: Path) -> None:
    with RedcapServer(METADATA, events=EVENTS, repeating_forms=["imaging"]) as srv:
        srv.put([
            {"record_id": "1", "redcap_event_name": "baseline_arm_1", "patient_id": "P1"},
            {"record_id": "1", "redcap_event_name": "followup_arm_1",
             "redcap_repeat_instrument": "imaging", "redcap_repeat_instance": 1, "accession": "A1"},
            {"record_id": "1", "redcap_event_name": "followup_arm_1",
             "redcap_repeat_instrument": "imaging", "redcap_repeat_instance": 2, "accession": "A2"},
        ])  # fmt: skip
        client = client_for(srv, tmp_path)
        rows = client.records(["1"], ["patient_id", "accession"])["1"]
        later = client.records(["1"], ["accession"], events=["followup_arm_1"])["1"]
    assert [
        (r["redcap_event_name"], r["redcap_repeat_instance"], r["accession"]) for r in rows
    ] == [
        ("baseline_arm_1", "", ""),
        ("followup_arm_1", "1", "A1"),
        ("followup_arm_1", "2", "A2"),
    ]
    assert all(isinstance(v, str) for row in rows for v in row.values())
    assert [r["accession"] for r in later] == ["A1", "A2"]


def test_find_by_key_field(server: RedcapServer, tmp_path: Path) -> None:
    server.put(
        [{"record_id": "8", "patient_id": "O'Brien-1"}, {"record_id": "9", "patient_id": "7"}]
    )
    client = client_for(server, tmp_path, batch_size=2)
    wanted = ["PID0002", "PID0005", "nobody", "O'Brien-1", "007", "PID0002"]
    found = client.find("patient_id", wanted, ["research_id"])
    assert found == {
        "PID0002": [{"record_id": "2", "patient_id": "PID0002", "research_id": "R2"}],
        "PID0005": [{"record_id": "5", "patient_id": "PID0005", "research_id": "R5"}],
        "O'Brien-1": [{"record_id": "8", "patient_id": "O'Brien-1", "research_id": ""}],
    }  # "007" is not "7": REDCap's numeric match is re-checked as text
    lookups = [c for c in server.calls("record") if "filterLogic" in c.params]
    assert len(lookups) == math.ceil(5 / 2)
    assert lookups[0].params["filterLogic"] == [
        "[patient_id] = 'PID0002' or [patient_id] = 'PID0005'"
    ]
    assert lookups[1].params["filterLogic"] == [
        "[patient_id] = 'nobody' or [patient_id] = \"O'Brien-1\""
    ]
    assert client.find("patient_id", [], ["research_id"]) == {}


def test_find_returns_every_row_of_a_matching_record(tmp_path: Path) -> None:
    with RedcapServer(METADATA, events=EVENTS) as srv:
        srv.put([
            {"record_id": "1", "redcap_event_name": "baseline_arm_1", "patient_id": "P1"},
            {"record_id": "1", "redcap_event_name": "followup_arm_1", "accession": "ACC1"},
            {"record_id": "2", "redcap_event_name": "baseline_arm_1", "patient_id": "P2"},
        ])  # fmt: skip
        found = client_for(srv, tmp_path).find("patient_id", ["P1"], ["accession"])
    assert [(r["redcap_event_name"], r["accession"]) for r in found["P1"]] == [
        ("baseline_arm_1", ""),
        ("followup_arm_1", "ACC1"),
    ]


def test_field_names_cannot_inject_logic(server: RedcapServer, tmp_path: Path) -> None:
    client = client_for(server, tmp_path)
    with pytest.raises(ValueError, match="not a REDCap field name"):
        client.find("patient_id] = 'x' or [consent", ["a"], [])
    with pytest.raises(ValueError, match="cannot express"):
        client.find("patient_id", ['it\'s "odd"'], [])
    assert server.calls("record") == []


# --------------------------------------------------------------------------- writing


def test_write_imports_in_batches_and_respects_blanks(server: RedcapServer, tmp_path: Path) -> None:
    client = client_for(server, tmp_path, batch_size=2)
    rows = [{"record_id": str(i), "research_id": f"NEW{i}"} for i in range(1, 6)]
    assert client.write(rows) == 5
    imports = server.calls("record", status=None)
    imports = [c for c in imports if c.action == "import"]
    assert len(imports) == 3 and imports[0].params["overwriteBehavior"] == ["normal"]
    assert client.write([{"record_id": "1", "research_id": ""}]) == 1
    assert client.records(["1"], ["research_id"])["1"][0]["research_id"] == "NEW1"
    assert client.write([{"record_id": "1", "research_id": ""}], overwrite=True) == 1
    assert client.records(["1"], ["research_id"])["1"][0]["research_id"] == ""
    assert client.write([]) == 0


def test_write_of_an_unknown_field_names_it(server: RedcapServer, tmp_path: Path) -> None:
    with pytest.raises(RedcapRejected, match="HTTP 400") as caught:
        client_for(server, tmp_path).write([{"record_id": "1", "pseudonym": "SUBJ0001"}])
    assert "pseudonym" in str(caught.value) and "SUBJ0001" not in str(caught.value)
    assert len([c for c in server.log if c.action == "import"]) == 1  # never retried


def test_write_of_invalid_values_quotes_no_data(server: RedcapServer, tmp_path: Path) -> None:
    with pytest.raises(RedcapRejected, match="2 value") as caught:
        client_for(server, tmp_path).write([
            {"record_id": "1", "dob": "1970-31-12", "patient_id": "PID0001"},
            {"record_id": "2", "transfer": "maybe"},
        ])  # fmt: skip
    assert "1970-31-12" not in str(caught.value) and "maybe" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_write_needs_the_record_id(server: RedcapServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="record ID field record_id"):
        client_for(server, tmp_path).write([{"research_id": "R"}])


# --------------------------------------------------------------------------- failures


def test_bad_token_is_refused_without_retry(server: RedcapServer, tmp_path: Path) -> None:
    wrong = "0123456789ABCDEF0123456789ABCDEF"
    config = RedcapConfig(server.url, token_file(tmp_path, wrong), retry_backoff_seconds=0.01)
    with pytest.raises(RedcapRefused) as caught:
        RedcapClient(config).records(["1"], ["research_id"])
    message = str(caught.value)
    assert "HTTP 403" in message and "You do not have permissions to use the API" in message
    assert str(config.token_file) in message
    assert wrong not in message and server.token not in message
    assert caught.value.__context__ is None
    assert [c.status for c in server.log] == [403]


@pytest.mark.parametrize("mode", ["503", "close"])
def test_server_down_is_unavailable_after_the_retries(
    server: RedcapServer, tmp_path: Path, mode: str
) -> None:
    server.set_down(True, mode=mode)
    client = client_for(server, tmp_path, retries=2)
    with pytest.raises(RedcapUnavailable, match=f"REDCap at 127.0.0.1:{server.port}") as caught:
        client.ping()
    assert len(server.log) == 3  # the first try and two retries
    assert server.token not in str(caught.value)
    assert caught.value.__context__ is None


def test_no_answer_in_time_is_unavailable(server: RedcapServer, tmp_path: Path) -> None:
    server.delay = 1.0
    client = client_for(server, tmp_path, retries=1, timeout_seconds=0.2)
    with pytest.raises(RedcapUnavailable, match=r"no answer within 0\.2 s"):
        client.ping()
    assert len(server.log) <= 2


def test_server_back_within_the_retries(server: RedcapServer, tmp_path: Path) -> None:
    server.set_down(True, calls=2)
    client = client_for(server, tmp_path, retries=3)
    assert client.records(["3"], ["research_id"])["3"][0]["research_id"] == "R3"
    assert [c.status for c in server.log] == [503, 503, 200, 200]


def test_calls_are_spaced_by_the_min_interval(server: RedcapServer, tmp_path: Path) -> None:
    """The server's rate limit (1 call per 0.15 s) is never hit by a client spacing 0.2 s."""
    server.rate_limit = (1, 0.15)
    client = client_for(server, tmp_path, batch_size=2, min_interval_seconds=0.2)
    assert len(client.records([str(i) for i in range(1, 8)], ["research_id"])) == 7
    arrivals = [c.at for c in server.log]
    assert len(arrivals) == 5  # metadata, then 4 exports
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(arrivals))
    assert all(c.status == 200 for c in server.log)


def test_rate_limit_answer_is_retried(server: RedcapServer, tmp_path: Path) -> None:
    server.rate_limit = (1, 0.1)
    client = client_for(server, tmp_path, retries=5, retry_backoff_seconds=0.05)
    assert client.ping() == server.version
    assert client.ping() == server.version  # the second one is refused first, then retried
    assert 429 in [c.status for c in server.log]
    assert server.log[-1].status == 200


def test_token_file_permissions_checked_before_any_call(
    server: RedcapServer, tmp_path: Path
) -> None:
    path = token_file(tmp_path, server.token, 0o644)
    with pytest.raises(TokenFileError):
        RedcapClient(RedcapConfig(server.url, path))
    assert server.log == []
    assert os.stat(path).st_mode & 0o777 == 0o644
