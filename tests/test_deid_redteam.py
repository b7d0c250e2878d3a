"""Red-team tests: identifying values that survive fiona's de-identification.

Each test builds a synthetic instance in code (every value is made up: ROTHWELL^MARGARET,
RT123456, born 1961-02-03...), runs the real way out (:class:`engine.deid.export.Exporter`, what
``fiona anonymize`` and the ``anonymize`` step call for every file, or the CLI itself) with the
shipped profiles, and asserts that the planted value is nowhere in what leaves: the output
file's bytes (also inflated when the output is deflated; searched as latin-1, UTF-8 and UTF-16,
in any case), or the command's log. A held file is the safe outcome and never fails a test.

Tests that FAIL on the code they were written against are proven leaks; see the report of the
``phi-audit`` branch for the code paths and suggested fixes. The last tests are forms that were
handled correctly and that the other deid tests do not cover.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from engine.deid import Deidentifier, load_profile
from engine.deid.export import Exported, Exporter, Held
from engine.deid.pixels import load_pixel_rules
from tests.deid_phi import _code

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"r" * 48
#: The shipped example project's profile (projects/example.yaml), the one the README recommends.
RECOMMENDED = ("clean_descriptors", "retain_longitudinal_modified_dates")
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: The transfer syntaxes whose data set fiona reads and writes as such (not encapsulated).
EVERY_SYNTAX = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                DeflatedExplicitVRLittleEndian]  # fmt: skip

NAME = "ROTHWELL^MARGARET"
PID = "RT123456"
BIRTH = "19610203"


def _instance(**values: object) -> Dataset:
    """A small synthetic MR image with planted identity (all values made up)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = UID_ROOT + "9111111.1"
    ds.StudyInstanceUID = UID_ROOT + "9222222"
    ds.SeriesInstanceUID = UID_ROOT + "9333333"
    ds.FrameOfReferenceUID = UID_ROOT + "9444444"
    ds.PatientName = NAME
    ds.PatientID = PID
    ds.PatientBirthDate = BIRTH
    ds.PatientSex = "F"
    ds.AccessionNumber = "RTACC778899"
    ds.StudyDate = "20240314"
    ds.StudyTime = "101500"
    ds.SeriesDate = "20240314"
    ds.ReferringPhysicianName = "HARGREAVES^DESMOND"
    ds.InstitutionName = "KINGSBRIDGE ROYAL INFIRMARY"
    ds.Modality = "MR"
    ds.Manufacturer = "SYNTHETICA"
    ds.StudyID = "RTSTUDY1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _bytes(
    ds: Dataset, syntax: str = ExplicitVRLittleEndian, preamble: bytes | None = None
) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    if preamble is not None:
        ds.preamble = preamble
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _exporter(options: tuple[str, ...] = ()) -> Exporter:
    return Exporter(Deidentifier(load_profile("basic", options), SECRET, project="redteam"))


def _inflated(data: bytes) -> bytes:
    """``data`` and, for a Deflated Explicit VR Little Endian file, its inflated data set: the
    file meta ends where its group length (0002,0000), the first element, says."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return data
    (meta_length,) = struct.unpack("<L", data[140:144])
    end = 144 + meta_length
    if DeflatedExplicitVRLittleEndian.encode() not in data[132:end]:
        return data
    return data + b"\n" + zlib.decompress(data[end:], -zlib.MAX_WBITS)


def _forms(value: str) -> set[bytes]:
    """``value`` as bytes in every case and encoding a reader could find it in."""
    out: set[bytes] = set()
    for text in {value, value.lower(), value.upper(), value.title()}:
        for encoding in ("latin-1", "utf-8", "utf-16-le", "utf-16-be"):
            try:
                out.add(text.encode(encoding))
            except UnicodeEncodeError:
                continue
    return out


def _found(data: bytes, *values: str) -> list[str]:
    """The planted ``values`` present in ``data`` (any case; latin-1, UTF-8, UTF-16)."""
    haystack = _inflated(data)
    return [v for v in values if any(form in haystack for form in _forms(v))]


def _leaked(result: Exported | Held, *values: str) -> list[str]:
    """The planted values in an export's output; none when the file was held (safe)."""
    if isinstance(result, Held):
        return []
    return _found(result.data, *values)


