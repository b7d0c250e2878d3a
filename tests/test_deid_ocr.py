"""OCR of burned-in text (engine.deid.ocr): golden cases on synthetic screenshots, ultrasound
frames and dose screens (tests/ocr_images.py), through the real export path and the CLI.

Needs Debian's tesseract-ocr and tesseract-ocr-eng and the fonts-dejavu-core and
fonts-liberation fonts (scripts/setup.sh); under CI=true a missing one fails.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from engine.deid import Deidentifier, load_profile
from engine.deid.burned_in import BurnedInPolicy
from engine.deid.export import Exported, Exporter, Held
from engine.deid.ocr import OcrPolicy, find_text, tesseract_problem
from tests.compressed import CODECS, compress
from tests.dbutil import connect_index
from tests.ocr_images import Case, clean, dose, hard, line_found, screenshot, ultrasound
from tests.peers import FionaServer
from tests.test_receive import store
from tests.test_workflow import wait_for

REPO = Path(__file__).resolve().parents[1]
SECRET = b"s" * 48
#: A hold reason: positions only, never a word of the text.
BOXES = re.compile(
    r"OCR found \d+ text box(es)?: frame \d+ \(x \d+, y \d+, w \d+, h \d+\)"
    r"(, frame \d+ \(x \d+, y \d+, w \d+, h \d+\))*( and \d+ more)?"
)


@pytest.fixture(autouse=True, scope="module")
def _tesseract() -> None:
    problem = tesseract_problem(("eng",))
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(problem)
        pytest.skip(problem)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _exporter(**ocr: object) -> Exporter:
    policy = BurnedInPolicy.from_mapping({"ocr": ocr})
    return Exporter(Deidentifier(load_profile("basic"), SECRET, project="p"), policy)


def _frames(ds: Dataset) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns), -1)


GOLDEN = [
    screenshot(0),
    screenshot(1),
    ultrasound(0),
    ultrasound(2),
    ultrasound(3, rgb=True),
    dose(0),
    dose(1),
    dose(2),
]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c.name)
def test_every_planted_line_is_found_in_every_frame(case: Case) -> None:
    """Text in several fonts and sizes (11 px high and up), light on dark and dark on light,
    on speckle, in mono, RGB and 12-bit images: every line is covered by the boxes found,
    in every frame."""
    boxes = find_text(copy.deepcopy(case.dataset), OcrPolicy())
    frames = int(case.dataset.get("NumberOfFrames", 1) or 1)
    for frame in range(frames):
        found = [(b.x, b.y, b.width, b.height) for b in boxes if b.frame == frame]
        missed = [line for line in case.lines if line.height >= 11 and not line_found(line, found)]
        assert not missed, (frame, missed)


@pytest.mark.parametrize("seed", range(6))
def test_images_without_text_pass_untouched(seed: int) -> None:
    """No false alarms on backgrounds without text (viewer gradient, speckle, CT slice): the
    file is exported as usual, its pixel data byte for byte."""
    case = clean(seed)
    data = _bytes(case.dataset)
    result = _exporter(action="hold", apply_to="all").export(data)
    assert isinstance(result, Exported), result
    assert bytes(result.pixels) in data


@pytest.mark.parametrize(
    "case", [screenshot(0), ultrasound(3, rgb=True), dose(0)], ids=lambda c: c.name
)
def test_hold_names_box_positions_never_the_text(case: Case) -> None:
    result = _exporter(action="hold").export(_bytes(case.dataset))
    assert isinstance(result, Held) and result.reason == "burned_in"
    assert BOXES.fullmatch(result.detail), result.detail


@pytest.mark.parametrize(
    "case",
    [screenshot(0), screenshot(1), ultrasound(0), ultrasound(3, rgb=True), dose(0), dose(2)],
    ids=lambda c: c.name,
)
def test_redact_blacks_out_the_text_in_every_frame(case: Case) -> None:
    """Redacted output: de-identified, every planted line blacked out in every frame
    (the rest of the image kept), and nothing OCR can read left."""
    result = _exporter(action="redact", margin_px=3).export(_bytes(case.dataset))
    assert isinstance(result, Exported), result
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.PatientName != case.dataset.PatientName
    after, before = _frames(out), _frames(case.dataset)
    black = (after == 0).all(axis=-1)
    for frame in range(after.shape[0]):
        for line in case.lines:
            if line.height >= 11:  # most of each line (single characters are not counted)
                area = black[frame, line.y : line.y + line.height, line.x : line.x + line.width]
                assert area.mean() > 0.5, (frame, line)
    assert (after != before).any(axis=-1).mean() < 0.2, "more than the text was blacked out"
    assert find_text(out, OcrPolicy()) == []


def test_redact_of_a_jpeg_baseline_ultrasound_writes_uncompressed_and_lossy(
    tmp_path: Path,
) -> None:
    """Compressed input (dcmcjpeg, YBR_FULL_422): decoded, redacted, written as Explicit VR
    Little Endian RGB with Lossy Image Compression 01 kept, no legible text left."""
    case = ultrasound(3, rgb=True)
    case.dataset.save_as(tmp_path / "us.dcm", enforce_file_format=True)
    codec = next(c for c in CODECS if c.syntax == JPEGBaseline8Bit)
    path = compress(tmp_path / "us.dcm", tmp_path / "us-jpeg.dcm", codec)
    result = _exporter(action="redact").export(path.read_bytes())
    assert isinstance(result, Exported), result
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PhotometricInterpretation == "RGB" and out.LossyImageCompression == "01"
    assert find_text(out, OcrPolicy()) == []
    held = _exporter(action="hold").export(path.read_bytes())
    assert isinstance(held, Held) and BOXES.fullmatch(held.detail)


def test_monochrome1_is_blacked_out_with_its_maximum() -> None:
    case = dose(0)
    ds = case.dataset
    arr = _frames(ds)[..., 0]
    ds.PixelData = (4080 - arr).astype(np.uint16).tobytes()  # the same screen, inverted
    ds.PhotometricInterpretation = "MONOCHROME1"
    result = _exporter(action="redact").export(_bytes(ds))
    assert isinstance(result, Exported), result
    out = _frames(pydicom.dcmread(io.BytesIO(result.data)))[0, ..., 0]
    line = case.lines[0]
    assert (out[line.y : line.y + line.height, line.x : line.x + line.width] == 4095).all()


def test_signed_monochrome2_is_blacked_out_with_its_minimum() -> None:
    """A signed 12-bit screen (Pixel Representation 1, values -2048..2032): black is -2048."""
    case = dose(0)
    ds = case.dataset
    arr = _frames(ds)[..., 0].astype(np.int16) - 2048
    ds.PixelData, ds.PixelRepresentation = arr.tobytes(), 1
    result = _exporter(action="redact").export(_bytes(ds))
    assert isinstance(result, Exported), result
    out = _frames(pydicom.dcmread(io.BytesIO(result.data)))[0, ..., 0]
    line = case.lines[0]
    assert (out[line.y : line.y + line.height, line.x : line.x + line.width] == -2048).all()


def test_burned_in_yes_without_text_found_is_held() -> None:
    ds = clean(0).dataset
    ds.BurnedInAnnotation = "YES"
    result = _exporter(action="redact").export(_bytes(ds))
    assert isinstance(result, Held) and "OCR found no text" in result.detail


def test_apply_to_chosen_modalities_and_sop_classes() -> None:
    """A CT dose screen (not held by the lists: no SOP class or modality of theirs, its
    description cleared) is read when CT is chosen, case-insensitively; others pass."""
    ds = dose(0).dataset
    del ds.SeriesDescription, ds.ImageType
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    data = _bytes(ds)
    chosen = _exporter(action="hold", apply_to={"modalities": ["ct"]}).export(data)
    assert isinstance(chosen, Held) and BOXES.fullmatch(chosen.detail)
    assert isinstance(_exporter(action="hold", apply_to="held").export(data), Exported)
    other = _exporter(action="hold", apply_to={"sop_classes": ["1.2.840.10008.5.1.4.1.1.4"]})
    assert isinstance(other.export(data), Exported)
    # Without OCR the lists still hold what they hold: an ultrasound waits for a person.
    plain = Exporter(Deidentifier(load_profile("basic"), SECRET, project="p"))
    held = plain.export(_bytes(ultrasound(0).dataset))
    assert isinstance(held, Held) and "no pixel cleaning rule matches" in held.detail


def test_sauvola_binarization_finds_dim_text_that_otsu_misses() -> None:
    """Dim red text (a third of full luminance) beside white text on ultrasound speckle:
    Otsu's one threshold drops it; ``binarization: sauvola`` finds it."""
    case = hard(0)
    dim = case.lines[1]
    for binarization, found in (("otsu", False), ("sauvola", True)):
        boxes = find_text(copy.deepcopy(case.dataset), OcrPolicy(binarization=binarization))
        assert line_found(dim, [(b.x, b.y, b.width, b.height) for b in boxes]) is found


