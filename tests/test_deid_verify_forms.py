"""The verification gate finds identities however they are written, and holds no clean file.

Each case de-identifies a synthetic instance through :class:`engine.deid.export.Exporter` with
the basic profile and an override that keeps Image Comments (0020,4000), where the case writes
an original value in another form (or a kept value that is not a leak). A leak must hold the
file as ``verification_failed`` naming the element and the kind of match, never the value.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from engine.cli import main
from engine.deid import Deidentifier, load_profile, verify
from engine.deid.export import Exported, Exporter, Held
from tests import synth

SECRET = b"v" * 48
Edit = Callable[[Dataset], None]


def _instance(edit: Edit) -> bytes:
    ds = synth.make_study(synth.make_study_spec(11), [synth.MR_SERIES["t2_tse"]], size=16)[0]
    ds.PatientID = "00123456"
    ds.AccessionNumber = "ACC-2024-778899"
    ds.PatientBirthDate = "19680403"
    ds.PatientAddress = "12 Rosebud Lane, Springfield"
    ds.PatientTelephoneNumbers = "044 123 45 67"
    ds.PatientMotherBirthName = "KOWALSKA^MARTA"
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _export(edit: Edit, *overrides: str) -> Exported | Held:
    keep = {"ImageComments": "keep", **{k: "keep" for k in overrides}}
    profile = load_profile("basic", (), keep)
    return Exporter(Deidentifier(profile, SECRET, project="p")).export(_instance(edit))


def _comment(text: str, **more: object) -> Edit:
    def edit(ds: Dataset) -> None:
        for keyword, value in more.items():
            setattr(ds, keyword, value)
        ds.ImageComments = text

    return edit


def _codes(scheme: str, meaning: str) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "C1", scheme, meaning
    return [item]


LEAKS = [
    ("folded_name", _comment("seen by Sorensen", PatientName="SØRENSEN^ÅSA"), "patient_name"),
    ("accented_name", _comment("Sørensen Åsa", PatientName="SORENSEN^ASA"), "patient_name"),
    ("given_family_comma", _comment("Asa, Sorensen", PatientName="SORENSEN^ASA"), "patient_name"),
    ("mrn_separators", _comment("MRN 123-456"), "patient_id"),
    ("mrn_prefix_zeros", _comment("id: P000123456."), "patient_id"),
    ("accession_digits", _comment("acc 2024/778899"), "accession_number"),
    ("birth_day_month_name", _comment("born 3 Apr 1968"), "birth_date"),
    ("birth_two_digit_year", _comment("DOB 03.04.68"), "birth_date"),
    ("birth_iso", _comment("DOB 1968-04-03"), "birth_date"),
    ("birth_us", _comment("DOB 04/03/1968"), "birth_date"),
    ("birth_month_first", _comment("born April 3, 1968"), "birth_date"),
    ("address", _comment("lives at 12 ROSEBUD LANE, SPRINGFIELD"), "patient_contact"),
    ("telephone_digits", _comment("call 044-123-45-67"), "patient_contact"),
    ("mother_birth_name", _comment("mother Kowalska Marta"), "patient_name"),
    ("name_spelt_out", _comment("MRT Mueller", PatientName="MÜLLER^JÜRGEN"), "patient_name"),
    ("name_spelt_back", _comment("MRT Müller", PatientName="MUELLER^JUERGEN"), "patient_name"),
    ("nordic_spelt_out", _comment("Soerensen", PatientName="SØRENSEN^ÅSE"), "patient_name"),
    ("hyphen_part", _comment("Mrs Smythe", PatientName="ROTHWELL-SMYTHE^M"), "patient_name"),
    ("apostrophe_joined", _comment("ODonnell FU", PatientName="O'DONNELL^S"), "patient_name"),
    ("birth_ordinal", _comment("DOB 3rd April 1968"), "birth_date"),
    ("birth_ordinal_month_first", _comment("born Apr 3rd, 1968"), "birth_date"),
    ("birth_iso_unpadded", _comment("DOB 1968-4-3"), "birth_date"),
    ("birth_yy_mm_dd", _comment("DOB 68-04-03"), "birth_date"),
    ("study_two_digit_year", _comment("FU 14.03.24", StudyDate="20240314"), "original_date"),
    ("study_month_name", _comment("on 14 Mar 2024", StudyDate="20240314"), "original_date"),
    ("address_word", _comment("pt from Springfield"), "patient_contact"),
    (
        "institution_word",
        _comment("ext from Kingsbridge", InstitutionName="KINGSBRIDGE ROYAL INFIRMARY"),
        "institution",
    ),
    (
        "local_code_meaning",
        _comment(
            "seen Rothwell",
            PatientName="ROTHWELL^MARGARET",
            CodeValue="MRB",
            CodingSchemeDesignator="99RIS",
            CodeMeaning="MR head Rothwell",
        ),
        "patient_name",
    ),
    (
        "standard_designator_on_a_name",
        _comment(
            "Rothwell",
            PatientName="ROTHWELL^MARGARET",
            CodeValue="1",
            CodingSchemeDesignator="SCT",
            CodeMeaning="Rothwell Margaret",
        ),
        "patient_name",
    ),
    (
        "removed_standard_code_meaning",
        _comment("seen White", PatientName="WHITE^JOHN",
                 ReasonForRequestedProcedureCodeSequence=_codes("SCT", "White matter lesion")),
        "patient_name",
    ),
    (
        "japanese_ideographic",
        _comment(
            "山田太郎",
            SpecificCharacterSet=["", "ISO 2022 IR 87"],
            PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
        ),
        "patient_name",
    ),
    (
        "greek_lower_case_accented",
        _comment(
            "ο κ. Παπαδόπουλος",
            SpecificCharacterSet="ISO_IR 126",
            PatientName="ΠΑΠΑΔΟΠΟΥΛΟΣ^ΝΙΚΟΣ",
        ),
        "patient_name",
    ),
    (
        "chinese_gb18030",
        _comment("患者王小明", SpecificCharacterSet="GB18030", PatientName="Wang^XiaoMing=王^小明"),
        "patient_name",
    ),
]


@pytest.mark.parametrize(("edit", "kind"), [c[1:] for c in LEAKS], ids=[c[0] for c in LEAKS])
def test_a_reformatted_identity_is_held_naming_path_and_kind(edit: Edit, kind: str) -> None:
    held = _export(edit)
    assert isinstance(held, Held), "not held"
    assert held.reason == "verification_failed"
    assert "ImageComments" in held.detail and kind in held.detail, held.detail
    comment = _instance(edit)
    for secret in ("Sorensen", "123456", "778899", "1968", "Rosebud", "Kowalska", "45 67"):
        assert secret.lower() not in held.detail.lower() or secret.encode() not in comment


CLEAN = [
    ("own_dummy_name", _comment("ANONYMIZED", PatientName="ANONYMIZED")),
    (
        "manufacturer_word",
        _comment("made by SIEMENS", InstitutionName="SIEMENS", Manufacturer="SIEMENS"),
    ),
    (
        "code_meaning_word",
        _comment(
            "Brain",
            PatientName="BRAIN^QUINTUS",
            CodeValue="T-A0100",
            CodingSchemeDesignator="SRT",
            CodeMeaning="Brain",
        ),
    ),
    (
        "standard_code_meaning_word",
        _comment(
            "White matter",
            PatientName="WHITE^JOHN",
            CodeValue="389080007",
            CodingSchemeDesignator="SCT",
            CodeMeaning="White matter",
        ),
    ),
    (
        "kept_standard_code_meaning_in_a_sequence",
        _comment("White matter", PatientName="WHITE^JOHN",
                 AnatomicRegionSequence=_codes("SCT", "White matter")),
    ),
    ("generic_place_words", _comment("Royal Lane Hospital", InstitutionName="ROYAL HOSPITAL")),
    ("short_numbers", _comment("TR 4500 TE 120 slice 12")),
    ("other_digits", _comment("ref 123-457")),
]


@pytest.mark.parametrize("edit", [c[1] for c in CLEAN], ids=[c[0] for c in CLEAN])
def test_kept_values_are_not_leaks(edit: Edit) -> None:
    result = _export(edit, "Manufacturer")
    assert isinstance(result, Exported), result


def test_a_private_coding_scheme_uid_the_profile_keeps_is_not_a_leak() -> None:
    def edit(ds: Dataset) -> None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99LOCAL", "Thing"
        item.CodingSchemeUID = "1.2.826.0.1.3680043.99.1234.5"  # a private scheme's UID
        ds.ProcedureCodeSequence = [item]

    result = _export(edit)
    assert isinstance(result, Exported), result
    assert b"1.2.826.0.1.3680043.99.1234.5" in result.data


def test_a_short_date_form_matches_as_a_whole_token_only() -> None:
    ds = Dataset()
    ds.StudyDate = "20240314"
    values = verify.IdentifyingValues.from_dataset(ds)
    for text in ("1.2.14.03.24.5", "v14.03.245", "114.03.24", "14.03.24.1"):
        assert verify.find_text_leaks([("x", text)], values) == [], text
    for text in ("FU 14.03.24.", "(14/03/24)", "14-3-24 post-op", "2024-3-14"):
        assert verify.find_text_leaks([("x", text)], values), text


def test_folding_and_digit_runs() -> None:
    assert verify.ascii_fold("Sørensen Åsa Łódź Straße") == "Sorensen Asa Lodz Strasse"
    assert verify.digit_run("MRN-000123.456") == "123456"


# --------------------------------------------------------------------------- month names


@pytest.fixture
def languages() -> Iterator[Callable[[list[str]], None]]:
    """Set the gate's date languages for one test (a process-wide setting: restored after)."""
    yield verify.set_date_languages
    verify.set_date_languages([])


