"""The convert step: dcm2niix on de-identified series, NIfTI and BIDS through file destinations.

Real parts: synthetic MR studies (tests/synth.py) go through the archive, classify, anonymize,
convert (the real dcm2niix, Debian package) and send; the outbox worker delivers to a real
folder (or zip) destination; the BIDS dataset is checked by the real BIDS validator (npm
``bids-validator``, installed by ``scripts/setup.sh --test`` into ``.cache/bids-validator``). A
missing dcm2niix or validator fails under CI=true.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from engine.config.issues import ConfigError
from engine.pipeline import Done, Quarantined, RunContext
from engine.pipeline.bids import SUFFIXES, default_mapping_file, load_mapping
from engine.pipeline.nifti import ConversionFailed, convert_series, dcm2niix_path
from engine.pipeline.steps.convert import CONVERTED
from engine.pipeline.store import RunState
from engine.pipeline.validate import check_pipeline
from engine.transfer.base import Destination
from engine.transfer.folder import FolderDestination
from engine.transfer.outbox import Outbox, RetryPolicy, TransferState
from engine.transfer.worker import DestinationEntry, OutboxWorker
from engine.transfer.zip import ZipDestination
from tests import synth
from tests.test_pipeline import NOW, World

MR, BIDS = synth.MR_SERIES, synth.BIDS_SERIES
REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO / ".cache" / "bids-validator" / "node_modules" / ".bin" / "bids-validator"
#: Sidecar keys dcm2niix copies from the header that carry identity or dates.
IDENTIFYING_KEYS = ("InstitutionName", "InstitutionAddress", "DeviceSerialNumber", "StationName")


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} is not installed (scripts/setup.sh --test)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture(autouse=True)
def _dcm2niix() -> None:
    if dcm2niix_path() is None:
        _missing("dcm2niix")


@pytest.fixture
def world(tmp_path: Path) -> World:
    key = tmp_path / "projects" / "p.key"
    found = World(tmp_path)
    key.write_bytes(os.urandom(40))
    os.chmod(key, 0o600)
    return found


def _pipeline(convert: dict[str, Any], **anonymize: Any) -> list[dict[str, Any]]:
    return [
        {"step": "classify"},
        {"step": "anonymize", "secret_file": "p.key", "pseudonyms": {"prefix": "P"}, **anonymize},
        {"step": "convert", **convert},
        {"step": "send", "to": "share"},
    ]


def _receive(world: World, seed: int, series: list[synth.SeriesSpec], subject: str = "S01",
             event: str = "") -> tuple[list[pydicom.Dataset], int]:  # fmt: skip
    datasets = synth.make_study(synth.make_study_spec(seed), series, size=16)
    world.receive(datasets)
    study = str(datasets[0].StudyInstanceUID)
    uids = list(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in datasets))
    return datasets, world.store.create_run(study, "p", subject, event, 0, uids)


def _deliver(world: World, destination: Destination) -> None:
    outbox = Outbox(world.index, world.data)
    entry = DestinationEntry(destination, RetryPolicy(max_attempts=1))
    held: list[object] = []
    worker = OutboxWorker(outbox, {("p", "share"): entry}, lambda *a: held.append(a))
    try:
        while worker.run_due(timeout=60):
            pass
    finally:
        worker.close()
    assert held == []
    assert {t.state for t in outbox.find()} == {TransferState.DONE}


def _phi(datasets: list[pydicom.Dataset]) -> list[str]:
    ds = datasets[0]
    return [
        str(ds.PatientID), str(ds.PatientName).split("^")[0], str(ds.InstitutionName),
        str(ds.DeviceSerialNumber), str(ds.StudyInstanceUID), str(ds.StudyDate),
    ]  # fmt: skip


def _no_phi(root: Path, phi: list[str]) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            data = gzip.decompress(path.read_bytes())[:352] if path.name.endswith(".gz") else (
                path.read_bytes()
            )
            text = data.decode("latin-1").upper()
            assert not [v for v in phi if v.upper() in text], path.name
            assert not [v for v in phi if v.upper() in str(path).upper()], path.name


# --------------------------------------------------------------------------- nifti


def test_nifti_series_go_to_a_folder_destination_named_safely_without_dates(
    world: World,
) -> None:
    datasets, run_id = _receive(world, 41, [MR["t1_mprage"], BIDS["dwi_dirs"], MR["bold"]])
    steps = world.steps(_pipeline({"format": "nifti"}))
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE, world.held
    (world.tmp / "share").mkdir()
    share = FolderDestination("share", {"type": "folder", "path": str(world.tmp / "share")},
                              world.project)  # fmt: skip
    _deliver(world, share)
    [study] = list((world.tmp / "share" / "p" / "S01").iterdir())
    names = sorted(str(p.relative_to(study)) for p in study.rglob("*") if p.is_file())
    assert names == [
        "MD5SUMS",
        "manifest.json",
        "series-001_t1/series-001_t1.json",
        "series-001_t1/series-001_t1.nii.gz",
        "series-002_dwi/series-002_dwi.bval",
        "series-002_dwi/series-002_dwi.bvec",
        "series-002_dwi/series-002_dwi.json",
        "series-002_dwi/series-002_dwi.nii.gz",
        "series-003_bold/series-003_bold.json",
        "series-003_bold/series-003_bold.nii.gz",
    ]
    bold = json.loads((study / "series-003_bold" / "series-003_bold.json").read_text())
    assert bold["RepetitionTime"] == 2.0 and bold["EchoTime"] == 0.03
    assert not [k for k, v in bold.items() if isinstance(v, str) and re.search("Date|Time", k)]
    # The profile removed or replaced them in the DICOM; dcm2niix copies what is left.
    assert not [k for k in IDENTIFYING_KEYS if bold.get(k, "ANONYMIZED") != "ANONYMIZED"]
    bvals = (study / "series-002_dwi" / "series-002_dwi.bval").read_text().split()
    assert [float(b) for b in bvals] == [0.0, 1000.0, 1000.0, 1000.0]
    listed = (study / "MD5SUMS").read_text()
    assert "series-001_t1/series-001_t1.nii.gz" in listed
    _no_phi(world.tmp / "share", _phi(datasets))


def test_dates_stay_when_the_project_keeps_them(world: World) -> None:
    _, run_id = _receive(world, 42, [MR["bold"]])
    steps = world.steps(_pipeline({"format": "nifti"}, options=["retain_longitudinal_full_dates"]))
    world.runner(steps).run_pending(NOW)
    assert world.run(run_id).state == RunState.DONE, world.held
    [sidecar] = (world.data / "work" / "p").rglob("*.json")
    assert "AcquisitionTime" in json.loads(sidecar.read_text())


def _ctx(world: World, run_id: int, state: dict[str, Any]) -> RunContext:
    run = world.run(run_id)
    series = world.store.series_inputs(run, world.data)
    return RunContext(run.id, "p", run.study_uid, "S01", "", 0, series, world.data, state,
                      index=world.index)  # fmt: skip


def _fake_deidentified(world: World, run_id: int, **extra: Any) -> dict[str, Any]:
    """State as if anonymize had passed the archived originals through unchanged."""
    run = world.run(run_id)
    series = world.store.series_inputs(run, world.data)
    rel = world.data
    entries = {
        s.series_uid: {"uid": s.series_uid, "files": [str(f.relative_to(rel)) for f in s.files]}
        for s in series
    }  # fmt: skip
    return {"deidentified": {"study_uid": run.study_uid, "series": entries, **extra}}


def test_the_gate_holds_the_study_when_a_sidecar_carries_an_original_value(world: World) -> None:
    _, run_id = _receive(world, 43, [MR["t1_mprage"]])
    [convert] = world.steps([*_pipeline({"format": "nifti"})[1:3]])[1:]
    outcome = convert.run(_ctx(world, run_id, _fake_deidentified(world, run_id)))
    assert isinstance(outcome, Quarantined) and outcome.reason == "verification_failed"
    assert "series-001.json:InstitutionName (institution)" in outcome.detail
    assert "SYNTH" not in outcome.detail  # where and what kind, never the value


def test_a_series_dcm2niix_cannot_convert_is_held_and_the_others_go_on(world: World) -> None:
    datasets, run_id = _receive(world, 44, [MR["t1_mprage"], MR["t2_tse"]])
    [anonymize, convert] = world.steps([*_pipeline({"format": "nifti"})[1:3]])
    ctx = _ctx(world, run_id, {})
    assert isinstance(anonymize.run(ctx), Done)
    t2 = ctx.exported_series()[1][1]
    for path in t2.files:  # the de-identified copies of one series are damaged
        path.write_bytes(b"not DICOM at all")
    outcome = convert.run(ctx)
    held = "1 series held (conversion_failed)"
    assert outcome == Done(f"1 series converted to nifti (2 files); {held}")
    assert [e["name"] for e in ctx.state[CONVERTED]["files"]] == [
        "series-001/series-001.json", "series-001/series-001.nii.gz",
    ]  # fmt: skip
    rows = world.rows("SELECT reason, detail, path FROM quarantine")
    [(reason, detail, path)] = rows
    assert reason == "conversion_failed" and detail.startswith("series 2: dcm2niix exit status")
    assert path == f"archive/{ctx.study_uid}/{ctx.series[1].series_uid}"
    assert not [v for v in _phi(datasets) if v in detail]


def test_dcm2niix_is_stopped_after_its_timeout(tmp_path: Path) -> None:
    slow = tmp_path / "slow-dcm2niix"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionFailed, match=r"longer than 0\.5 s"):
        convert_series(
            tmp_path, tmp_path / "out", "series-001", timeout=0.5, executable=str(slow)
        )


# --------------------------------------------------------------------------- validation

P = Path("projects/p.yaml")


@pytest.mark.parametrize(
    ("pipeline", "messages"),
    [
        (
            [{"step": "convert", "format": "bids"}],
            [
                "projects/p.yaml pipeline[0].step: 'convert' runs only on de-identified series,"
                " so expected an anonymize step before it, found none",
                "projects/p.yaml pipeline[0].step: 'convert' names BIDS files from the series"
                " labels, so expected a classify step before it, found none",
            ],
        ),
        (
            [
                {"step": "classify", "rulesets": ["mr"]},
                {"step": "anonymize", "secret_file": "/dev/null"},
                {
                    "step": "convert",
                    "format": "bids",
                    "bids": {
                        "series": {
                            "t1": "anat/T1",
                            "flair": "nat/FLAIR",
                            "dwi": {"bids": "dwi/dwi", "task": "x"},
                        }
                    },
                },
            ],
            [
                "projects/p.yaml pipeline[1].secret_file: {secret}",
                "projects/p.yaml pipeline[2].bids.series.dwi.task: 'task' is for func series"
                " only, found it with dwi",
                "projects/p.yaml pipeline[2].bids.series.flair: unknown BIDS datatype 'nat';"
                " expected one of anat, dwi, fmap, func, perf",
                "projects/p.yaml pipeline[2].bids.series.t1: 'T1' is not a suffix of anat; expected"
                " one of " + ", ".join(sorted(SUFFIXES["anat"])),
            ],
        ),
        (
            [
                {"step": "classify", "rulesets": ["mr"]},
                {"step": "anonymize", "secret_file": "/dev/null"},
                {"step": "convert", "format": "bids", "bids": {"series": {"flare": "anat/FLAIR"}}},
            ],
            [
                "projects/p.yaml pipeline[1].secret_file: {secret}",
                "projects/p.yaml pipeline[2].bids.series.flare: expected a label given by the"
                 " classify step(s) before, found 'flare' (did you mean 'flair'?)",
            ],
        ),
    ],
)
def test_convert_messages(pipeline: list[Any], messages: list[str]) -> None:
    issues = check_pipeline(pipeline, P, ("pipeline",), None)
    found = [str(i) for i in issues]
    secret = [m for m in found if "secret_file" in m]
    expected = [m.replace("projects/p.yaml pipeline[1].secret_file: {secret}", secret[0])
                if "{secret}" in m else m for m in messages]  # fmt: skip
    assert sorted(found) == sorted(expected)


def test_a_send_after_convert_refuses_a_dicom_destination(tmp_path: Path) -> None:
    from engine.config.loader import check_project_files

    (tmp_path / "p.key").write_bytes(os.urandom(40))
    os.chmod(tmp_path / "p.key", 0o600)
    doc = {
        "name": "p",
        "destinations": {
            "pacs": {"type": "dicom", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"},
            "share": {"type": "folder", "path": str(tmp_path)},
        },
        "pipeline": [
            {"step": "anonymize", "secret_file": "p.key"},
            {"step": "send", "to": "pacs"},
            {"step": "convert", "format": "nifti"},
            {"step": "send", "to": ["share", "pacs"]},
        ],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    issues = [str(i) for i in check_project_files([tmp_path / "p.yaml"])[1]]
    assert issues == [
        f"{tmp_path / 'p.yaml'}:21 pipeline[3].to[1]: a send after a convert step delivers NIfTI"
        " files, so expected a folder, sftp or zip destination, found dicom destination 'pacs'"
        " (send DICOM before the convert step)"
    ]


def test_the_default_mapping_names_labels_the_classify_rule_sets_give(tmp_path: Path) -> None:
    from engine.pipeline.steps.classify import ClassifyStep

    given = ClassifyStep.produces_labels({"rulesets": ["ct", "derived", "mr", "objects", "pet"]},
                                        tmp_path / "p.yaml")  # fmt: skip
    targets = load_mapping(default_mapping_file())
    assert given is not None and {t.label for t in targets} <= given
    assert {(t.datatype, t.suffix) for t in targets} >= {("anat", "T1w"), ("dwi", "dwi"),
                                                         ("func", "bold"), ("fmap", "phasediff")}
    broken = tmp_path / "broken.yaml"
    broken.write_text("series:\n  t1: anat/T1w\n  bold: func/bolt\n")
    with pytest.raises(ConfigError) as caught:
        load_mapping(broken)
    assert [str(i) for i in caught.value.issues] == [
        f"{broken}:3 series.bold: 'bolt' is not a suffix of func; expected one of bold, cbv,"
        " phase, sbref"
    ]


# --------------------------------------------------------------------------- bids


def _validator() -> Path:
    if not VALIDATOR.exists() or shutil.which("node") is None:
        _missing("the BIDS validator (npm bids-validator in .cache/bids-validator)")
    return VALIDATOR


def _validate(dataset: Path) -> dict[str, Any]:
    """The BIDS validator's JSON report of ``dataset`` (no network needed)."""
    result = subprocess.run(
        [str(_validator()), "--json", str(dataset)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _late_series(world: World, seed: int, spec: synth.SeriesSpec, number: int) -> list[str]:
    """A series of study ``seed`` that arrives after it was complete (new series UIDs)."""
    from pydicom.uid import generate_uid

    datasets = synth.make_study(synth.make_study_spec(seed), [spec], size=16)
    uid = generate_uid(prefix=None)
    for ds in datasets:
        ds.SeriesNumber, ds.SeriesInstanceUID = number, uid
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    world.receive(datasets)
    return [uid]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_bids_dataset_passes_the_bids_validator_and_late_series_extend_it(
    world: World,
) -> None:
    _validator()
    series = [MR["t1_mprage"], MR["t2_tse"], MR["flair"], BIDS["dwi_dirs"], MR["bold"],
              BIDS["fieldmap"], MR["t1_mprage"], MR["localizer"]]  # fmt: skip
    first, run1 = _receive(world, 51, series)
    _, run2 = _receive(world, 52, [MR["t1_mprage"]], subject="S02", event="baseline")
    steps = world.steps(_pipeline({"format": "bids", "bids": {"name": "Neuro study"}}))
    world.runner(steps).run_pending(NOW)
    assert [world.run(r).state for r in (run1, run2)] == [RunState.DONE] * 2, world.held
    (world.tmp / "share").mkdir()
    share = FolderDestination("share", {"type": "folder", "path": str(world.tmp / "share")},
                              world.project)  # fmt: skip
    _deliver(world, share)
    dataset = world.tmp / "share" / "p-bids"
    subject = "sub-S01/ses-1"
    assert _files(dataset) == sorted([
        ".bidsignore", "MD5SUMS", "README", "dataset_description.json", "manifest.json",
        "participants.tsv",
        *(f"{subject}/anat/sub-S01_ses-1_{s}" for s in (
            "T1w.json", "T1w.nii.gz", "run-2_T1w.json", "run-2_T1w.nii.gz", "T2w.json",
            "T2w.nii.gz", "FLAIR.json", "FLAIR.nii.gz")),
        *(f"{subject}/dwi/sub-S01_ses-1_dwi{e}" for e in (".bval", ".bvec", ".json", ".nii.gz")),
        f"{subject}/func/sub-S01_ses-1_task-rest_bold.json",
        f"{subject}/func/sub-S01_ses-1_task-rest_bold.nii.gz",
        *(f"{subject}/fmap/sub-S01_ses-1_{s}{e}" for s in ("magnitude1", "magnitude2", "phasediff")
          for e in (".json", ".nii.gz")),
        "sub-S02/ses-baseline/anat/sub-S02_ses-baseline_T1w.json",
        "sub-S02/ses-baseline/anat/sub-S02_ses-baseline_T1w.nii.gz",
    ])  # fmt: skip
    assert (dataset / "participants.tsv").read_text() == "participant_id\nsub-S01\nsub-S02\n"
    fmap = dataset / subject / "fmap"
    phasediff = json.loads((fmap / "sub-S01_ses-1_phasediff.json").read_text())
    assert (phasediff["EchoTime1"], phasediff["EchoTime2"]) == (0.00492, 0.00738)
    report = _validate(dataset)
    assert report["issues"]["errors"] == [], json.dumps(report["issues"]["errors"], indent=1)
    assert report["summary"]["subjects"] == ["S01", "S02"]
    _no_phi(dataset, _phi(first))

    # A series arriving after the study was sent joins its session as the next run.
    run = world.run(run1)
    late = _late_series(world, 51, MR["t1_mprage"], 9)
    run3 = world.store.create_run(run.study_uid, "p", "S01", "", 1, late)
    world.runner(steps).run_pending(NOW)
    assert world.run(run3).state == RunState.DONE, world.held
    _deliver(world, share)
    assert (dataset / subject / "anat" / "sub-S01_ses-1_run-3_T1w.nii.gz").is_file()
    assert _validate(dataset)["issues"]["errors"] == []
    listed = (dataset / "MD5SUMS").read_text()
    assert "sub-S01/ses-1/anat/sub-S01_ses-1_run-3_T1w.nii.gz" in listed
    assert "sub-S02/ses-baseline/anat/sub-S02_ses-baseline_T1w.nii.gz" in listed


def test_a_bids_transfer_to_a_zip_destination_unzips_into_the_dataset(world: World) -> None:
    _receive(world, 53, [MR["t1_mprage"], MR["bold"]])
    world.runner(world.steps(_pipeline({"format": "bids"}))).run_pending(NOW)
    (world.tmp / "zips").mkdir()
    zips = ZipDestination("share", {"type": "zip", "path": str(world.tmp / "zips")},
                          world.project)  # fmt: skip
    _deliver(world, zips)
    [archive] = list((world.tmp / "zips").glob("*.zip"))
    assert archive.name.startswith("p-bids_") and archive.name.endswith(".zip")
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(world.tmp / "unzipped")
    dataset = world.tmp / "unzipped" / "p-bids"
    func = dataset / "sub-S01" / "ses-1" / "func"
    assert (func / "sub-S01_ses-1_task-rest_bold.nii.gz").is_file()
    assert _validate(dataset)["issues"]["errors"] == []


def test_converting_again_after_a_crash_gives_the_same_bids_names(world: World) -> None:
    _, run_id = _receive(world, 54, [MR["t1_mprage"], MR["t1_mprage"]])
    classify, anonymize, convert = world.steps(_pipeline({"format": "bids"})[:3])
    ctx = _ctx(world, run_id, {})
    for step in (classify, anonymize, convert):
        assert isinstance(step.run(ctx), Done)
    first = [e["name"] for e in ctx.state[CONVERTED]["files"]]
    assert convert.run(ctx) == Done("2 series converted to bids (8 files)")
    assert [e["name"] for e in ctx.state[CONVERTED]["files"]] == first
    assert [n for n in first if n.endswith(".nii.gz")] == [
        "sub-S01/ses-1/anat/sub-S01_ses-1_T1w.nii.gz",
        "sub-S01/ses-1/anat/sub-S01_ses-1_run-2_T1w.nii.gz",
    ]


@pytest.mark.parametrize(("keeps_dates", "kept"), [(False, False), (True, True)])
def test_sidecar_times_of_day_are_removed_unless_the_project_keeps_dates(
    world: World, keeps_dates: bool, kept: bool
) -> None:
    _, run_id = _receive(world, 55, [MR["bold"]])
    [convert] = world.steps([*_pipeline({"format": "nifti"})[1:3]])[1:]
    # Input that still has its times (as a profile keeping them would leave them); the gate
    # is told the institution and device serial are kept on purpose.
    state = _fake_deidentified(
        world, run_id, keeps_dates=keeps_dates, allow_kinds=["institution", "device_serial"]
    )
    ctx = _ctx(world, run_id, state)
    assert isinstance(convert.run(ctx), Done)
    sidecar = next(e["path"] for e in ctx.state[CONVERTED]["files"] if e["path"].endswith("json"))
    doc = json.loads((world.data / sidecar).read_text())
    assert ("AcquisitionTime" in doc) is kept
    assert doc["RepetitionTime"] == 2.0  # a duration, never removed


def test_a_bids_dataset_over_sftp_lands_where_a_folder_destination_puts_it(
    world: World,
) -> None:
    from tests.peers import PeerMissing
    from tests.sshd import SshServer
    from tests.test_transfer_files import make

    server = SshServer(world.tmp / "sshd")
    try:
        server.start()
    except PeerMissing as exc:
        _missing(str(exc))
    try:
        _receive(world, 56, [MR["t1_mprage"], BIDS["dwi_dirs"]])
        world.runner(world.steps(_pipeline({"format": "bids"}))).run_pending(NOW)
        sftp = make("sftp", world.tmp, server, dataset_layout="{project}-dataset")
        _deliver(world, sftp)
    finally:
        server.stop()
    dataset = world.tmp / "out" / "p-dataset"
    assert "sub-S01/ses-1/dwi/sub-S01_ses-1_dwi.bvec" in _files(dataset)
    assert "sub-S01/ses-1/dwi/sub-S01_ses-1_dwi.bvec" in (dataset / "MD5SUMS").read_text()
    assert _validate(dataset)["issues"]["errors"] == []
