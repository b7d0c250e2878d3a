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


def test_the_web_portal_is_on_by_default_and_its_flag_keeps_the_rest_of_its_section(
    tmp_path: Path,
) -> None:
    assert load_site(None).web.enabled and load_site(None).web.port == 8080
    site = tmp_path / "site.yaml"
    site.write_text("web:\n  bind: 127.0.0.2\n  session_idle_minutes: 5\n")
    moved = load_site(site, {"web.enabled": True, "web.port": 9090})
    web = moved.web
    assert (web.port, web.bind, web.session_idle_minutes) == (9090, "127.0.0.2", 5)
    assert not load_site(site, {"web.enabled": False}).web.enabled


def test_date_languages_are_checked_against_the_month_table(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("deidentification:\n  date_languages:\n    - nb\n    - xx\n")
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    (issue,) = caught.value.issues
    assert str(issue).startswith(
        f"{site}:4 deidentification.date_languages[1]: unknown language 'xx': one of da, de,"
    )
    site.write_text("deidentification:\n  date_languages: [nb, de]\n")
    assert load_site(site).deidentification.date_languages == ("nb", "de")
    assert load_site(None).deidentification.date_languages == ()


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
            "allowed_calling_aes, bind_address, data_dir, deidentification, duplicate_policy, "
            "heartbeat, index_url, limits, log_file, log_level, max_pdu, node, pacs, port, "
            "projects_dir, retention, reuse_port, routing, scan_interval_seconds, status_http, "
            "timeouts, tls, web)",
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
        (
            ["validate", "--config", str(VALID / "site.yaml")],
            0,
            "3 files checked, 0 errors, 1 warning",  # the heartbeat's AE is not allowed
        ),
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


# --------------------------------------------------------------------------- hostile YAML

#: "Billion laughs": nine lines expanding to 9**9 (387 million) strings.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
#: The first line whose value passes the bound (9**6 strings > MAX_CONFIG_NODES).
BOMB_LINE = 6


def _bounded(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m engine.cli ARGS`` with 2 GiB of address space and a 120 s timeout: an
    unbounded loader fails the test by running out of either, never by a time threshold."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {k: v for k, v in os.environ.items() if k != "FIONA_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        preexec_fn=limit,
        env=env,
    )


def test_an_alias_bomb_in_projects_is_refused_with_its_line(tmp_path: Path) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "bomb.yaml").write_text(ALIAS_BOMB)
    (projects / "good.yaml").write_text("name: good\n")
    done = _bounded(["validate", str(projects)])
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{projects / 'bomb.yaml'}:{BOMB_LINE} (root): refused: more than" in done.stdout
    assert "aliases are expanded" in done.stdout
    assert done.stdout.splitlines()[-1] == "2 files checked, 1 error"
    assert "Traceback" not in done.stderr