# =========================================================================== proven leaks


# --------------------------------------------------------------- 1. deflated output is not verified


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian], ids=["deflated"])
def test_deflated_output_is_searched_by_the_verification_gate(syntax: str) -> None:
    """Was a leak: the gate's byte scan ran on the deflated output as it is (compressed), so
    nothing in the data set could match. The gate now searches the inflated data set: a name
    and MRN are held as in every other transfer syntax (see
    test_kept_text_is_held_in_uncompressed_syntaxes)."""
    ds = _instance(WindowCenterWidthExplanation=f"ROTHWELL {PID}")
    result = _exporter().export(_bytes(ds, syntax))
    assert _leaked(result, "ROTHWELL", PID) == []
    assert isinstance(result, Held) and result.reason == "verification_failed"


@pytest.mark.parametrize("syntax", EVERY_SYNTAX)
def test_an_original_uid_in_kept_text_is_held_in_every_syntax(syntax: str) -> None:
    """The gate's search for original UIDs reads the deflated original and output inflated."""
    ds = _instance(WindowCenterWidthExplanation=f"see {UID_ROOT}9222222")
    result = _exporter().export(_bytes(ds, syntax))
    assert isinstance(result, Held) and result.reason == "verification_failed"
    assert "original_uid" in result.detail


def test_a_clean_deflated_file_leaves_with_its_pixels() -> None:
    """Searching the inflated data set holds nothing clean: the pixel data is not searched."""
    ds = _instance()
    ds.PixelData = (PID.encode() * 2)[:32]  # pixel values that spell an ID are signal
    result = _exporter().export(_bytes(ds, DeflatedExplicitVRLittleEndian))
    assert isinstance(result, Exported)
    assert result.data[:128] == b"\0" * 128
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert out.PixelData == ds.PixelData and "PatientID" in out and out.PatientID != PID


# --------------------------------------------------------------- 2. the original preamble


@pytest.mark.parametrize(
    ("syntax", "charset", "encoding"),
    [
        (DeflatedExplicitVRLittleEndian, ["", "ISO 2022 IR 87"], "ascii"),
        (ExplicitVRBigEndian, ["", "ISO 2022 IR 87"], "ascii"),
        (ExplicitVRBigEndian, "ISO_IR 144", "ascii"),
        (DeflatedExplicitVRLittleEndian, "ISO_IR 100", "utf-16-le"),
        (ExplicitVRBigEndian, "ISO_IR 100", "utf-16-le"),
    ],
    ids=[
        "deflated-japanese",
        "bigendian-japanese",
        "bigendian-cyrillic",
        "deflated-utf16",
        "bigendian-utf16",
    ],
)
def test_the_original_file_preamble_is_never_copied_to_the_output(
    syntax: str, charset: object, encoding: str
) -> None:
    """Was a leak: the 128-byte preamble (application-defined, e.g. a TIFF header) was zeroed
    on the byte path but copied as it was by the pydicom path (deflated, big endian; also the
    pixel-rule and OCR paths, which write with ``save_as``), and the gate saw it only as
    latin-1/UTF-8 bytes and not at all when the study's character set needs decoding. Every
    path now writes zeros, and the gate holds any output whose preamble is not."""
    text = f"{NAME} {PID} {BIRTH}"
    preamble = (text.encode(encoding) + b"\0" * 128)[:128]
    ds = _instance(SpecificCharacterSet=charset)
    result = _exporter().export(_bytes(ds, syntax, preamble))
    assert _leaked(result, "ROTHWELL", PID) == []
    assert isinstance(result, Exported) and result.data[:128] == b"\0" * 128


