"""The burned-in PHI gate (engine.deid.burned_in) and pixel cleaning (engine.deid.pixels).

Images are synthetic, drawn here with numpy: a background gradient (16-127, never black or
white) and bright "text" blocks (255) where a device would write the patient's name.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from engine.deid import Deidentifier, load_profile
from engine.deid.burned_in import BurnedInPolicy, Clean, Pass, Quarantine, check_burned_in
from engine.deid.export import Exporter, Held
from engine.deid.pixels import (
    CleanFailed,
    PixelRuleSet,
    Region,
    check_pixel_rules,
    clean_pixels,
    load_pixel_rules,
    pixel_rule_files,
    pixels_dir,
)
from tests.compressed import CODECS, Codec, compress
from tests.synth import MR_SERIES, make_series, make_study_spec

SPEC = make_study_spec(0)
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


# --------------------------------------------------------------------------- images


def _image(
    rows: int = 48,
    columns: int = 64,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    bits: int = 8,
    *,
    manufacturer: str = "ACME",
    model: str = "SONO 1",
    modality: str = "US",
    text: list[Region] | None = None,
    planar: int = 0,
) -> tuple[Dataset, np.ndarray]:
    """(dataset, pixel array shaped frames x rows x cols x samples): the recipe of the golden
    cases. Background ``16 + (x + y + 7 * frame) % 112``; ``text`` blocks 255 (4095 at 16 bit)."""
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    y, x = np.mgrid[0:rows, 0:columns]
    arr = np.stack([16 + (x + y + 7 * f) % 112 for f in range(frames)])[..., None]
    arr = np.repeat(arr, samples, axis=3).astype(np.uint8 if bits == 8 else np.uint16)
    for r in text or []:
        arr[:, r.y : r.y + r.height, r.x : r.x + r.width, :] = 255 if bits == 8 else 4095
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    if modality != "US":
        sop_class = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
        bits,
        bits if bits == 8 else 12,
        (bits - 1 if bits == 8 else 11),
    )
    ds.PixelRepresentation = 0
    if samples > 1:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    data = arr.transpose(0, 3, 1, 2) if planar else arr
    ds.PixelData = data.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds, arr


def _pixels(ds: Dataset) -> np.ndarray:
    """The stored pixels as frames x rows x cols x samples."""
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.SamplesPerPixel)
    return arr.reshape(frames, int(ds.Rows), int(ds.Columns), samples)


def _mask(rows: int, columns: int, regions: list[Region]) -> np.ndarray:
    mask = np.zeros((rows, columns), bool)
    for r in regions:
        mask[r.y : r.y + r.height, r.x : r.x + r.width] = True
    return mask


def _assert_cleaned(
    after: np.ndarray, before: np.ndarray, regions: list[Region], black: int | list[int] = 0
) -> None:
    mask = _mask(after.shape[1], after.shape[2], regions)
    assert (after[:, mask] == np.asarray(black)).all(), "a region is not blanked"
    assert (after[:, ~mask] == before[:, ~mask]).all(), "a pixel outside the regions changed"


# --------------------------------------------------------------------------- the gate

RULES = PixelRuleSet(
    load_pixel_rules(pixel_rule_files(pixels_dir())).rules
)  # the shipped starter set


def _mr() -> Dataset:
    return make_series(SPEC, MR_SERIES["localizer"], 1)[0]


def _set(**values: Any):
    def edit(ds: Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


def _sr(ds: Dataset) -> None:
    ds.SOPClassUID = XRAY_DOSE_SR
    ds.Modality = "SR"
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)


def _logiq(ds: Dataset) -> None:
    _set(Modality="US", Manufacturer="GE Healthcare", ManufacturerModelName="LOGIQ E10")(ds)
    ds.Rows, ds.Columns = 768, 1024


GATE = [
    ("mr", _set(), {}, Pass, None),
    ("burned_in_yes", _set(BurnedInAnnotation="YES"), {}, Quarantine, "BurnedInAnnotation YES"),
    ("ultrasound", _set(Modality="US"), {}, Quarantine, "modality US"),
    (
        "secondary_capture",
        _set(SOPClassUID=SecondaryCaptureImageStorage),
        {},
        Quarantine,
        "SOP class Secondary Capture Image Storage",
    ),
    (
        "screen",
        _set(ImageType=["DERIVED", "SECONDARY", "SCREEN"]),
        {},
        Quarantine,
        "ImageType SCREEN",
    ),
    ("workstation", _set(ConversionType="WSD"), {}, Quarantine, "ConversionType WSD"),
    (
        "dose_screen",
        _set(SeriesDescription="Dose Info"),
        {},
        Quarantine,
        "SeriesDescription matches",
    ),
    ("dose_sr_no_pixels", _sr, {}, Pass, None),
    ("header_only_image", _set(PixelData=None, Modality="US"), {}, Quarantine, "modality US"),
    ("us_not_in_policy", _set(Modality="US"), {"modalities": []}, Pass, None),
    ("us_lower_case", _set(Modality="us"), {}, Quarantine, "modality US"),
    ("us_padded_lower_case", _set(Modality=" Us "), {}, Quarantine, "modality US"),
    (
        "retired_us_image_no_modality",
        _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.6", Modality=None),
        {},
        Quarantine,
        "SOP class Ultrasound Image Storage;",
    ),
    (
        "retired_us_multi_frame",
        _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.3", Modality="us"),
        {},
        Quarantine,
        "SOP class Ultrasound Multi-frame Image Storage;",
    ),
    (
        "retired_us_judged_by_sop_class",
        _set(SOPClassUID="1.2.840.10008.5.1.4.1.1.3", Modality=None),
        {"sop_classes": []},
        Quarantine,
        "modality US (SOP class)",
    ),
    (
        "mr_without_modality",
        _set(Modality=None),
        {},
        Pass,
        None,
    ),
    ("us_says_no", _set(Modality="US", BurnedInAnnotation="NO"), {}, Quarantine, "modality US"),
    (
        "us_says_no_trusted",
        _set(Modality="US", BurnedInAnnotation="NO"),
        {"trust_burned_in_no": True},
        Pass,
        None,
    ),
    (
        "yes_beats_trust",
        _set(BurnedInAnnotation="YES"),
        {"trust_burned_in_no": True},
        Quarantine,
        "YES",
    ),
    ("rule_matches", _logiq, {}, Clean, "ge_logiq_1024x768"),
    (
        "rule_wrong_size",
        _set(Modality="US", Manufacturer="GE Healthcare", ManufacturerModelName="LOGIQ E10"),
        {},
        Quarantine,
        "modality US",
    ),
]


@pytest.mark.parametrize(
    ("edit", "policy", "verdict", "detail"), [g[1:] for g in GATE], ids=[g[0] for g in GATE]
)
def test_gate(edit, policy: dict[str, Any], verdict: type, detail: str | None) -> None:
    ds = _mr()
    edit(ds)
    result = check_burned_in(ds, BurnedInPolicy.from_mapping(policy), RULES)
    assert type(result) is verdict
    if isinstance(result, Quarantine):
        assert result.reason == "burned_in"
        assert detail is not None and detail in result.detail
        assert result.detail.endswith("no pixel cleaning rule matches")
    if isinstance(result, Clean):
        assert result.rule == detail
        assert result.regions == (Region(0, 0, 1024, 64),)


def test_quarantine_detail_never_quotes_header_text() -> None:
    ds = _mr()
    ds.SeriesDescription = f"Dose report {SPEC.patient_name}"
    ds.BurnedInAnnotation = "YES"
    result = check_burned_in(ds, BurnedInPolicy(), None)
    assert isinstance(result, Quarantine)
    assert "DOE" not in result.detail.upper()
    ds.BurnedInAnnotation = "NO"
    result = check_burned_in(ds, BurnedInPolicy(), None)
    assert isinstance(result, Quarantine)
    assert result.detail == (
        "SeriesDescription matches '\\bdose\\b'; "
        "SeriesDescription matches 'dose (report|info)'; no pixel cleaning rule matches"
    )


def test_policy_defaults_and_errors() -> None:
    assert BurnedInPolicy() == BurnedInPolicy.from_mapping({})
    assert "US" in BurnedInPolicy().modalities and not BurnedInPolicy().trust_burned_in_no
    with pytest.raises(ValueError) as info:
        BurnedInPolicy.from_mapping({"modalites": ["US"], "trust_burned_in_no": "yes"})
    message = str(info.value)
    assert "'modalites' was unexpected" in message and "trust_burned_in_no" in message
    with pytest.raises(ValueError, match="series_descriptions: invalid regular expression"):
        BurnedInPolicy.from_mapping({"series_descriptions": ["dose("]})


# --------------------------------------------------------------------------- cleaning

REGIONS = [Region(0, 0, 64, 6), Region(40, 30, 10, 8)]
TEXT = [Region(2, 1, 30, 4), Region(42, 32, 6, 4)]


@pytest.mark.parametrize(
    ("photometric", "frames", "bits", "planar", "black"),
    [
        ("MONOCHROME2", 1, 8, 0, 0),
        ("MONOCHROME2", 1, 16, 0, 0),
        ("MONOCHROME2", 4, 8, 0, 0),
        ("MONOCHROME1", 2, 16, 0, 4095),
        ("RGB", 1, 8, 0, 0),
        ("RGB", 3, 8, 0, 0),
        ("RGB", 2, 8, 1, 0),
        ("YBR_FULL", 2, 8, 0, [0, 128, 128]),
    ],
)
def test_clean_uncompressed(
    photometric: str, frames: int, bits: int, planar: int, black: Any
) -> None:
    ds, before = _image(photometric=photometric, frames=frames, bits=bits, planar=planar, text=TEXT)
    before_raw = _pixels(ds).copy()
    assert clean_pixels(ds, REGIONS) is None
    after = _pixels(ds)
    if photometric == "YBR_FULL":  # pixel_array converts to RGB; check the stored values
        raw = np.frombuffer(ds.PixelData, np.uint8).reshape(before.shape)
        _assert_cleaned(raw, before, REGIONS, black)
    else:
        _assert_cleaned(after, before_raw, REGIONS, black)
    assert ds.PhotometricInterpretation == photometric
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "BurnedInAnnotation" not in ds


def test_burned_in_annotation_no_only_when_the_rule_covers_all_text() -> None:
    ds, _ = _image(text=TEXT)
    ds.BurnedInAnnotation = "YES"
    ds.IconImageSequence = [Dataset()]
    clean_pixels(ds, REGIONS)
    assert ds.BurnedInAnnotation == "YES" and "IconImageSequence" not in ds
    clean_pixels(ds, REGIONS, covers_all_text=True)
    assert ds.BurnedInAnnotation == "NO"


@pytest.mark.parametrize("photometric", ["RGB", "MONOCHROME2"])
def test_clean_rle_compressed_writes_back_uncompressed(photometric: str) -> None:
    ds, before = _image(photometric=photometric, frames=3, text=TEXT)
    sop_uid = ds.SOPInstanceUID
    ds.compress(RLELossless, generate_instance_uid=False)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert clean_pixels(ds, REGIONS) is None
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == photometric and ds.SOPInstanceUID == sop_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert not reread["PixelData"].is_undefined_length
    _assert_cleaned(_pixels(reread), before, REGIONS)


def test_clean_rle_ybr_becomes_rgb() -> None:
    ds, _ = _image(photometric="YBR_FULL", frames=2, text=TEXT)
    ds.compress(RLELossless, generate_instance_uid=False)
    assert clean_pixels(ds, REGIONS) is None
    assert ds.PhotometricInterpretation == "RGB" and ds.PlanarConfiguration == 0
    assert (_pixels(ds)[:, _mask(48, 64, REGIONS)] == 0).all()


def _compressed(tmp_path: Path, codec: Codec, photometric: str) -> tuple[Dataset, np.ndarray]:
    """A 2-frame image with text (8-bit RGB, or MONOCHROME2 with 12 of 16 bits) compressed by
    ``codec``, read back; and its pixels as the decoder gives them (frames x rows x cols x
    samples), the reference outside the cleaned regions (lossy codecs change pixels)."""
    bits = 8 if photometric == "RGB" else 16
    ds, _ = _image(photometric=photometric, frames=2, bits=bits, text=TEXT)
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    path = compress(tmp_path / "plain.dcm", tmp_path / "compressed.dcm", codec)
    compressed = pydicom.dcmread(path)
    return compressed, _pixels(pydicom.dcmread(path))


@pytest.mark.parametrize("photometric", ["RGB", "MONOCHROME2"])
@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_clean_compressed_by_dcmtk_and_pydicom(
    tmp_path: Path, codec: Codec, photometric: str
) -> None:
    """Pixel cleaning decodes what dcmtk and pydicom compress (JPEG baseline, extended and
    lossless, JPEG-LS, JPEG 2000, RLE), blanks, and writes a valid uncompressed file: Explicit
    VR Little Endian, YCbCr as RGB, a lossy JPEG still marked lossy."""
    ds, decoded = _compressed(tmp_path, codec, photometric)
    sop_uid = ds.SOPInstanceUID
    assert clean_pixels(ds, REGIONS) is None
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == sop_uid
    assert ds.PhotometricInterpretation == photometric  # YBR_FULL_422 (baseline) -> RGB
    assert ds.get("PlanarConfiguration", 0) == 0 and ds.NumberOfFrames == 2
    if codec.syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
        assert ds.LossyImageCompression == "01"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    reread = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert reread.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not reread["PixelData"].is_undefined_length
    assert len(reread.PixelData) == 2 * 48 * 64 * reread.SamplesPerPixel * reread.BitsAllocated // 8
    _assert_cleaned(_pixels(reread), decoded, REGIONS)


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),  # pydicom: no decoder
        ("1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77"),  # a private syntax
    ],
)
def test_no_decoder_fails_with_the_syntax_named(syntax: str, name: str) -> None:
    """Without a decoder for the syntax, the detail says which, for the coordinator and the
    operator; the pixels are left alone."""
    ds, _ = _image(text=TEXT)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not decoded"])
    ds["PixelData"].VR = "OB"
    before = ds.PixelData
    assert clean_pixels(ds, REGIONS) == CleanFailed(
        f"pixel data cannot be decoded for cleaning: no decoder installed for {name}"
    )
    assert ds.PixelData == before


ACME_RULE = """\
rules:
  - name: acme_sono_48x64
    manufacturer: "^ACME"
    model: "SONO ?1"
    rows: 48
    columns: 64
    regions:
      - {x: 0, y: 0, width: 64, height: 6}
      - {x: 40, y: 30, width: 10, height: 8}
