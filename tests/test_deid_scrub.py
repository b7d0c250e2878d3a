"""Clean Descriptors' scrubber cuts an instance's removed values in the forms the gate hunts.

Synthetic values only. Each case adds the values of elements a profile removes, as
:meth:`engine.deid.apply.Cleaner.collect` does, and cleans one text.
"""

from __future__ import annotations

import pytest
from pydicom.datadict import tag_for_keyword

from engine.deid.scrub import Scrubber

ADDRESS = tag_for_keyword("PatientAddress") or 0
INSTITUTION = tag_for_keyword("InstitutionName") or 0


def _scrubber() -> Scrubber:
    scrubber = Scrubber()
    scrubber.add("MÜLLER-LEE^JÜRGEN", "PN")
    scrubber.add("O'DONNELL^SIOBHAN", "PN")
    scrubber.add("19610203", "DA")
    scrubber.add("20240314101500.123", "DT")
    scrubber.add("12 Rosebud Lane, Springfield", "LO", ADDRESS)
    scrubber.add("KINGSBRIDGE ROYAL INFIRMARY", "LO", INSTITUTION)
    return scrubber


CASES = [
    ("MRT Mueller Juergen", "MRT * *"),
    ("MRT Muller", "MRT *"),
    ("Lee asleep", "* asleep"),
    ("ODonnell, O'Donnell", "*, *"),
    ("DOB 3rd February 1961", "DOB *"),
    ("born Feb 3rd, 1961", "born *"),
    ("DOB 1961-2-3 / 61-02-03", "DOB * / *"),
    ("FU 14.03.24 and 14 Mar 2024", "FU * and *"),
    ("from Rosebud Lane Springfield", "from * Lane *"),
    ("ext Kingsbridge Royal", "ext * Royal"),
    ("TR 4500 TE 120 slice 12", "TR 4500 TE 120 slice 12"),
    ("acc 1234567", "acc *"),
]


@pytest.mark.parametrize(("text", "cleaned"), CASES, ids=[c[0] for c in CASES])
def test_the_scrubber_cuts_the_forms_the_gate_hunts(text: str, cleaned: str) -> None:
    assert _scrubber().clean(text) == cleaned


def test_words_of_other_removed_texts_are_cut_whole_only() -> None:
    """Only addresses and institution names are cut word by word: a removed diagnosis does
    not take "Chest" out of every description."""
    scrubber = Scrubber()
    scrubber.add("Chest pain", "LO", tag_for_keyword("AdmittingDiagnosesDescription") or 0)
    assert scrubber.clean("CT Chest") == "CT Chest"
    assert scrubber.clean("for chest pain") == "for *"