def test_the_preamble_is_zeroed_when_a_pixel_rule_cleans_the_image() -> None:
    """Was a leak: the pixel-rule path (Exporter._cleaned -> _deidentified) wrote the cleaned
    dataset with ``save_as``, which writes the original ``ds.preamble``, and in a Japanese
    study the gate compared parsed elements only and never saw the preamble. Explicit VR
    Little Endian, the shipped dose screen rule (Siemens CT patient protocol page)."""
    rules = load_pixel_rules([ROOT / "rulesets" / "pixels" / "dose_screens.yaml"])
    deid = Deidentifier(load_profile("basic"), SECRET, project="redteam")
    ds = _instance(
        Modality="CT",
        Manufacturer="SIEMENS",
        ManufacturerModelName="SOMATOM Force",
        SOPClassUID=SecondaryCaptureImageStorage,
        SpecificCharacterSet=["", "ISO 2022 IR 87"],
    )
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.zeros((512, 512), dtype=np.uint16).tobytes()
    preamble = (f"{NAME} {PID}".encode() + b"\0" * 128)[:128]
    result = Exporter(deid, pixel_rules=rules).export(_bytes(ds, preamble=preamble))
    assert _leaked(result, "ROTHWELL", PID) == []
    assert isinstance(result, Exported) and result.data[:128] == b"\0" * 128


def test_the_dataset_writer_of_the_ocr_and_pixel_rule_paths_writes_a_zero_preamble() -> None:
    """Exporter._deidentified writes what OCR blacked out (and what a pixel rule cleaned) from
    a dataset read with its preamble: zeros are written."""
    data = _bytes(_instance(), preamble=(f"{NAME} {PID}".encode() + b"\0" * 128)[:128])
    full = pydicom.dcmread(io.BytesIO(data))
    assert full.preamble[:8] == b"ROTHWELL"
    result = _exporter()._deidentified(full, data, "", "")
    assert result.header[:132] == b"\0" * 128 + b"DICM"


def test_the_gate_holds_an_output_with_a_preamble_or_file_meta_it_did_not_write() -> None:
    """What lies outside the data set is checked on its own (the searches compare values, and
    a decoded comparison never sees the preamble): zeros, ``DICM`` and the rebuilt meta only."""
    from engine.deid.export import _outside_data_set

    out = _exporter().export(_bytes(_instance()))
    assert isinstance(out, Exported)
    header = bytes(out.header)
    assert _outside_data_set(header) is None
    dirty = _outside_data_set(b"\x49\x49\x2a\x00" + header[4:])  # a TIFF header
    assert dirty is not None and dirty.reason == "verification_failed"
    ds = _instance()
    ds.file_meta.SourceApplicationEntityTitle = "WORKSTATION1"
    extra = _bytes(ds)
    held = _outside_data_set(b"\0" * 128 + extra[128:])
    assert held is not None and "(0002,0016)" in held.detail


# --------------------------------------------------------------- 3. Code Meaning


def test_patient_name_in_a_local_code_meaning_is_held_under_the_default_profile() -> None:
    """Requested Procedure Code Sequence (0032,1064) is not in Table E.1-1, so its items are
    walked and Code Meaning (0008,0104) is kept (unlisted.json keep_text). The gate lends
    kept vocabulary only from the Code Meanings of standard coding schemes (DCM, SCT, LN...):
    a local RIS code (99RIS) whose meaning carries the patient is searched like any text, and
    the file is held."""
    ds = _instance()
    ds.RequestedProcedureCodeSequence = Sequence(
        [_code("MRBR", "99RIS", "MR Brain - Rothwell Margaret")]
    )
    result = _exporter().export(_bytes(ds))
    assert _leaked(result, "Rothwell", "Margaret") == []
    assert isinstance(result, Held) and result.reason == "verification_failed"
    assert "RequestedProcedureCodeSequence[0].CodeMeaning (patient_name)" in result.detail


def test_a_removed_code_meaning_does_not_blind_the_gate_to_the_patient_name_elsewhere() -> None:
    """A local Code Meaning lends no vocabulary, wherever it is (here in Reason For
    Requested Procedure Code Sequence, which the profile removes): the same name in another
    kept text (Window Center & Width Explanation) is held."""
    ds = _instance(WindowCenterWidthExplanation="ROTHWELL MARGARET")
    ds.ReasonForRequestedProcedureCodeSequence = Sequence(
        [_code("R01", "99RIS", "Follow-up Rothwell Margaret")]
    )
    result = _exporter().export(_bytes(ds))
    assert _leaked(result, "ROTHWELL", "MARGARET") == []
    assert isinstance(result, Held) and "WindowCenterWidthExplanation" in result.detail