"""


def test_export_of_a_jpeg_ultrasound_is_cleaned_de_identified_and_valid(tmp_path: Path) -> None:
    """The usual case: an ultrasound cine compressed as JPEG baseline (YBR_FULL_422) by dcmtk
    goes through the exporter's pixel cleaning and the profile and comes out a valid
    uncompressed RGB file without the patient's name, in pixels or header."""
    ds, _ = _image(photometric="RGB", frames=2, text=TEXT)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID4711", "19600101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.AccessionNumber = "20240102", "ACC998877"
    ds.save_as(tmp_path / "us.dcm", enforce_file_format=True)
    codec = next(c for c in CODECS if c.name == "dcmcjpeg-baseline")
    path = compress(tmp_path / "us.dcm", tmp_path / "us-jpeg.dcm", codec)
    assert pydicom.dcmread(path).PhotometricInterpretation == "YBR_FULL_422"
    decoded = _pixels(pydicom.dcmread(path))
    rules = load_pixel_rules([_write(tmp_path, "acme.yaml", ACME_RULE)])
    exporter = Exporter(Deidentifier(load_profile("basic"), b"s" * 48, project="p"), None, rules)
    result = exporter.export(path.read_bytes(), subject="SUBJ0001")
    assert not isinstance(result, Held), result
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PhotometricInterpretation == "RGB" and out.LossyImageCompression == "01"
    assert out.PatientName != "Doe^Jane" and not out.get("PatientBirthDate")
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    _assert_cleaned(_pixels(out), decoded, REGIONS)
    for value in (b"Doe^Jane", b"PID4711", b"19600101", b"ACC998877"):
        assert value not in result.data