def test_rotated_reads_a_vertical_label_and_redact_blacks_it_out() -> None:
    """A label running up the side of an ultrasound image: missed unless ``rotated``; with
    it, found and blacked out."""
    case = hard(0)
    label = case.lines[3]
    assert label.height > 5 * label.width  # vertical
    for rotated in (False, True):
        boxes = find_text(copy.deepcopy(case.dataset), OcrPolicy(rotated=rotated))
        assert line_found(label, [(b.x, b.y, b.width, b.height) for b in boxes]) is rotated
    result = _exporter(action="redact", rotated=True).export(_bytes(case.dataset))
    assert isinstance(result, Exported), result
    out = _frames(pydicom.dcmread(io.BytesIO(result.data)))
    area = (out[0, label.y : label.y + label.height, label.x : label.x + label.width] == 0)
    assert area.all(axis=-1).mean() > 0.5


def test_no_image_of_the_text_is_written_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is read, redacted and read again with a temp folder (Python's and the tesseract
    program's) that does not exist: nothing needed one (pytesseract would fail here)."""
    import tempfile

    missing = tmp_path / "no-such-folder"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    result = _exporter(action="redact").export(_bytes(screenshot(0).dataset))
    assert isinstance(result, Exported), result
    assert not missing.exists()


def test_an_image_ocr_cannot_finish_in_time_is_held() -> None:
    exporter = _exporter(action="redact", timeout_s=0.001)
    result = exporter.export(_bytes(ultrasound(0).dataset))
    assert isinstance(result, Held) and result.reason == "burned_in"
    assert result.detail == "OCR took longer than 0.001 s"


def test_undecodable_pixels_are_held_not_read() -> None:
    ds = screenshot(0).dataset
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    result = _exporter(action="redact").export(_bytes(ds))
    assert isinstance(result, Held) and result.reason == "burned_in"
    assert "cannot be decoded" in result.detail


def test_policy_values_are_checked() -> None:
    policy = BurnedInPolicy.from_mapping({"ocr": {}}).ocr
    assert policy == OcrPolicy()
    for bad in (
        {"action": "blur"},
        {"apply_to": "some"},
        {"margin_px": -1},
        {"languages": []},
        {"min_confidence": 101},
        {"binarization": "niblack"},
        {"rotated": "yes"},
        {"colour": 1},
    ):
        with pytest.raises(ValueError):
            BurnedInPolicy.from_mapping({"ocr": bad})


def _project(folder: Path) -> Path:
    (folder / "p.key").write_bytes(SECRET)
    os.chmod(folder / "p.key", 0o600)
    (folder / "ocr.yaml").write_text(
        "name: ocr\n"
        "pipeline:\n"
        "  - step: anonymize\n"
        "    secret_file: p.key\n"
        "    burned_in:\n"
        "      ocr: {action: redact, languages: [eng]}\n"
    )
    return folder


def test_validate_names_a_missing_tesseract(tmp_path: Path) -> None:
    """A project asking for OCR on a host without the tesseract program: fiona validate says
    what to install; with it on the PATH the same project is valid."""
    folder = _project(tmp_path)
    args = [sys.executable, "-m", "engine.cli", "validate", str(folder)]
    without = {**os.environ, "PATH": str(tmp_path / "nothing-here")}
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=without, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "install the Debian packages tesseract-ocr and tesseract-ocr-eng" in done.stdout
    assert "Traceback" not in done.stderr
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder / "ocr.yaml").write_text(
        (folder / "ocr.yaml").read_text().replace("[eng]", "[eng, xyz]")
    )
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1 and "no language data for xyz" in done.stdout