# --------------------------------------------------------------- 4. free text, recommended profile

FREE_TEXT = [
    # (id, attributes, planted values that must not leave)
    (
        "umlaut_written_ue",
        {
            "SpecificCharacterSet": "ISO_IR 100",
            "PatientName": "MÜLLER^JÜRGEN",
            "StudyDescription": "MRT Kopf Mueller Juergen",
        },
        ("Mueller", "Juergen"),
    ),
    (
        "ascii_name_written_with_umlaut",
        {
            "SpecificCharacterSet": "ISO_IR 100",
            "PatientName": "MUELLER^JUERGEN",
            "StudyDescription": "MRT Kopf Müller Jürgen",
        },
        ("Müller", "Jürgen"),
    ),
    (
        "nordic_letters_written_oe_aa",
        {
            "SpecificCharacterSet": "ISO_IR 100",
            "PatientName": "SØRENSEN^ÅSE",
            "StudyDescription": "MR caput Soerensen Aase",
        },
        ("Soerensen", "Aase"),
    ),
    (
        "hyphenated_family_name_without_hyphen",
        {
            "PatientName": "ROTHWELL-SMYTHE^MARGARET",
            "StudyDescription": "MRI for Mrs Rothwell Smythe",
        },
        ("Rothwell", "Smythe"),
    ),
    (
        "apostrophe_dropped",
        {"PatientName": "O'DONNELL^SIOBHAN", "StudyDescription": "MRI ODonnell follow-up"},
        ("ODonnell",),
    ),
    (
        "birth_date_ordinal_day",
        {"StudyDescription": "DOB 3rd February 1961"},
        ("3rd February 1961",),
    ),
    (
        "birth_date_month_first_ordinal",
        {"ImageComments": "born Feb 3rd, 1961"},
        ("Feb 3rd, 1961",),
    ),
    ("birth_date_iso_without_zeros", {"ImageComments": "DOB 1961-2-3"}, ("1961-2-3",)),
    ("birth_date_yy_mm_dd", {"ImageComments": "DOB 61-02-03"}, ("61-02-03",)),
    (
        "study_date_two_digit_year",
        {"SeriesDescription": "FU 14.03.24 post-op"},
        ("14.03.24",),
    ),
    (
        "study_date_month_name",
        {"SeriesDescription": "post-op 14 Mar 2024"},
        ("14 Mar 2024",),
    ),
    (
        "address_part",
        {
            "PatientAddress": "12 Rosebud Lane, Springfield",
            "StudyDescription": "pt from Rosebud Lane Springfield",
        },
        ("Rosebud", "Springfield"),
    ),
    (
        "institution_name_part",
        {"StudyDescription": "ext from Kingsbridge Royal"},
        ("Kingsbridge",),
    ),
]


@pytest.mark.parametrize(
    ("values", "planted"), [c[1:] for c in FREE_TEXT], ids=[c[0] for c in FREE_TEXT]
)
def test_recommended_profile_cleans_reformatted_values_from_free_text(
    values: dict[str, object], planted: tuple[str, ...]
) -> None:
    """Clean Descriptors cuts the instance's own values in the forms the gate hunts: names
    as typed on another keyboard (ü <-> ue, ø -> oe, å -> aa), split on hyphens and
    apostrophes and joined; every original date in ordinal, unpadded, two-digit-year and
    month-name forms; addresses and institution names word by word. So the file leaves,
    cleaned, rather than being held."""
    result = _exporter(RECOMMENDED).export(_bytes(_instance(**values)))
    assert _leaked(result, *planted) == []
    assert isinstance(result, Exported), result


# --------------------------------------------------------------- 5. the gate's study cache