def test_undecodable_pixels_fail_for_quarantine(caplog: pytest.LogCaptureFixture) -> None:
    """A corrupt stream: one line for the quarantine, no traceback in the log (pydicom's
    decoder logs one at ERROR; fiona keeps it at DEBUG)."""
    caplog.set_level(logging.INFO)
    ds, _ = _image(text=TEXT)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    before = copy.deepcopy(ds)
    failed = clean_pixels(ds, REGIONS)
    assert isinstance(failed, CleanFailed) and failed.detail.startswith(
        "pixel data cannot be decoded for cleaning: JPEG Baseline (Process 1) pixel data is"
        " corrupt ("
    )
    assert ds.PixelData == before.PixelData
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


# --------------------------------------------------------------------------- rule files


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


BROKEN = """\
rules:
  - name: acme_800x600
    manufacturer: "^ACME"
    model: "SONO("                                   # line 4: bad regex
    rows: 600
    columns: 800
    regions:
      - {x: 0, y: 0, width: 800, height: 60}
      - {x: 700, y: 550, width: 200, height: 60}     # line 9: past the right and bottom edges
  - name: acme_800x600                               # line 10: duplicate name
    manufacturer: ACME
    rows: 600
    columns: 800
    regions: [{x: 0, y: 0, width: 8, heigth: 6}]     # line 14: misspelt key
  - name: other
    manufacturer: ACME
    rows: "600"                                      # line 17: a string
    columns: 800
    regions: []                                      # line 19: empty
"""