WRITTEN_ABROAD = [
    ("de", "19680303", "geb. 3. März 1968"),
    ("de", "19680303", "geb. 03. MARZ 1968"),
    ("nb", "19681003", "født 3. oktober 1968"),
    ("fr", "19680203", "né le 3 févr. 1968"),
    ("es", "19680403", "nacido el 3 de abril de 1968"),
    ("fi", "19680403", "syntynyt 3. huhtikuuta 1968"),
    ("pl", "19680403", "ur. 3 kwietnia 1968"),
]


@pytest.mark.parametrize(
    ("code", "born", "text"), WRITTEN_ABROAD, ids=[f"{c}-{t}" for c, _, t in WRITTEN_ABROAD]
)
def test_birth_dates_written_in_a_configured_language_are_held(
    languages: Callable[[list[str]], None], code: str, born: str, text: str
) -> None:
    edit = _comment(text, PatientBirthDate=born)
    assert isinstance(_export(edit), Exported), "English only: the gate does not know this form"
    languages([code])
    held = _export(edit)
    assert isinstance(held, Held) and "birth_date" in held.detail, held
    assert "1968" not in held.detail


def test_month_names_cover_every_language_and_unknown_codes_are_refused(
    languages: Callable[[list[str]], None],
) -> None:
    table = verify.month_names()
    assert all(len(months) == 12 for months in table.values())
    assert {"en", "nb", "de", "fr"} <= set(table)
    with pytest.raises(ValueError, match="unknown date language xx: choose from da, de"):
        languages(["xx"])
    languages(["nb"])
    assert verify.date_languages() == ("en", "nb")


def test_fiona_anonymize_date_languages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()

    def edit(ds: Dataset) -> None:  # a CS value the basic profile keeps
        ds.PatientBirthDate, ds.BodyPartExamined = "19680303", "3 MARZ 1968"

    (tmp_path / "in" / "a.dcm").write_bytes(_instance(edit))
    secret = tmp_path / "k"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    base = ["anonymize", str(tmp_path / "in"), "--profile", "basic", "--secret-file", str(secret)]
    base += ["--no-progress", "--no-sync"]
    try:
        assert main([*base[:2], str(tmp_path / "en"), *base[2:]]) == 0
        assert len(list((tmp_path / "en").rglob("*.dcm"))) == 1
        main([*base[:2], str(tmp_path / "de"), *base[2:], "--date-languages", "nb,de"])
        assert not list((tmp_path / "de").rglob("*.dcm")), "held, not exported"
        capsys.readouterr()
        assert main([*base[:2], str(tmp_path / "xx"), *base[2:], "--date-languages", "xx"]) == 2
        assert "unknown date language xx" in capsys.readouterr().err
    finally:
        verify.set_date_languages([])