def test_a_later_file_is_verified_against_its_own_values_too() -> None:
    """Was a leak: the gate compiled a study's identifying values from its first file and
    reused them for every later file of the same study and patient. A later series acquired
    on another day writes that day in a text the profile keeps (the scrubber of Clean
    Descriptors would cut it from a description): alone the file is held, and now also after
    the first file (each file's values are added to the study's)."""
    first = _instance()
    later = _instance(
        SOPInstanceUID=UID_ROOT + "9111111.2",
        SeriesInstanceUID=UID_ROOT + "9333334",
        SeriesDate="20240316",
        AcquisitionDate="20240316",
        ContentDate="20240316",
        WindowCenterWidthExplanation="Delayed 16.03.2024",
    )
    exporter = _exporter()
    alone = _exporter().export(_bytes(later.copy()))
    assert isinstance(alone, Held)  # the gate knows this form of the file's own date
    exporter.export(_bytes(first))
    result = exporter.export(_bytes(later))
    assert _leaked(result, "16.03.2024") == []
    assert isinstance(result, Held) and result.reason == "verification_failed"


@pytest.mark.parametrize("syntax", EVERY_SYNTAX)
def test_a_later_files_operator_is_hunted_in_every_syntax(syntax: str) -> None:
    """The default profile: a later file's own person name (an operator the first file did
    not name, in a sequence item) written in kept text is held, whatever its syntax."""
    exporter = _exporter()
    assert isinstance(exporter.export(_bytes(_instance(), syntax)), Exported)
    later = _instance(
        SOPInstanceUID=UID_ROOT + "9111111.2", WindowCenterWidthExplanation="KOWALSKI PIOTR"
    )
    item = Dataset()
    item.PersonName = "KOWALSKI^PIOTR"
    later.PersonIdentificationCodeSequence = Sequence([item])
    later.OperatorIdentificationSequence = Sequence([item])
    result = exporter.export(_bytes(later, syntax))
    assert _leaked(result, "KOWALSKI") == []
    assert isinstance(result, Held) and result.reason == "verification_failed"


def test_files_with_the_study_s_values_reuse_its_compiled_search() -> None:
    """The common case stays fast: a file whose names, IDs and dates the study has seen
    (other UIDs, numbers and times) neither re-collects nor recompiles the study's values."""
    exporter = _exporter()
    assert isinstance(exporter.export(_bytes(_instance())), Exported)
    (study,) = exporter._studies.values()
    matcher = study.values.matcher((), exporter.allow_kinds)
    for n in range(2, 5):
        ds = _instance(SOPInstanceUID=f"{UID_ROOT}9111111.{n}", InstanceNumber=n,
                       ContentTime=f"10151{n}", SliceLocation=n * 1.5)  # fmt: skip
        assert isinstance(exporter.export(_bytes(ds)), Exported)
    assert study.values.matcher((), exporter.allow_kinds) is matcher


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_the_compared_texts_reach_into_sequences(syntax: str) -> None:
    from engine.deid.study_texts import raw_texts

    ds = _instance()
    other = Dataset()
    other.PatientID = "RTOTHER9"
    ds.OtherPatientIDsSequence = Sequence([other])
    texts = raw_texts(_bytes(ds, syntax))
    assert texts is not None
    values = {bytes(v).rstrip(b"\0 ") for _, v in texts if isinstance(v, bytes)}
    assert {b"RTOTHER9", PID.encode(), b"ROTHWELL^MARGARET"} <= values
    assert not any(tag == 0x00080018 for tag, _ in texts)  # UIDs are searched per file


# --------------------------------------------------------------- 6. the log of fiona anonymize


def _secret_file(tmp_path: Path) -> Path:
    key = tmp_path / "key"
    key.write_bytes(secrets.token_bytes(48))
    os.chmod(key, 0o600)
    return key