def test_rule_validation_messages(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", BROKEN)
    ruleset, issues = check_pixel_rules([path])
    assert ruleset is None
    assert [str(i).replace(str(path), "F") for i in issues] == [
        "F:14 rules[1].regions[0]: 'heigth' is not allowed (did you mean 'height'?)",
        "F:14 rules[1].regions[0]: missing required key 'height'",
        "F:17 rules[2].rows: expected integer, found string '600'",
        "F:19 rules[2].regions: expected at least 1 item, found 0",
    ]
    # with the schema errors fixed, the semantic checks run
    fixed = (
        BROKEN.replace("heigth", "height")
        .replace('"600"', "600")
        .replace("[]", "[{x: 0, y: 0, width: 1, height: 1}]")
    )
    ruleset, issues = check_pixel_rules([_write(tmp_path, "b.yaml", fixed)])
    assert [str(i).split(" ", 1)[1] for i in issues] == [
        "rules[0].model: invalid regular expression: "
        "missing ), unterminated subpattern at position 4",
        "rules[0].regions[1]: region extends past the image: "
        "x + width = 900, expected at most columns (800)",
        "rules[0].regions[1]: region extends past the image: "
        "y + height = 610, expected at most rows (600)",
        "rules[1].name: rule name 'acme_800x600' is already used ("
        + str(tmp_path / "b.yaml")
        + ":2)",
    ]
    assert [int(str(i).split(" ")[0].rsplit(":", 1)[1]) for i in issues] == [4, 9, 9, 10]


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    _, issues = check_pixel_rules([_write(tmp_path, "e.yaml", "")])
    assert [i.message for i in issues] == ["expected object, found null"]
    _, issues = check_pixel_rules([_write(tmp_path, "l.yaml", "- a\n")])
    assert [i.message for i in issues] == ["expected object, found array"]


# --------------------------------------------------------------------------- golden cases


def _rulesets() -> list[Path]:
    return pixel_rule_files(pixels_dir())


def _cases(ruleset: Path) -> list[Path]:
    folder = ruleset.with_suffix(".cases")
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _region(doc: dict[str, int]) -> Region:
    return Region(doc["x"], doc["y"], doc["width"], doc["height"])


@pytest.mark.parametrize("ruleset", _rulesets(), ids=lambda p: p.stem)
def test_every_pixel_ruleset_has_cases_for_every_rule(ruleset: Path) -> None:
    cases = _cases(ruleset)
    assert cases, f"{ruleset}: no golden cases (add {ruleset.with_suffix('.cases')}/NAME.yaml)"
    expected = {yaml.safe_load(c.read_text())["expected"]["rule"] for c in cases}
    rules = {rule.name for rule in load_pixel_rules([ruleset]).rules}
    assert rules <= expected, f"rules without a case: {sorted(rules - expected)}"


@pytest.mark.parametrize(
    "case",
    [c for r in _rulesets() for c in _cases(r)],
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_golden_case(case: Path) -> None:
    doc = yaml.safe_load(case.read_text(encoding="utf-8"))
    assert doc["description"].startswith("synthetic")
    image = doc["image"]
    text = [_region(r) for r in doc["text"]]
    ds, before = _image(
        image["rows"],
        image["columns"],
        image["photometric"],
        image["frames"],
        manufacturer=image["manufacturer"],
        model=image["model"],
        modality=image["modality"],
        text=text,
    )
    ruleset = load_pixel_rules([case.parent.with_suffix(".yaml")])
    verdict = check_burned_in(ds, BurnedInPolicy(), ruleset)
    expected = doc["expected"]
    if expected["rule"] is None:
        assert isinstance(verdict, Quarantine)
        return
    assert isinstance(verdict, Clean) and verdict.rule == expected["rule"]
    regions = [_region(r) for r in expected["regions"]]
    assert list(verdict.regions) == regions
    assert clean_pixels(ds, verdict.regions) is None
    after = _pixels(ds)
    _assert_cleaned(after, before, regions)
    assert (after[:, _mask(image["rows"], image["columns"], text)] == 0).all(), "text left"
