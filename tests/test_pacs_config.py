"""The site's ``pacs`` entries: loading, defaults, time windows (broken files: the golden
messages of tests/test_config.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from engine.config.loader import ConfigError, load_site
from engine.config.pacs import (
    OnGetRefused,
    PacsConfig,
    PacsLimits,
    PacsTimeouts,
    PacsTls,
    RetrieveMethod,
    TimeWindow,
)


def test_pacs_entries_load_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here\n")
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        "ae_title: RESEARCH\n"
        "pacs:\n"
        "  - {name: clinical, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "  - name: archive\n"
        "    ae_title: OLDPACS\n"
        "    host: old.example.org\n"
        "    port: 11112\n"
        "    calling_ae: FIONA_Q\n"
        "    retrieve: get\n"
        "    on_get_refused: move\n"
        "    move_destination: FIONA_STORE\n"
        "    tls: {enabled: true, ca_file: ca.pem}\n"
        "    limits: {max_associations: 1, studies_per_hour: 30, windows: [Sat-Sun]}\n"
        "    timeouts: {dimse: 120}\n"
    )
    site = load_site(site_file)
    clinical, archive = site.pacs
    assert clinical == PacsConfig("clinical", "PACS", "10.0.0.5", 104)
    assert clinical.calling_ae_for(site.ae_title) == "RESEARCH"
    assert clinical.move_destination_for(site.ae_title) == "RESEARCH"
    assert clinical.retrieve is RetrieveMethod.MOVE
    assert archive.retrieve is RetrieveMethod.GET
    assert clinical.on_get_refused is OnGetRefused.FAIL  # C-MOVE needs the PACS's set-up
    assert archive.on_get_refused is OnGetRefused.MOVE
    assert archive.calling_ae_for(site.ae_title) == "FIONA_Q"
    assert archive.move_destination_for(site.ae_title) == "FIONA_STORE"
    assert archive.tls == PacsTls(enabled=True, ca_file=tmp_path / "ca.pem")
    assert archive.limits == PacsLimits(1, 30, (TimeWindow.parse("Sat-Sun"),))
    assert archive.timeouts == PacsTimeouts(connect=10.0, acse=30.0, dimse=120.0)
    assert site.pacs_named("archive") is archive and site.pacs_named("nope") is None


def test_no_pacs_by_default() -> None:
    assert load_site(None).pacs == ()


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text("pacs:\n  - {name: clinical, ae_title: PACS, port: 104}\n")
    with pytest.raises(ConfigError) as err:
        load_site(site_file)
    assert [str(i) for i in err.value.issues] == [
        f"{site_file}:2 pacs[0]: missing required key 'host'"
    ]


# (window, local time, inside). 2026-12-07 is a Monday.
WINDOWS = [
    ("Mon-Fri 19:00-07:00", "2026-12-07 19:00", True),
    ("Mon-Fri 19:00-07:00", "2026-12-07 18:59", False),
    ("Mon-Fri 19:00-07:00", "2026-12-08 06:59", True),  # Tuesday morning, from Monday
    ("Mon-Fri 19:00-07:00", "2026-12-08 07:00", False),
    ("Mon-Fri 19:00-07:00", "2026-12-07 03:00", False),  # Monday morning: Sunday's night
    ("Mon-Fri 19:00-07:00", "2026-12-12 03:00", True),  # Saturday morning, from Friday
    ("Mon-Fri 19:00-07:00", "2026-12-12 20:00", False),
    ("Sat-Sun", "2026-12-12 12:00", True),
    ("Sat-Sun", "2026-12-13 23:59", True),
    ("Sat-Sun", "2026-12-14 00:00", False),
    ("Sun-Mon", "2026-12-07 10:00", True),  # a range across the week's end
    ("Sun-Mon", "2026-12-08 10:00", False),
    ("22:00-06:00", "2026-12-09 23:30", True),
    ("22:00-06:00", "2026-12-09 12:00", False),
    ("Wed 09:00-10:00", "2026-12-09 09:30", True),
    ("Wed 09:00-10:00", "2026-12-09 10:00", False),
    ("Wed 09:00-10:00", "2026-12-10 09:30", False),
]


@pytest.mark.parametrize(("window", "when", "inside"), WINDOWS)
def test_time_windows(window: str, when: str, inside: bool) -> None:
    moment = dt.datetime.strptime(when, "%Y-%m-%d %H:%M")
    assert TimeWindow.parse(window).contains(moment) is inside


def test_no_windows_means_any_time() -> None:
    assert PacsLimits().open_at(dt.datetime(2026, 12, 7, 12, 0))
    nights = PacsLimits(windows=(TimeWindow.parse("Mon-Fri 19:00-07:00"),))
    assert not nights.open_at(dt.datetime(2026, 12, 7, 12, 0))


def test_validate_warns_of_a_move_that_cannot_reach_fiona(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.config.validate import run_validate

    (tmp_path / "projects").mkdir()
    site_file = tmp_path / "site.yaml"
    site_file.write_text(
        "projects_dir: projects\npacs:\n"
        "  - {name: local, ae_title: PACS, host: 127.0.0.1, port: 104}\n"
        "  - {name: clinical, ae_title: PACS, host: 10.0.0.5, port: 104}\n"
        "  - {name: getter, ae_title: PACS, host: 10.0.0.6, port: 104, retrieve: get}\n"
        "  - {name: fallback, ae_title: PACS, host: 10.0.0.7, port: 104, retrieve: get,"
        " on_get_refused: move}\n"
    )
    assert run_validate([], site_path=site_file) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"{site_file}:2 pacs[1].retrieve: warning: PACS clinical is to send C-MOVE results to"
        " fiona's port, but fiona listens on 127.0.0.1 only: set bind_address (and"
        " allowed_calling_aes), or retrieve: get"
    )
    assert out.splitlines()[1] == (
        f"{site_file}:2 pacs[3].on_get_refused: warning: PACS fallback is to send C-MOVE"
        " results to fiona's port when it refuses C-GET, but fiona listens on 127.0.0.1 only:"
        " set bind_address (and allowed_calling_aes), or on_get_refused: fail"
    )
    assert "local" not in out and "getter" not in out


@pytest.mark.parametrize("word", ["status", "cancel", "retry"])
def test_a_pacs_may_not_be_named_as_a_retrieve_word(tmp_path: Path, word: str) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(f"pacs:\n  - {{name: {word}, ae_title: X, host: 127.0.0.1, port: 104}}\n")
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    (issue,) = caught.value.issues
    assert str(issue) == (
        f"{site}:2 pacs[0].name: '{word}' is a word of fiona retrieve (status, cancel, retry):"
        " choose another PACS name"
    )
