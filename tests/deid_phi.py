"""A synthetic instance carrying planted (fake) PHI in every kind of place de-identification
must reach: standard attributes, unlisted and unknown ones, private blocks (safe and unsafe),
sequences at several levels, overlays, curves and SR content. All values are obviously fake.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.synth import make_study, make_study_spec

#: Values planted in attributes that the basic profile removes or replaces.
PLANTED = {
    "name": "DOE^JANE^SYNTH",
    "pid": "SYNPID00000003",
    "accession": "SYNACC-PLANT-7",
    "other_id": "OTHERID-PLANT-1",
    "address": "1 FAKE STREET NOWHERE",
    "phone": "555-0100-PLANT",
    "physician": "WHO^DOCTOR^SYNTH",
    "private_name": "PRIVATE^PLANTED^NAME",
    "overlay_comment": "OVERLAY NOTE FAKEPERSON",
    "curve_label": "CURVE FAKEPERSON",
    "sr_name": "OBSERVER^PLANTED",
    "unlisted": "SC MAKER FAKEPERSON",
    "unknown": "UNKNOWN TAG FAKEPERSON",
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _sr_content() -> Sequence:
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    text.TextValue = "Seen with DOE JANE, ref SYNACC-PLANT-7, no findings"
    person = Dataset()
    person.RelationshipType = "HAS OBS CONTEXT"
    person.ValueType = "PNAME"
    person.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    person.PersonName = PLANTED["sr_name"]
    date = Dataset()
    date.RelationshipType = "CONTAINS"
    date.ValueType = "DATE"
    date.ConceptNameCodeSequence = Sequence([_code("111060", "DCM", "Study Date")])
    date.Date = "20230101"
    container = Dataset()
    container.RelationshipType = "CONTAINS"
    container.ValueType = "CONTAINER"
    container.ContinuityOfContent = "SEPARATE"
    container.ConceptNameCodeSequence = Sequence([_code("121070", "DCM", "Findings")])
    container.ContentSequence = Sequence([text, date])
    return Sequence([person, container])


def phi_instances(n: int = 2, size: int = 4) -> list[Dataset]:
    """``n`` instances of one synthetic series (tiny pixels), the second referencing the first."""
    spec = make_study_spec(3)
    datasets = make_study(spec, size=size)[:n]
    for i, ds in enumerate(datasets):
        plant(ds)
        if i:
            ref = Dataset()
            ref.ReferencedSOPClassUID = datasets[0].SOPClassUID
            ref.ReferencedSOPInstanceUID = datasets[0].SOPInstanceUID
            ds.ReferencedImageSequence = Sequence([ref])
            src = Dataset()
            src.ReferencedSOPClassUID = datasets[0].SOPClassUID
            src.ReferencedSOPInstanceUID = datasets[0].SOPInstanceUID
            series = Dataset()
            series.SeriesInstanceUID = datasets[0].SeriesInstanceUID
            series.ReferencedInstanceSequence = Sequence([src])
            ds.ReferencedSeriesSequence = Sequence([series])
    return datasets


def plant(ds: Dataset) -> Dataset:
    """Add planted PHI to a synthetic instance (in place)."""
    ds.PatientName = PLANTED["name"]
    ds.PatientID = PLANTED["pid"]
    ds.ReferringPhysicianName = PLANTED["physician"]
    ds.AccessionNumber = PLANTED["accession"]
    ds.PatientAddress = PLANTED["address"]
    ds.PatientTelephoneNumbers = PLANTED["phone"]
    ds.PatientComments = "Patient DOE^JANE^SYNTH, called 5550100"
    ds.SeriesDescription = "t1 SYNPID00000003 DOE brain"
    ds.StudyDescription = "SYNTH BRAIN MRI RESEARCH"
    ds.ImageComments = "scanned for WHO^DOCTOR^SYNTH"
    ds.AcquisitionDateTime = "20230101080500.000000"
    ds.InstanceCreationDate = "20230101"
    ds.SecondaryCaptureDeviceManufacturer = PLANTED["unlisted"]
    ds.add_new(0x00389999, "LO", PLANTED["unknown"])
    ds.add_new(0x00080000, "UL", 1234)  # a retired group length
    other = Dataset()
    other.PatientID = PLANTED["other_id"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = "REQPROC-PLANT"
    request.ScheduledProcedureStepID = "SPS-PLANT"
    request.RequestedProcedureDescription = "MRI for DOE JANE"
    ds.RequestAttributesSequence = Sequence([request])
    ds.ContentSequence = _sr_content()
    # private: a safe Siemens block (one safe, one unsafe element) and an unknown vendor block
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x0019100C, "IS", "1000")  # safe: B value
    ds.add_new(0x00191099, "LO", PLANTED["private_name"])  # not in the safe table
    ds.add_new(0x00290010, "LO", "FAKE VENDOR PHI")
    ds.add_new(0x0029100C, "LO", PLANTED["private_name"])  # same low byte, other creator
    ds.add_new(0x00430010, "LO", "gems_parm_01")  # wrong case: not the safe creator
    ds.add_new(0x00431027, "SH", "CASEPLANT")
    # overlay group 6000 and curve group 5000
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff\x00")
    ds.add_new(0x60004000, "LT", PLANTED["overlay_comment"])
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50002500, "LO", PLANTED["curve_label"])
    return ds
