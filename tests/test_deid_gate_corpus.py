"""Precision and recall of the verification gate on a labelled synthetic corpus.

Every case is one synthetic MR instance de-identified by :class:`engine.deid.export.Exporter`
(basic profile, Image Comments (0020,4000) kept by an override) whose Image Comments hold
either one of the patient's identifiers in some written form (label: leak) or text that only
looks like one: another patient's values, acquisition numbers, device and code words, fiona's
own dummy (label: clean). A held ``verification_failed`` file is a positive. The test prints
the counts and fails below the floors; run with ``-s`` to see them.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from pydicom.dataset import Dataset

from engine.deid import Deidentifier, load_profile
from engine.deid.export import Exporter, Held
from tests import synth

SECRET = b"c" * 48
PRECISION_FLOOR = 0.95
RECALL_FLOOR = 0.9


@dataclass(frozen=True)
class Patient:
    family: str
    given: str
    pid: str
    birth: str  # YYYYMMDD
    phone: str


PATIENTS = [
    Patient("SØRENSEN", "ÅSA", "00482913", "19680403", "044 123 45 67"),
    Patient("MÜLLER", "JÜRGEN", "K-771234", "19511130", "+49 30 5550 1234"),
    Patient("OKONKWO", "CHIDI", "9003311", "20011207", "0161 496 0000"),
    Patient("NGUYEN", "THI LAN", "MRN4471209", "19790722", "555-0100-231"),
]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _leak_forms(p: Patient) -> list[str]:
    """Ways a person writes the patient's identifiers into a comment."""
    y, m, d = p.birth[:4], p.birth[4:6], p.birth[6:]
    digits = "".join(c for c in p.pid if c.isdigit())
    return [
        f"{p.family}^{p.given}",
        f"{p.given.title()} {p.family.title()}",
        f"pt {p.family.lower()}",
        f"{p.family.translate(str.maketrans('ØÅÜ', 'OAU'))}, {p.given[:3]}",
        f"ID {p.pid}",
        f"MRN: {digits[:3]}-{digits[3:]}",
        f"#{digits.lstrip('0')}",
        f"0{digits}",
        f"DOB {d}.{m}.{y[2:]}",
        f"born {int(d)} {MONTHS[int(m) - 1]} {y}",
        f"{y}-{m}-{d}",
        f"{m}/{d}/{y}",
        f"tel {p.phone}",
        f"tel {''.join(c for c in p.phone if c.isdigit())}",
    ]


def _clean_forms(p: Patient, other: Patient) -> list[str]:
    """Text that must not hold the file: another patient's values and everyday numbers."""
    return [
        f"{other.family}^{other.given}",
        f"ID {other.pid}",
        f"DOB {other.birth[6:]}.{other.birth[4:6]}.{other.birth[2:4]}",
        "acquisition 3 of 12, TR 4500 TE 120",
        "ANONYMIZED",
        "SIEMENS SKYRA 3T",
        "T2 weighted, brain, axial",
        f"series {random.Random(p.pid).randint(100000, 999999)}",
        "no contrast",
        "1.0 mm slices",
    ]


def _export(p: Patient, comment: str) -> bool:
    ds = synth.make_study(synth.make_study_spec(21), [synth.MR_SERIES["t2_tse"]], size=16)[0]
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = f"{p.family}^{p.given}"
    ds.PatientID = p.pid
    ds.PatientBirthDate = p.birth
    ds.PatientTelephoneNumbers = p.phone
    ds.Manufacturer, ds.ManufacturerModelName = "SIEMENS", "SKYRA"
    ds.ImageComments = comment
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
    ds.AnatomicRegionSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    exporter = Exporter(Deidentifier(load_profile("basic", (), {"ImageComments": "keep"}), SECRET))
    result = exporter.export(buffer.getvalue())
    return isinstance(result, Held) and result.reason == "verification_failed"


def test_precision_and_recall_on_the_labelled_corpus() -> None:
    tp = fp = fn = tn = 0
    missed: list[str] = []
    for i, patient in enumerate(PATIENTS):
        other = PATIENTS[(i + 1) % len(PATIENTS)]
        for form in _leak_forms(patient):
            if _export(patient, form):
                tp += 1
            else:
                fn += 1
                missed.append(f"patient {i} leak form {_leak_forms(patient).index(form)}")
        for form in _clean_forms(patient, other):
            if _export(patient, form):
                fp += 1
                missed.append(f"patient {i} clean form {_clean_forms(patient, other).index(form)}")
            else:
                tn += 1
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    print(f"gate corpus: {tp} TP, {fp} FP, {fn} FN, {tn} TN;", end=" ")
    print(f"precision {precision:.3f}, recall {recall:.3f}; off: {missed}")
    assert precision >= PRECISION_FLOOR and recall >= RECALL_FLOOR, missed
