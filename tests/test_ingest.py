"""`fiona ingest`: a folder tree (a CD copy) through the same path as network receipt."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml

from tests import synth
from tests.dbutil import connect_index
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

    with connect_index(data / "index.sqlite") as db:
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


# --------------------------------------------------------------------------- routing (issue 13.10)


def _routing_world(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A site file, its projects folder and data folder: project ``cd`` claims what is sent to
    the called AE CDIMPORT; project ``main`` what is sent to FIONA (our AE title)."""
    projects = tmp_path / "projects"
    projects.mkdir()
    for name, aet in (("cd", "CDIMPORT"), ("main", "FIONA")):
        (projects / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "routing": {"called_ae": [aet]},
                    "completeness": {"study_quiet_seconds": 100},
                    "pipeline": [],
                }
            )
        )
    (projects / "off.yaml").write_text(
        yaml.safe_dump({"name": "off", "enabled": False, "routing": {"called_ae": ["X"]}})
    )
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"data_dir": "data", "projects_dir": "projects"}))
    return site, projects, tmp_path / "data"


def _scan(site_file: Path, later: float) -> list[tuple[object, ...]]:
    """Scans of the service's workflow (routing, completeness, runs) at ``now + later``; the
    routes and runs the index then holds."""
    from engine.config.loader import load_site
    from engine.service import load_enabled_projects
    from engine.store.index import open_index
    from engine.workflow import Workflow

    site = load_site(site_file)
    index = open_index("", site.data_dir / "index.sqlite")
    try:
        workflow = Workflow(index, site, load_enabled_projects(site))
        for extra in (later, later + 1):
            workflow.scan(time.time() + extra)
        with index.reading() as db:
            return db.execute(
                "SELECT r.project, r.subject, r.event, r.assigned, p.subject, p.event, p.state"
                " FROM study_routes r LEFT JOIN pipeline_runs p ON p.study_uid = r.study_uid"
                " AND p.project = r.project ORDER BY r.study_uid, r.project"
            ).fetchall()
    finally:
        index.close()


def _cd(tmp_path: Path, seed: int, name: str) -> tuple[str, Path]:
    study = synth.make_study(synth.make_study_spec(seed), [synth.MR_SERIES["localizer"]], size=8)
    folder = tmp_path / name
    synth.write_study(study, folder)
    return str(study[0].StudyInstanceUID), folder


def test_ingest_called_ae_routes_like_network_receipt(tmp_path: Path) -> None:
    site, projects, data = _routing_world(tmp_path)
    uid, cd = _cd(tmp_path, 31, "cd")
    extra = ("--config", str(site), "--called-ae", "CDIMPORT")
    result = run_ingest(data, projects, cd, extra=extra)
    assert result.returncode == 0, result.stdout + result.stderr
    with connect_index(data / "index.sqlite") as db:
        origins = set(db.execute("SELECT via, calling_ae, called_ae, peer_ip FROM instances"))
    assert origins == {("ingest", "", "CDIMPORT", "")}
    assert _scan(site, 200) == [("cd", "", "", 0, "", "", "done")]
    # Without --called-ae an ingest is sent to our own AE title, as a sender would do.
    _, usb = _cd(tmp_path, 32, "usb")
    result = run_ingest(data, projects, usb, extra=("--config", str(site), "--calling-ae", "USB1"))
    assert result.returncode == 0, result.stdout + result.stderr
    routes = _scan(site, 400)
    assert sorted(r[0] for r in routes) == ["cd", "main"]
    with connect_index(data / "index.sqlite") as db:
        assert ("ingest", "USB1", "FIONA", "") in set(
            db.execute("SELECT via, calling_ae, called_ae, peer_ip FROM instances")
        )
    explain = subprocess.run(
        [sys.executable, "-m", "engine.cli", "explain", uid, "--config", str(site)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert "called AE title: yes" in explain.stdout and "CDIMPORT" in explain.stdout
    assert "routed to cd (called AE title), route complete" in explain.stdout


def test_ingest_project_assigns_studies_its_rules_would_not_claim(tmp_path: Path) -> None:
    site, projects, data = _routing_world(tmp_path)
    uid, cd = _cd(tmp_path, 33, "cd")
    extra = ("--config", str(site), "--project", "cd", "--subject", "S01", "--event", "baseline")
    result = run_ingest(data, projects, cd, extra=extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 study assigned to project cd" in result.stdout
    # 'main' would claim it by its called AE (FIONA, the default); 'cd' would not. Assigned:
    # only 'cd' gets it, with the subject and event, and nothing is held as ambiguous.
    assert _scan(site, 200) == [("cd", "S01", "baseline", 1, "S01", "baseline", "done")]
    with connect_index(data / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
    explain = subprocess.run(
        [sys.executable, "-m", "engine.cli", "explain", uid, "--config", str(site)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert explain.returncode == 0, explain.stderr
    text = explain.stdout
    assert "routed to cd (assigned by fiona ingest --project): subject S01, event baseline" in text
    assert "claimed by cd (assigned by fiona ingest --project)" in text
    assert "claimed by main" not in text and "unrouted" not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--subject", "S01"), "--subject and --event need --project"),
        (("--event", "baseline"), "--subject and --event need --project"),
        (("--project", "nope"), "--project nope: no valid project of that name in"),
        (("--project", "off"), "--project off: the project is disabled (enabled: false in"),
        (("--called-ae", "A\\B"), "--called-ae: expected an AE title"),
        (("--calling-ae", "X" * 17), "--calling-ae: expected an AE title"),
    ],
)
def test_ingest_routing_options_are_checked_first(
    tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    site, projects, data = _routing_world(tmp_path)
    _, cd = _cd(tmp_path, 34, "cd")
    result = run_ingest(data, projects, cd, extra=("--config", str(site), *extra))
    assert result.returncode == 2
    assert result.stderr.startswith("fiona: " + message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (data / "index.sqlite").exists()  # nothing was ingested
