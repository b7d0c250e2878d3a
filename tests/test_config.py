"""The configuration system: schemas, loader, `fiona validate`.

The broken-on-purpose files in ``tests/config_cases/broken/`` carry a comment at each fault;
``tests/config_cases/expected_messages.txt`` pins what ``fiona validate`` prints for them.
Regenerate it with ``FIONA_UPDATE_GOLDEN=1 pytest tests/test_config.py`` and review it by eye.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engine.config.loader import (
    COMMAND_LINE,
    ConfigError,
    ConfigIssue,
    load_project,
    load_projects,
    load_site,
)
from engine.config.model import DuplicatePolicy, Limits, SiteConfig, Timeouts, TlsConfig
from engine.config.validate import run_validate

REPO = Path(__file__).resolve().parents[1]
CASES = Path("tests/config_cases")  # relative: tests chdir to REPO
VALID = CASES / "valid"
BROKEN = CASES / "broken"
GOLDEN = REPO / CASES / "expected_messages.txt"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


# --------------------------------------------------------------------------- golden messages


def _golden_runs() -> list[tuple[list[str], list[Path], Path | None, Path | None]]:
    runs: list[tuple[list[str], list[Path], Path | None, Path | None]] = [
        ([str(BROKEN / "projects")], [BROKEN / "projects"], None, None)
    ]
    for site in sorted((BROKEN / "site").glob("*.yaml")):
        args = ["--config", str(site), "--projects", str(VALID / "projects")]
        runs.append((args, [], site, VALID / "projects"))
    return runs


def test_messages_match_golden_file(capsys: pytest.CaptureFixture[str]) -> None:
    out = []
    for args, paths, site, projects in _golden_runs():
        status = run_validate(paths, site_path=site, projects_dir=projects)
        out.append(f"$ fiona validate {' '.join(args)}\n{capsys.readouterr().out}(exit {status})\n")
    text = "".join(out)
    if os.environ.get("FIONA_UPDATE_GOLDEN"):
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_every_broken_file_marks_its_faults() -> None:
    for file in (REPO / BROKEN).rglob("*"):
        if file.is_file():
            assert "FAULT" in file.read_text(encoding="utf-8") or file.name == "dup-name-a.yaml"


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("name", ["site", "project"])
def test_schema_is_complete(name: str) -> None:
    schema = json.loads((REPO / "schemas" / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$id"] and schema["title"]

    def walk(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, where
            props = node["properties"]
            assert isinstance(props, dict)
            for key, sub in props.items():
                assert "description" in sub, f"{where}.{key}"
                assert "default" in sub or key in node.get("required", []), f"{where}.{key}"
                walk(sub, f"{where}.{key}")

    walk(schema, name)


def test_site_schema_defaults_match_model() -> None:
    assert load_site(None) == SiteConfig()


# --------------------------------------------------------------------------- site


def test_valid_site_loads_with_defaults_and_relative_paths() -> None:
    site = load_site(VALID / "site.yaml")
    folder = VALID
    assert site == SiteConfig(
        source=VALID / "site.yaml",
        ae_title="RESEARCH_SCP",
        port=4242,
        bind_address="127.0.0.1",
        data_dir=folder / "data",
        projects_dir=folder / "projects",
        index_url=f"sqlite:///{folder / 'data' / 'index.sqlite'}",
        allowed_calling_aes=("CT_SCANNER", "MR 1"),
        max_pdu=65536,
        duplicate_policy=DuplicatePolicy.QUARANTINE,
        limits=Limits(min_free_disk_mb=1024, max_instance_mb=4096, max_associations=8),
        timeouts=Timeouts(acse=30.0, dimse=90.5, network=120.0),
        tls=TlsConfig(
            enabled=True,
            cert_file=folder / "certs" / "cert.pem",
            key_file=folder / "certs" / "key.pem",
        ),
        log_level="DEBUG",
    )
    assert site.index_path == folder / "data" / "index.sqlite"
    assert isinstance(site.timeouts.acse, float)


def test_missing_file_defaults_stay_relative_to_cwd(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text("port: 104\n")
    site = load_site(file)
    assert (site.port, site.data_dir, site.projects_dir) == (104, Path("var"), Path("projects"))


def test_empty_site_file_means_defaults(tmp_path: Path) -> None:
    file = tmp_path / "site.yaml"
    file.write_text("# nothing set\n")
    assert load_site(file) == SiteConfig(source=file)


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"port": 2000}, lambda s: s.port == 2000),
        ({"ae_title": "OTHER"}, lambda s: s.ae_title == "OTHER"),
        ({"data_dir": "elsewhere"}, lambda s: s.data_dir == Path("elsewhere")),
        ({"projects_dir": Path("p")}, lambda s: s.projects_dir == Path("p")),
        ({"bind_address": "127.0.0.1"}, lambda s: s.bind_address == "127.0.0.1"),
        ({"port": None}, lambda s: s.port == 4242),
    ],
)
def test_overrides_replace_file_values(
    overrides: dict[str, object], check: Callable[[SiteConfig], bool]
) -> None:
    assert check(load_site(VALID / "site.yaml", overrides))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"port": 0}, "(command line) port: expected at least 1, found 0"),
        ({"port": 65536}, "(command line) port: expected at most 65535, found 65536"),
        (
            {"ae_title": "A" * 17},
            f"(command line) ae_title: expected at most 16 characters, found '{'A' * 17}'"
            " (17 characters)",
        ),
        (
            {"colour": "red"},
            "(command line) (root): 'colour' is not allowed (allowed: $comment, ae_title, "
            "allowed_calling_aes, bind_address, data_dir, duplicate_policy, heartbeat, "
            "index_url, limits, log_file, log_level, max_pdu, port, projects_dir, retention, "
            "routing, scan_interval_seconds, status_http, timeouts, tls)",
        ),
    ],
)
def test_bad_overrides_are_errors(overrides: dict[str, object], expected: str) -> None:
    for path in (None, VALID / "site.yaml"):
        with pytest.raises(ConfigError) as exc:
            load_site(path, overrides)
        assert [str(i) for i in exc.value.issues] == [expected]
        assert exc.value.issues[0].file == COMMAND_LINE


def test_site_error_collects_every_issue_in_line_order() -> None:
    with pytest.raises(ConfigError) as exc:
        load_site(BROKEN / "site" / "bad-values.yaml")
    lines = [i.line or 0 for i in exc.value.issues]
    assert len(lines) == 12 and lines == sorted(lines)
    assert str(exc.value) == "\n".join(str(i) for i in exc.value.issues)


def test_missing_site_file_is_an_issue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_site(tmp_path / "nope.yaml")
    assert exc.value.issues[0].message.startswith("cannot read:")


# --------------------------------------------------------------------------- issues


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (
            ConfigIssue(Path("p/a.yaml"), 14, "destinations[0]", "m"),
            "p/a.yaml:14 destinations[0]: m",
        ),
        (ConfigIssue(Path("p/a.yaml"), None, "(root)", "m"), "p/a.yaml (root): m"),
    ],
)
def test_issue_format(issue: ConfigIssue, text: str) -> None:
    assert str(issue) == text


# --------------------------------------------------------------------------- projects


def test_valid_project_loads_with_defaults() -> None:
    project = load_project(VALID / "projects" / "beta.json")
    assert (project.name, project.description, project.enabled) == ("beta", "", True)
    assert project.source == VALID / "projects" / "beta.json"
    assert project.raw["contact"] == {"name": "", "email": ""}


def test_example_project_is_valid() -> None:
    project = load_project(Path("projects/example.yaml"))
    assert project.name == "example" and project.enabled
    first = Path("projects/example.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/project.schema.json"


def test_load_project_raises_with_issues() -> None:
    with pytest.raises(ConfigError) as exc:
        load_project(BROKEN / "projects" / "misspelled-key.yaml")
    assert [i.path for i in exc.value.issues] == ["(root)", "contact", "contact"]
    assert [i.line for i in exc.value.issues] == [3, 6, 7]


def test_load_projects_skips_hidden_drafts_and_other_files() -> None:
    projects, issues = load_projects(VALID / "projects")
    assert [p.name for p in projects] == ["alpha", "beta"]
    assert issues == []


def test_load_projects_keeps_valid_ones_and_reports_broken_ones() -> None:
    projects, issues = load_projects(BROKEN / "projects")
    assert [p.name for p in projects] == ["shared"]
    assert projects[0].source.name == "dup-name-a.yaml"
    bad_files = {i.file.name for i in issues}
    every = {p.name for p in (BROKEN / "projects").iterdir()}
    assert bad_files == every - {"dup-name-a.yaml"}


def test_missing_projects_dir_is_an_issue(tmp_path: Path) -> None:
    projects, issues = load_projects(tmp_path / "absent")
    assert projects == []
    assert [str(i) for i in issues] == [
        f"{tmp_path / 'absent'} (root): projects folder does not exist"
    ]


# --------------------------------------------------------------------------- fiona validate


@pytest.mark.parametrize(
    ("args", "status", "last_line"),
    [
        (["validate", str(BROKEN / "projects" / "wrong-type.yaml")], 1, "1 file checked, 3 errors"),
        (["validate", "projects"], 0, None),
        (["validate"], 0, None),
        (["validate", "--config", str(VALID / "site.yaml")], 0, "3 files checked, 0 errors"),
        (["validate", "no/such/folder"], 1, "0 files checked, 1 error"),
    ],
)
def test_console_script(args: list[str], status: int, last_line: str | None) -> None:
    # The console script installed beside this interpreter (the venv's), not whatever is on PATH.
    script = Path(sys.executable).parent / "fiona"
    command = str(script) if script.exists() else "fiona"
    done = subprocess.run([command, *args], capture_output=True, text=True, check=False)
    assert done.returncode == status, done.stdout + done.stderr
    if last_line is not None:
        assert done.stdout.splitlines()[-1] == last_line