def test_fiona_anonymize_ocr_redacts_and_holds(tmp_path: Path) -> None:
    """``fiona anonymize --ocr redact``: the screenshot and the ultrasound come out redacted,
    the CT slice untouched; ``--ocr hold``: both held with box positions only."""
    (tmp_path / "in").mkdir()
    key = tmp_path / "key"
    key.write_bytes(SECRET)
    os.chmod(key, 0o600)
    for case in (screenshot(1), ultrasound(2), clean(2)):
        case.dataset.save_as(tmp_path / "in" / f"{case.name}.dcm", enforce_file_format=True)
    fiona = [sys.executable, "-m", "engine.cli", "anonymize", str(tmp_path / "in")]
    for action, exported, held in (("redact", 3, 0), ("hold", 1, 2)):
        out = tmp_path / action
        args = [*fiona, str(out), "--secret-file", str(key), "--ocr", action, "--no-progress"]
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads((out / "deid-report.json").read_text())
        assert (report["exported"], report["held"]) == (exported, held), report
        for item in report["held_files"]:
            assert item["reason"] == "burned_in" and BOXES.fullmatch(item["detail"])
        for path in out.rglob("*.dcm"):
            assert find_text(pydicom.dcmread(path), OcrPolicy()) == []
    assert shutil.which("tesseract")


