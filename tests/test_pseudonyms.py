"""The pseudonym table and the audited re-identification command."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.cli import main
from engine.store.audit import AuditLog
from engine.store.index import open_index
from engine.store.pseudonyms import PseudonymTable, reidentify


def test_pseudonyms_are_stable_per_project_and_survive_reopening(tmp_path: Path) -> None:
    index = open_index("", tmp_path / "index.sqlite")
    neuro = PseudonymTable(index, "neuro", prefix="NEU", digits=3)
    assert neuro.pseudonym_for("SYNPID1") == "NEU001"
    assert neuro.pseudonym_for("SYNPID2") == "NEU002"
    assert neuro.pseudonym_for("SYNPID1") == "NEU001"
    assert PseudonymTable(index, "other").pseudonym_for("SYNPID1") == "SUBJ0001"
    index.close()
    again = open_index("", tmp_path / "index.sqlite")
    assert (
        PseudonymTable(again, "neuro", prefix="NEU", digits=3).pseudonym_for("SYNPID1") == "NEU001"
    )
    assert reidentify(again, "neuro", "NEU002") == "SYNPID2"
    assert reidentify(again, "other", "NEU002") is None


def test_preferred_research_id_is_used_unless_taken(tmp_path: Path) -> None:
    table = PseudonymTable(open_index("", tmp_path / "index.sqlite"), "p")
    assert table.pseudonym_for("A", preferred="sub-01") == "sub-01"
    assert table.pseudonym_for("B", preferred="sub-01") == "SUBJ0002"  # taken by A
    assert table.pseudonym_for("A", preferred="sub-99") == "sub-01"  # A keeps its own


def test_concurrent_first_use_gives_one_pseudonym(tmp_path: Path) -> None:
    table = PseudonymTable(open_index("", tmp_path / "index.sqlite"), "p")
    with ThreadPoolExecutor(8) as pool:
        for round_ in range(10):  # the race is narrow: several rounds make it show
            got = set(pool.map(table.pseudonym_for, [f"SAME{round_}"] * 16))
            assert got == {f"SUBJ{round_ + 1:04d}"}


def test_concurrent_first_use_of_different_patients_gives_different_pseudonyms(
    tmp_path: Path,
) -> None:
    table = PseudonymTable(open_index("", tmp_path / "index.sqlite"), "p")
    originals = [f"PAT{n}" for n in range(48)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(table.pseudonym_for, originals))
    assert sorted(got) == [f"SUBJ{n:04d}" for n in range(1, 49)]
    assert [table.pseudonym_for(o) for o in originals] == got  # and each one stays


def test_reidentify_is_audited_without_the_original(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    index = open_index("", data / "index.sqlite")
    PseudonymTable(index, "neuro").pseudonym_for("SYNPID-SECRET")
    index.close()
    args = ["reidentify", "--data", str(data), "--project", "neuro"]
    assert main([*args, "--reason", "ticket 4711", "SUBJ0001"]) == 0
    assert capsys.readouterr().out.strip() == "SYNPID-SECRET"
    assert main([*args, "--reason", "ticket 4712", "SUBJ0404"]) == 1
    assert main([*args, "--reason", "", "SUBJ0001"]) == 2  # a reason is required
    entries = AuditLog(data).entries()
    assert [(e["event"], e["pseudonym"], e["found"]) for e in entries] == [
        ("reidentified", "SUBJ0001", True),
        ("reidentified", "SUBJ0404", False),
    ]
    raw = "".join(p.read_text() for p in (data / "audit").iterdir())
    assert "SYNPID-SECRET" not in raw
    assert all(json.loads(line)["operator"] for line in raw.splitlines())
