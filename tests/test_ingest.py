"""`fiona ingest`: a folder tree (a CD copy) through the same path as network receipt."""

from __future__ import annotations

import copy
import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests import synth
from tests.peers import REPO, archived_path


def run_ingest(
    data: Path, projects: Path, *paths: Path, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "ingest",
            "--no-progress",
            "--data",
            str(data),
            "--projects",
            str(projects),
            *extra,
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def raw_dataset_bytes(ds: pydicom.Dataset) -> bytes:
    """The dataset alone, implicit VR little endian, no preamble or meta (old CDs have these)."""
    bare = copy.deepcopy(ds)
    del bare.file_meta
    buf = io.BytesIO()
    bare.save_as(buf, enforce_file_format=False, implicit_vr=True, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM"
    return data


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ingest_a_cd_copy(tmp_path: Path, empty_projects: Path) -> None:
    spec = synth.make_study_spec(21)
    study = synth.make_study(spec, [synth.MR_SERIES["localizer"], synth.MR_SERIES["flair"]])
    cd = tmp_path / "cd" / "DICOM"
    files = synth.write_study(study, cd)
    raw_file = cd / "RAW0001"
    extra = synth.make_study(synth.make_study_spec(22), [synth.MR_SERIES["localizer"]])[0]
    raw_file.write_bytes(raw_dataset_bytes(extra))
    (cd.parent / "README.TXT").write_text("viewer instructions\n")
    garbage = synth.write_garbage(cd / "XYZ", 3000, seed=2)
    data = tmp_path / "data"

    first = run_ingest(data, empty_projects, cd.parent)
    assert first.returncode == 1, first.stdout + first.stderr  # something was quarantined
    n_total = len(files) + 3
    assert f"{n_total} files:" in first.stdout
    assert f"{len(files) + 1} stored" in first.stdout
    assert "2 quarantined" in first.stdout
    assert str(garbage) in first.stdout and "unparseable" in first.stdout

    with sqlite3.connect(data / "index.sqlite") as db:
        uids = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        vias = {r[0] for r in db.execute("SELECT DISTINCT via FROM instances")}
    assert uids == {str(ds.SOPInstanceUID) for ds in [*study, extra]}
    assert vias == {"ingest"}
    # Part 10 files are archived byte for byte.
    for path, ds in zip(files, study, strict=True):
        stored = archived_path(data, ds)
        assert stored.read_bytes() == path.read_bytes()
    # Series summaries are written at the end of an ingest.
    assert len(list((data / "archive" / study[0].StudyInstanceUID).glob("*.json"))) == 2

    again = run_ingest(data, empty_projects, cd.parent)
    assert f"{len(files) + 1} duplicate" in again.stdout


def test_ingest_missing_path_is_an_error(tmp_path: Path, empty_projects: Path) -> None:
    result = run_ingest(tmp_path / "data", empty_projects, tmp_path / "nope")
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr


def test_ingest_refuses_oversized_files_before_reading_them(
    tmp_path: Path, empty_projects: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("limits:\n  max_instance_mb: 1\n")
    big = synth.write_garbage(tmp_path / "in" / "BIG.BIN", 2 * 1024 * 1024, seed=1)
    result = run_ingest(tmp_path / "data", empty_projects, big, extra=("--config", str(site)))
    assert result.returncode == 1
    assert "1 rejected" in result.stdout and "too_large" in result.stdout
    assert not list((tmp_path / "data" / "quarantine").rglob("*.dcm"))