def _runs(data: Path) -> list[str]:
    try:
        with connect_index(data / "index.sqlite") as db:
            return [row[0] for row in db.execute("SELECT state FROM pipeline_runs")]
    except sqlite3.Error:  # not created yet
        return []


def test_fiona_serve_redacts_a_received_ultrasound_and_screenshot(
    tmp_path: Path, storescu: str
) -> None:
    """The whole way: storescu sends an ultrasound cine and a screen capture of one study to
    ``fiona serve``; the project's anonymize step (``burned_in.ocr: {action: redact}``)
    blacks out their text and the copy step writes them with nothing legible left."""
    projects = tmp_path / "projects"
    projects.mkdir()
    (projects / "us.key").write_bytes(SECRET)
    os.chmod(projects / "us.key", 0o600)
    out = tmp_path / "out"
    doc = {
        "name": "us",
        "routing": {"calling_ae": ["SCANNER_A"]},
        "completeness": {"study_quiet_seconds": 2},
        "pipeline": [
            {
                "step": "anonymize",
                "secret_file": "us.key",
                "burned_in": {"ocr": {"action": "redact"}},
            },
            {"step": "copy", "to": str(out)},
        ],
    }
    (projects / "us.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    config = tmp_path / "site.yaml"
    config.write_text(yaml.safe_dump({"scan_interval_seconds": 0.5}))
    study = generate_uid()
    files = []
    for case in (ultrasound(2), screenshot(1)):
        case.dataset.StudyInstanceUID = study
        files.append(tmp_path / f"{case.name}.dcm")
        case.dataset.save_as(files[-1], enforce_file_format=True)
    server = FionaServer(data_dir=tmp_path / "data", projects_dir=projects, config=config).start()
    try:
        sent = store(storescu, server, files, aet="SCANNER_A")
        assert sent.returncode == 0, sent.stderr
        wait_for("the run done", lambda: _runs(tmp_path / "data") == ["done"], 180, server)
        copies = list(out.rglob("*.dcm"))
        assert len(copies) == 2
        for path in copies:
            ds = pydicom.dcmread(path)
            assert ds.PatientName != "SYNTH^OCR" and ds.StudyInstanceUID != study
            assert find_text(ds, OcrPolicy()) == []
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()