def test_an_alias_bomb_as_site_config_stops_serve_with_one_message(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(ALIAS_BOMB)
    (tmp_path / "projects").mkdir()
    done = _bounded(["serve", "--config", str(site), "--projects", str(tmp_path / "projects")])
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {site}:{BOMB_LINE} (root): refused: more than" in done.stderr
    assert "Traceback" not in done.stderr


def test_loader_counts_values_with_aliases_expanded(tmp_path: Path) -> None:
    """The bound is on values as expanded, so anchors used a few times stay fine."""
    file = tmp_path / "p.yaml"
    file.write_text("name: p\ndescription: &d 'x'\nx-notes: [*d, *d]\n")
    issues = load_projects(tmp_path)[1]
    assert all("refused" not in i.message for i in issues)
    file.write_text("name: p\nloop: &l [*l]\n")
    [issue] = load_projects(tmp_path)[1]
    assert (issue.line, issue.message) == (
        2,
        "refused: an alias refers to a value that contains it",
    )


@pytest.mark.parametrize("as_site", [False, True])
def test_deeply_nested_yaml_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_site: bool
) -> None:
    from engine.cli import main

    file = tmp_path / "deep.yaml"
    file.write_text("name: deep\nx: " + "[" * 10000 + "]" * 10000 + "\n")
    args = ["validate", "--config", str(file)] if as_site else ["validate", str(file)]
    if as_site:
        args += ["--projects", str(tmp_path / "none")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{file}:2 (root): refused: nested deeper than 100 levels" in out


def test_deeply_nested_site_config_stops_serve_with_exit_2(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("[" * 10000 + "]" * 10000 + "\n")
    done = _bounded(["serve", "--config", str(site), "--data", str(tmp_path / "data")])
    assert done.returncode == 2
    assert f"error: {site}:1 (root): refused: nested deeper than 100 levels" in done.stderr
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr


def test_an_oversized_config_file_is_refused_unread(tmp_path: Path) -> None:
    from engine.config.loader import MAX_CONFIG_BYTES

    file = tmp_path / "big.yaml"
    file.write_text("name: big\n" + "#" * MAX_CONFIG_BYTES + "\n")
    [issue] = load_projects(tmp_path)[1]
    assert "too big for a config file (at most 4 MiB)" in issue.message


# --------------------------------------------------------------------------- REDCap token file


def _redcap_project(folder: Path, mode: int) -> Path:
    token = folder / "redcap.token"
    token.write_text("0123456789ABCDEF0123456789ABCDEF\n")
    token.chmod(mode)
    project = folder / "p.yaml"
    project.write_text(
        "name: p\nredcap:\n  url: https://redcap.example.org/api/\n  token_file: redcap.token\n"
    )
    return project


def test_validate_refuses_a_token_file_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _redcap_project(tmp_path, 0o644)
    assert run_validate([project]) == 1
    out = capsys.readouterr().out
    assert f"{project}:4 redcap.token_file: REDCap token file" in out
    assert f"chmod 600 {tmp_path / 'redcap.token'}" in out


def test_validate_accepts_a_private_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _redcap_project(tmp_path, 0o600)
    assert run_validate([project]) == 0, capsys.readouterr().out


def test_a_project_with_a_loose_token_file_still_loads(tmp_path: Path) -> None:
    """Only validate judges the token: a running service picks up a fixed one later."""
    project = _redcap_project(tmp_path, 0o644)
    assert load_project(project).name == "p"


# --------------------------------------------------------------------------- where the config is


@pytest.fixture
def three_sites(tmp_path: Path) -> dict[str, Path]:
    """Site files for --config, $FIONA_CONFIG and /etc, each with its own data folder."""
    out = {}
    for name in ("flag", "env", "etc"):
        (tmp_path / name).mkdir()
        site = tmp_path / name / "site.yaml"
        site.write_text(f"data_dir: data-{name}\n")
        out[name] = site
    return out


@pytest.mark.parametrize(
    "command",
    [["status"], ["audit"], ["quarantine", "list"], ["transfers", "list"], ["db", "status"]],
)
@pytest.mark.sqlite_only("seen through the index file each command looks for")
def test_every_command_finds_the_site_config_the_same_way(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    three_sites: dict[str, Path],
    command: list[str],
) -> None:
    """--config, else $FIONA_CONFIG, else /etc/fiona/site.yaml when present, else defaults;
    seen through the data folder each command names (none has an index yet)."""
    from engine.cli import main

    def data_folder(*extra: str) -> str:
        assert main([*command, *extra]) == 2
        err = capsys.readouterr().err
        assert "wrong --data, or nothing received yet" in err, err
        return err.split("no fiona index in ")[1].split(":")[0]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("engine.config.loader.SYSTEM_SITE_CONFIG", three_sites["etc"])
    monkeypatch.setenv("FIONA_CONFIG", str(three_sites["env"]))
    assert data_folder("--config", str(three_sites["flag"])) == str(tmp_path / "flag/data-flag")
    assert data_folder() == str(tmp_path / "env/data-env")
    monkeypatch.delenv("FIONA_CONFIG")
    assert data_folder() == str(tmp_path / "etc/data-etc")
    monkeypatch.setattr("engine.config.loader.SYSTEM_SITE_CONFIG", tmp_path / "absent.yaml")
    assert data_folder() == "var"
    for name in ("flag", "env", "etc"):
        assert not (tmp_path / name / f"data-{name}").exists()  # nothing created


def test_validate_checks_the_site_config_found_by_fiona_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    site = tmp_path / "site.yaml"
    site.write_text("port: 99999\n")
    (tmp_path / "projects").mkdir()
    monkeypatch.setenv("FIONA_CONFIG", str(site))
    assert main(["validate", "--projects", str(tmp_path / "projects")]) == 1
    assert f"{site}:1 port: expected at most 65535" in capsys.readouterr().out