def test_fiona_anonymize_log_never_quotes_an_original_uid_with_embedded_ids(
    tmp_path: Path,
) -> None:
    """Was a leak: a Series Instance UID that embeds the birth date and the zero-padded MRN (a
    component with a leading zero, as some RIS write them) is not a valid UI; when the gate
    read the original, pydicom's reading validation warned ``Invalid value for VR UI: '<the
    UID>'`` and fiona anonymize printed it to stderr (the pipeline's log in a server). pydicom's
    validation is now off and its log and warnings silent (engine.dicom.pydicom_setup)."""
    ds = _instance(SeriesInstanceUID=f"{UID_ROOT}7.{BIRTH}.00123456")
    source = tmp_path / "in"
    source.mkdir()
    (source / "a.dcm").write_bytes(_bytes(ds))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli", "anonymize", str(source), str(out),
         "--secret-file", str(_secret_file(tmp_path)), "--no-progress", "--no-sync"],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr.decode()
    log = run.stdout + run.stderr
    assert _found(log, BIRTH, "00123456") == []
    for path in out.rglob("*"):
        if path.is_file():
            assert _found(path.read_bytes(), BIRTH, "00123456") == [], path.name


# =========================================================================== handled correctly


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_kept_text_is_held_in_uncompressed_syntaxes(syntax: str) -> None:
    """The control for the deflated leak: the same planted text is held."""
    ds = _instance(WindowCenterWidthExplanation=f"ROTHWELL {PID}")
    result = _exporter().export(_bytes(ds, syntax))
    assert isinstance(result, Held) and result.reason == "verification_failed"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("encoding", ["ascii", "utf-16-le"])
def test_the_byte_path_writes_a_zero_preamble(syntax: str, encoding: str) -> None:
    preamble = (f"{NAME} {PID}".encode(encoding) + b"\0" * 128)[:128]
    result = _exporter().export(_bytes(_instance(), syntax, preamble))
    assert isinstance(result, Exported)
    assert result.data[:128] == b"\0" * 128


@pytest.mark.parametrize("syntax", EVERY_SYNTAX)
def test_file_meta_identity_is_dropped_on_every_path(syntax: str) -> None:
    ds = _instance()
    ds.file_meta.SourceApplicationEntityTitle = "ROTHWELLPC"
    ds.file_meta.SendingApplicationEntityTitle = PID
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = f"{NAME} {BIRTH}".encode("utf-16-le")
    result = _exporter().export(_bytes(ds, syntax))
    assert isinstance(result, Exported)
    assert _leaked(result, "ROTHWELL", PID, "MARGARET") == []


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_trailing_padding_after_pixel_data_is_dropped(syntax: str) -> None:
    ds = _instance()
    ds.add_new(0xFFFCFFFC, "OB", f"{NAME} {PID}".encode("utf-16-le"))
    result = _exporter().export(_bytes(ds, syntax))
    assert isinstance(result, Exported)
    assert _leaked(result, "ROTHWELL", PID) == []


def test_bytes_after_the_data_set_hold_the_file() -> None:
    """Garbage after the last element (not an element): held, never copied."""
    data = _bytes(_instance()) + f"{NAME} {PID}".encode("utf-16-le")
    result = _exporter().export(data)
    assert isinstance(result, Held)


def test_anonymize_report_and_quarantine_carry_no_value(tmp_path: Path) -> None:
    """A held file's JSON sidecar and deid-report.json name paths and kinds, never values,
    also when the leaking element is a private or unlisted one."""
    ds = _instance(WindowCenterWidthExplanation=f"{NAME} {PID} {BIRTH}")
    source = tmp_path / "in"
    source.mkdir()
    (source / f"{PID}_ROTHWELL.dcm").write_bytes(_bytes(ds))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "engine.cli", "anonymize", str(source), str(out),
         "--secret-file", str(_secret_file(tmp_path)), "--no-progress", "--no-sync",
         "--report"],
        cwd=ROOT, capture_output=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0
    assert _found(run.stdout + run.stderr, "ROTHWELL", PID, BIRTH) == []
    quarantine = tmp_path / "out-quarantine"
    sidecars = list(quarantine.glob("*.json"))
    assert sidecars
    for path in [*sidecars, *out.rglob("*")]:
        if path.is_file():
            assert _found(path.read_bytes(), "ROTHWELL", PID, BIRTH) == [], path.name
        assert "ROTHWELL" not in path.name.upper() and PID not in path.name
