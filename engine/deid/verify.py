"""The verification gate: re-scan de-identified output for the study's original identifiers.

After de-identification every output instance is searched for the identifying values of the
*original* study (collected with :class:`IdentifyingValues`); any hit quarantines the file with
the element path in the reason. A hit is a :class:`Leak` (path and kind of value), never the
value itself, so reasons and logs carry no PHI.

What is hunted, and the rules that keep false positives down (all case-insensitive):

==================  =========================================================================
kind                values
==================  =========================================================================
patient_name        PatientName as written (``DOE^JANE``), ``DOE JANE``, ``JANE DOE``,
                    ``DOE, JANE``; its family and given name alone when >= 3 characters and
                    not a common particle or title (``VAN``, ``MRS``...), split on hyphens
                    and apostrophes and joined (``O'DONNELL``: ``DONNELL``, ``ODONNELL``);
                    all of them also as typed on another keyboard (:func:`spellings`:
                    ``MÜLLER`` as ``MUELLER``, ``MULLER``; ``MUELLER`` as ``MÜLLER``). Middle names,
                    prefixes and suffixes only as part of the whole name. Also
                    OtherPatientNames, PatientBirthName, PatientMotherBirthName (whole forms).
person_name         every other PN value of the original (physicians, operators, observers,
                    at any level), in its whole forms only (>= 5 characters).
patient_id          PatientID; other_patient_id: OtherPatientIDs and OtherPatientIDsSequence.
accession_number    AccessionNumber; study_id: StudyID; other_id: admission, requested
                    procedure and order numbers. IDs need >= 4 characters, >= 6 when all
                    digits; placeholders (``ANONYMOUS``, ``UNKNOWN``...) are ignored.
birth_date          PatientBirthDate as YYYYMMDD (also at the start of a DT) and as
                    YYYY-MM-DD, YYYY.MM.DD, YYYY/MM/DD, DD.MM.YYYY, DD/MM/YYYY, DD-MM-YYYY,
                    MM/DD/YYYY, and written (:func:`_written_dates`: two-digit years, no
                    leading zeros, YY-MM-DD, ordinal days, month names). Only full, valid
                    8-digit dates count. Forms other than YYYYMMDD match as whole tokens
                    (not after a digit or dot, not before a digit or a separator and digit),
                    so ``1.2.14.03.24.5`` is no date.
original_date       Study, Series, Acquisition and Content Date (and the date of
                    AcquisitionDateTime), rendered the same ways.
original_uid        every UI value at any level that is not a well-known UID of the
                    standard (pydicom's UID dictionary), except class, transfer syntax and
                    implementation UIDs (they name software, not people); >= 10 characters.
                    A UID matches when not preceded or followed by a digit, so a kept UID
                    with the original as prefix (``<uid>.1``) is a hit too.
institution         InstitutionName, InstitutionAddress (whole values, >= 4 characters,
                    and word by word: :func:`place_words`).
device_serial       DeviceSerialNumber (>= 4 characters).
patient_contact     Addresses, telephones and the like (whole values >= 6 characters, digit
                    runs; addresses also word by word).
==================  =========================================================================

Names, institution and address words made only of kept vocabulary (Manufacturer, model,
software versions, Code Meanings of standard coding schemes: :data:`STANDARD_SCHEMES`) are
not hunted; a local scheme's Code Meaning lends no words, nor one the basic profile removes.

Text tokens match on word boundaries (letters and digits); dates and UIDs on digit
boundaries. All values of a study are compiled into one regular expression (a prefix trie per
kind) so an instance costs one search over the concatenated text of its elements.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import re
import struct
import unicodedata
import zlib
from bisect import bisect_right
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from pydicom._uid_dict import UID_dictionary
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from engine.config.rulesets import rulesets_dir
from engine.deid.ops import Op
from engine.deid.profile import Profile, load_profile

__all__ = [
    "ByteLeak",
    "IdentifyingValues",
    "Leak",
    "LeakKind",
    "find_leaks",
    "find_leaks_in_bytes",
    "find_text_leaks",
    "leak_reason",
]


class LeakKind(StrEnum):
    """The kind of original value a leak matched (the one list of kinds)."""

    PATIENT_NAME = "patient_name"
    PERSON_NAME = "person_name"
    PATIENT_ID = "patient_id"
    OTHER_PATIENT_ID = "other_patient_id"
    ACCESSION_NUMBER = "accession_number"
    STUDY_ID = "study_id"
    OTHER_ID = "other_id"
    BIRTH_DATE = "birth_date"
    ORIGINAL_DATE = "original_date"
    ORIGINAL_UID = "original_uid"
    INSTITUTION = "institution"
    DEVICE_SERIAL = "device_serial"
    PATIENT_CONTACT = "patient_contact"


@dataclass(frozen=True)
class Leak:
    """An original identifying value found in an output element: where, and of what kind.

    ``path`` is like ``ReferencedStudySequence[0].(0009,1010)`` (keywords for public tags,
    ``(gggg,eeee)`` otherwise; file meta elements by keyword). Never holds the value.
    """

    path: str
    kind: str

    def __str__(self) -> str:
        return f"{self.path} ({self.kind})"


@dataclass(frozen=True)
class ByteLeak:
    """An original identifying value found by the bytes-level scan at byte ``offset``."""

    offset: int
    kind: str

    def __str__(self) -> str:
        return f"byte {self.offset} ({self.kind})"


def leak_reason(leaks: Iterable[Leak | ByteLeak], limit: int = 5) -> str:
    """A quarantine detail naming where leaks were found (paths and kinds, no values)."""
    items = list(leaks)
    text = "original identifying values found in " + ", ".join(str(x) for x in items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more"
    return text


# --------------------------------------------------------------------------- collection

#: Name parts never hunted alone: titles, particles and placeholders.
_NAME_STOP = frozenset((
    "MRS", "MISS", "PHD", "DDS", "III", "JNR", "SNR", "THE", "AND", "VON", "VAN", "DER",
    "DEN", "DEL", "DES", "LOS", "LAS", "UND", "UNKNOWN", "ANONYMOUS", "ANON", "PATIENT",
    "NONE", "NULL", "TEST", "ANONYMIZED", "ANONYMISED", "REMOVED", "DEIDENTIFIED",
))  # fmt: skip
#: Placeholder IDs never hunted.
_ID_STOP = frozenset((
    "ANONYMOUS", "ANON", "UNKNOWN", "NONE", "NULL", "TEST", "PATIENT", "UNDEFINED", "REMOVED",
    "ANONYMIZED", "ANONYMISED", "DEIDENTIFIED",  # fiona's own dummies (engine.deid.apply)
))  # fmt: skip

_PATIENT_NAMES = {"PatientName": True, "OtherPatientNames": False, "PatientBirthName": False}
_PATIENT_NAMES["PatientMotherBirthName"] = False
_IDS = {
    "PatientID": LeakKind.PATIENT_ID,
    "OtherPatientIDs": LeakKind.OTHER_PATIENT_ID,
    "AccessionNumber": LeakKind.ACCESSION_NUMBER,
    "StudyID": LeakKind.STUDY_ID,
    "AdmissionID": LeakKind.OTHER_ID,
    "RequestedProcedureID": LeakKind.OTHER_ID,
    "PlacerOrderNumberImagingServiceRequest": LeakKind.OTHER_ID,
    "FillerOrderNumberImagingServiceRequest": LeakKind.OTHER_ID,
    "DeviceSerialNumber": LeakKind.DEVICE_SERIAL,
    "InstitutionName": LeakKind.INSTITUTION,
    "InstitutionAddress": LeakKind.INSTITUTION,
    "InstitutionalDepartmentName": LeakKind.INSTITUTION,
}
#: Identity attributes hunted as whole values (>= :data:`_MIN_CONTACT` characters) and, when
#: they hold enough digits, as digit runs: where the patient and people close to them live and
#: are reached, and the like.
_CONTACTS = frozenset((
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "MilitaryRank",
    "BranchOfService", "MedicalRecordLocator", "RegionOfResidence", "ResponsibleOrganization",
    "PersonAddress", "PersonTelephoneNumbers", "PersonTelecomInformation",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "IssuerOfPatientID",
    "CountryOfResidence",
))  # fmt: skip
_MIN_CONTACT = 6
#: ID kinds also hunted as digit runs: the value's digits without separators, prefixes or
#: leading zeros, when at least :data:`_MIN_DIGITS` of them are left.
_DIGIT_KINDS = frozenset((
    LeakKind.PATIENT_ID, LeakKind.OTHER_PATIENT_ID, LeakKind.ACCESSION_NUMBER,
    LeakKind.OTHER_ID, LeakKind.PATIENT_CONTACT,
))  # fmt: skip
_MIN_DIGITS = 6
#: A run of digits with separators between them (``-``, ``.``, ``/``, space, ``_``, brackets).
_DIGIT_RUN = re.compile(r"[0-9](?:[-./ _()]*[0-9])*")
_DIGIT_RUN_BYTES = re.compile(rb"[0-9](?:[-./ _()]*[0-9])*")
#: Vocabulary kept on purpose (device words): a name, institution or address token made only
#: of such words, or of the words of a standard Code Meaning, never counts as a leak
#: (``SIEMENS`` as institution and manufacturer, ``WHITE`` as a family name and in "White
#: matter").
_VOCABULARY = frozenset(("Manufacturer", "ManufacturerModelName", "SoftwareVersions"))
#: Coding Scheme Designators of PS3.16 Table 8-1 (and their usual aliases) whose Code Meanings
#: are dictionary text. Any other scheme (``99...``, ``L``, ``LOCAL``, a RIS's own) is local:
#: its meanings are free text a site typed, and lend the gate no vocabulary.
STANDARD_SCHEMES = frozenset((
    "DCM", "SCT", "SRT", "SNM3", "LN", "UCUM", "RADLEX", "FMA", "NCIT", "MDC", "UMLS", "ACR",
    "I9", "I9C", "I10", "I10P", "ICD10", "ICD10PCS", "ICD10CM", "ICD9CM", "NICIP", "C4", "C5",
    "CD2", "HPC", "DC", "NEU", "UBERON", "MGI", "NCBI", "ITIS_TSN", "PUBCHEM_CID", "ISO639_1",
    "ISO639_2", "ISO3166_1", "RFC5646", "RFC3066", "UNS", "UPC", "ATC", "RXNORM", "DCMUID",
    "CHEBI", "HGNC", "NDC", "UNII", "SNOMED", "LOINC", "MSH", "MESH",
))  # fmt: skip
_NAME_KINDS = frozenset((
    LeakKind.PATIENT_NAME, LeakKind.PERSON_NAME, LeakKind.INSTITUTION, LeakKind.PATIENT_CONTACT,
))  # fmt: skip
_WORD = re.compile(r"[^\W_]+")
#: Letters NFKD does not take apart (ASCII folding beyond accents).
_FOLD = str.maketrans({
    "ø": "o", "Ø": "O", "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "đ": "d",
    "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "TH", "ð": "d", "Ð": "D", "ı": "i",
})  # fmt: skip
#: The languages whose month names the gate always knows (besides those configured).
BASE_DATE_LANGUAGES = ("en",)
_date_languages: tuple[str, ...] = BASE_DATE_LANGUAGES


@functools.cache
def month_names() -> dict[str, tuple[frozenset[str], ...]]:
    """``rulesets/anonymize/month_names.json``: per language code, the written forms of each
    month (January first): the name, its first 3 and 4 letters, and the listed forms."""
    doc = json.loads((rulesets_dir() / "anonymize" / "month_names.json").read_text("utf-8"))
    table: dict[str, tuple[frozenset[str], ...]] = {}
    for code, entry in doc["languages"].items():
        months = []
        for name, extra in zip(entry["months"], entry["forms"], strict=True):
            months.append(frozenset({name, name[:3], name[:4], *extra}))
        table[code] = tuple(months)
    return table


def set_date_languages(codes: Iterable[str]) -> None:
    """Search birth dates written with the month names of ``codes`` too (the site config's
    ``deidentification.date_languages``; English always); ValueError for an unknown code."""
    global _date_languages
    known = month_names()
    unknown = sorted(set(codes) - set(known))
    if unknown:
        raise ValueError(
            f"unknown date language {', '.join(unknown)}: choose from {', '.join(sorted(known))}"
        )
    _date_languages = tuple(dict.fromkeys([*BASE_DATE_LANGUAGES, *codes]))


def date_languages() -> tuple[str, ...]:
    """The languages whose month names the gate searches (see :func:`set_date_languages`)."""
    return _date_languages


def ascii_fold(text: str, drop: bool = False) -> str:
    """``text`` without accents and with letters like ``ø`` spelt in ASCII (``Sørensen`` ->
    ``Sorensen``); characters with no ASCII form are kept (``drop``: removed, which is fast
    enough for a whole header)."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_FOLD))
    if drop:
        return decomposed.encode("ascii", "ignore").decode("ascii")
    return "".join(c for c in decomposed if not unicodedata.combining(c))


#: Transliterations a person writes for a letter their keyboard lacks (``Müller`` as
#: ``Mueller``, ``Sørensen`` as ``Soerensen``), on upper-case text; and back (:func:`spellings`).
_SPELL_OUT = str.maketrans({
    "Ü": "UE", "Ö": "OE", "Ä": "AE", "Ø": "OE", "Å": "AA", "Æ": "AE", "ẞ": "SS", "ß": "SS",
})  # fmt: skip
_SPELL_IN = (
    (("UE", "Ü"), ("OE", "Ö"), ("AE", "Ä"), ("AA", "Å")),
    (("OE", "Ø"), ("AE", "Æ"), ("SS", "ß")),
)


def spellings(text: str) -> set[str]:
    """``text`` (upper-cased) as it is also written: ASCII-folded (``MULLER``), with umlauts
    and Nordic letters spelt out (``MUELLER``, ``SOERENSEN``, ``AASE``), and spelt back
    (``MUELLER`` -> ``MÜLLER``, ``SOERENSEN`` -> ``SØRENSEN``), so a name typed on another
    keyboard is still found."""
    upper = text.upper()
    out = {upper, upper.translate(_SPELL_OUT)}
    for table in _SPELL_IN:
        spelt = upper
        for plain, letter in table:
            spelt = spelt.replace(plain, letter)
        out.add(spelt)
    folded = {ascii_fold(v).upper() for v in out}
    return out | {f for f in folded if f.isascii()}


#: Words of an address or an institution's name that say what, not where or who: not hunted
#: alone (English, German, French, Spanish, Italian, Dutch, Nordic).
_PLACE_STOP = frozenset((
    "STREET", "ROAD", "LANE", "AVENUE", "DRIVE", "PLACE", "COURT", "SQUARE", "CLOSE", "HOUSE",
    "FLAT", "FLOOR", "SUITE", "BUILDING", "NORTH", "SOUTH", "EAST", "WEST", "UPPER", "LOWER",
    "GREAT", "LITTLE", "SAINT", "PARK", "HILL", "GROVE", "GARDENS", "TERRACE", "CRESCENT",
    "APARTMENT", "UNIT", "GATE", "WALK", "VIEW", "ROUTE", "HIGHWAY", "BOULEVARD", "MAIN",
    "HOSPITAL", "HOSPITALS", "ROYAL", "UNIVERSITY", "CLINIC", "CLINICS", "CLINICAL", "CENTER",
    "CENTRE", "MEDICAL", "MEDICINE", "HEALTH", "HEALTHCARE", "CARE", "GENERAL", "INFIRMARY",
    "COUNTY", "CITY", "DISTRICT", "REGIONAL", "REGION", "NATIONAL", "INSTITUTE", "FOUNDATION",
    "TRUST", "SERVICE", "SERVICES", "DEPARTMENT", "RADIOLOGY", "IMAGING", "DIAGNOSTIC",
    "DIAGNOSTICS", "CHILDREN", "CHILDRENS", "WOMEN", "WOMENS", "MEMORIAL", "COMMUNITY",
    "SCHOOL", "COLLEGE", "FACULTY", "TEACHING", "PRIVATE", "PRACTICE", "GROUP", "NETWORK",
    "SYSTEM", "PARTNERS", "ASSOCIATES", "LIMITED", "RESEARCH", "SCIENCE", "SCIENCES",
    "STRASSE", "STRAßE", "GASSE", "PLATZ", "ALLEE", "KLINIK", "KLINIKUM", "KLINIKEN",
    "UNIVERSITÄT", "UNIVERSITAT", "UNIVERSITAETS", "UNIVERSITÄTS", "KRANKENHAUS", "SPITAL",
    "ZENTRUM", "INSTITUT", "PRAXIS", "RADIOLOGIE", "ABTEILUNG", "HOPITAL", "HÔPITAL",
    "CLINIQUE", "HOSPITALIER", "UNIVERSITAIRE", "AVENIDA", "CALLE", "CLINICA",
    "CLÍNICA", "CENTRO", "HOSPITALARIO", "UNIVERSIDAD", "INSTITUTO", "OSPEDALE", "PIAZZA",
    "POLICLINICO", "AZIENDA", "UNIVERSITÀ", "ZIEKENHUIS", "STRAAT", "PLEIN", "GATAN", "VÄGEN",
    "VEIEN", "SYGEHUS", "SJUKHUS", "SYKEHUS", "SAIRAALA", "HOSPITALET", "UNIVERSITETS",
))  # fmt: skip
_MIN_PLACE_WORD = 4


def place_words(value: str) -> list[str]:
    """The distinctive words of an address or an institution's name (``Rosebud``,
    ``Springfield`` of "12 Rosebud Lane, Springfield"): letters only, at least 4 of them, not
    a generic word (:data:`_PLACE_STOP`) or a title or placeholder."""
    words = []
    for word in _WORD.findall(value):
        upper = word.upper()
        if len(word) < _MIN_PLACE_WORD or not word.isalpha():
            continue
        if upper in _PLACE_STOP or upper in _NAME_STOP or upper in _ID_STOP:
            continue
        words.append(word)
    return words


def name_words(component: str) -> list[str]:
    """The words of one name component as hunted alone (>= 3 characters, not a particle or
    title): split on spaces, commas, hyphens and apostrophes, and joined too (``O'DONNELL``
    -> ``DONNELL``, ``ODONNELL``; ``ROTHWELL-SMYTHE`` -> ``ROTHWELL``, ``SMYTHE``,
    ``ROTHWELLSMYTHE``)."""
    out: list[str] = []
    for chunk in re.split(r"[\s,]+", component.strip()):
        pieces = [p for p in _NAME_JOINS.split(chunk) if p]
        candidates = [*pieces, "".join(pieces)] if len(pieces) > 1 else pieces
        for word in candidates:
            if len(word) >= 3 and word.upper() not in _NAME_STOP and word not in out:
                out.append(word)
    return out


_NAME_JOINS = re.compile(r"[-'\u2019\u2018`\u00b4.]+")


def digit_run(text: str) -> str:
    """The digits of ``text`` in order, without leading zeros."""
    return "".join(c for c in text if c.isascii() and c.isdigit()).lstrip("0")


#: Addresses and institution names, also hunted word by word (:func:`place_words`).
_PLACES = {
    "PatientAddress": LeakKind.PATIENT_CONTACT,
    "PersonAddress": LeakKind.PATIENT_CONTACT,
    "ReferringPhysicianAddress": LeakKind.PATIENT_CONTACT,
    "InstitutionName": LeakKind.INSTITUTION,
    "InstitutionAddress": LeakKind.INSTITUTION,
}
_DATES = {
    "PatientBirthDate": LeakKind.BIRTH_DATE,
    "StudyDate": LeakKind.ORIGINAL_DATE,
    "SeriesDate": LeakKind.ORIGINAL_DATE,
    "AcquisitionDate": LeakKind.ORIGINAL_DATE,
    "ContentDate": LeakKind.ORIGINAL_DATE,
    "AcquisitionDateTime": LeakKind.ORIGINAL_DATE,
}
#: UI elements naming software or classes, not a patient's objects: never hunted.
KEPT_UID_KEYWORDS = frozenset((
    "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID",
    "PrivateInformationCreatorUID",
))  # fmt: skip
_MIN_UID = 10


def _date_forms(value: str) -> list[tuple[str, bool]]:
    """(rendering, is the compact YYYYMMDD form) of one DA value; [] unless a valid date."""
    text = value.strip()[:8]
    if len(text) != 8 or not text.isdigit():
        return []
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return []
    y, m, d = text[:4], text[4:6], text[6:]
    seps = [f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}"]
    seps += [f"{d}-{m}-{y}", f"{m}/{d}/{y}"]
    return [(text, True)] + [(s, False) for s in seps]


def _ordinal(day: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``... ``11th``, ``21st``."""
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _written_dates(value: str) -> list[str]:
    """More written forms of a date: two-digit years (``03.04.68``, ``04/03/68``,
    ``68-04-03``), no leading zeros (``3.4.1968``, ``1968-4-3``), ordinal days, and month
    names (``3 Apr 1968``, ``03-APR-68``, ``April 3, 1968``, ``3rd of April 1968``, ``Apr 3rd,
    1968``, ``3. april 1968``) in English and the :func:`date_languages`; [] unless a valid
    date."""
    if not _date_forms(value):
        return []
    return sorted(_spelt_dates(value.strip()[:8], _date_languages))


@functools.lru_cache(maxsize=256)
def _spelt_dates(text: str, languages: tuple[str, ...]) -> frozenset[str]:
    y, m, d = text[:4], text[4:6], text[6:]
    yy, mn, dn = y[2:], str(int(m)), str(int(d))
    forms = set()
    for sep in ".-/":
        forms |= {f"{d}{sep}{m}{sep}{yy}", f"{dn}{sep}{mn}{sep}{y}", f"{dn}{sep}{mn}{sep}{yy}"}
        forms |= {f"{y}{sep}{mn}{sep}{dn}", f"{yy}{sep}{m}{sep}{d}"}
    forms |= {f"{m}/{d}/{yy}", f"{mn}/{dn}/{y}", f"{mn}/{dn}/{yy}"}
    table = month_names()
    names = set().union(*(table[code][int(m) - 1] for code in languages))
    nth = _ordinal(int(d))
    for name in names:
        for day in {d, dn}:
            forms |= {f"{day} {name} {y}", f"{day}-{name}-{y}", f"{day}-{name}-{yy}"}
            forms |= {f"{day} {name} {yy}", f"{day}{name}{y}", f"{day}. {name} {y}"}
            forms |= {f"{day} {name}. {y}", f"{day}. {name}. {y}", f"{day} de {name} de {y}"}
            forms |= {f"{name} {day}, {y}", f"{name} {day} {y}", f"{day} {name}, {y}"}
            forms |= {f"{name}. {day}, {y}", f"{name}. {day} {y}"}
        forms |= {f"{nth} {name} {y}", f"{nth} {name}, {y}", f"{nth} of {name} {y}"}
        forms |= {f"{nth} of {name}, {y}", f"{name} {nth}, {y}", f"{name} {nth} {y}"}
        forms |= {f"{name}. {nth}, {y}", f"{nth} {name} {yy}", f"{nth} {name}. {y}"}
    return frozenset(forms)


def date_spellings(value: str) -> list[str]:
    """Every rendering of one DA (or the date of a DT) the gate hunts: compact, separated
    and written (:func:`_date_forms`, :func:`_written_dates`); [] unless a valid date. The
    scrubber cuts the same ones (:mod:`engine.deid.scrub`)."""
    return [form for form, _ in _date_forms(value)] + _written_dates(value)


def _name_forms(value: str) -> list[str]:
    """The whole-name renderings of one PN value, in each of its component groups
    (alphabetic, ideographic, phonetic): family and given name in either order, with a space,
    comma or caret between them, and, for names not written in ASCII, with nothing between
    them (``山田太郎``). At least 5 characters (3 for names not in ASCII)."""
    forms: set[str] = set()
    for group in value.split("="):
        group = group.strip()
        parts = [p.strip() for p in group.split("^")]
        forms.add(group.rstrip("^"))
        family, given = [*parts, "", ""][:2]
        if family and given:
            forms |= {f"{family}^{given}", f"{family} {given}", f"{given} {family}"}
            forms |= {f"{family}, {given}", f"{family},{given}"}
            if not group.isascii():
                forms |= {f"{family}{given}", f"{family}\u3000{given}"}
    return [f for f in forms if len(f) >= (5 if f.isascii() else 3)]


class IdentifyingValues:
    """The identifying values of one original study, to hunt for in its de-identified output.

    Build with :meth:`from_dataset` and :meth:`add` every instance of the study (values
    accumulate). ``repr`` shows only counts: the values themselves are PHI.
    """

    def __init__(self) -> None:
        # kind -> normalised (upper-case) tokens; dates keep apart compact and separated forms
        self._tokens: dict[LeakKind, set[str]] = {}
        self._compact_dates: dict[LeakKind, set[str]] = {}
        self._digits: dict[str, LeakKind] = {}  # digit run -> kind
        self._vocabulary: set[str] = set()  # upper-case words of kept device vocabulary
        self._meanings: set[frozenset[str]] = set()  # words of each standard Code Meaning
        self._name_words: set[str] = set()  # the patient's name words, upper-case
        self._encodings: set[tuple[str, ...]] = set()  # Python codecs of the study's charsets
        self._cache: dict[tuple[frozenset[str], frozenset[str]], _Matcher] = {}

    @classmethod
    def from_dataset(cls, original: Dataset) -> IdentifyingValues:
        """The values of one original instance (add the study's others with :meth:`add`)."""
        values = cls()
        values.add(original)
        return values

    @classmethod
    def from_datasets(cls, originals: Iterable[Dataset]) -> IdentifyingValues:
        """The values of all original instances of a study."""
        values = cls()
        for ds in originals:
            values.add(ds)
        return values

    def __repr__(self) -> str:
        counts = ", ".join(f"{k.value}={len(v)}" for k, v in sorted(self._tokens.items()))
        return f"IdentifyingValues({counts})"

    def __len__(self) -> int:
        return sum(len(v) for v in self._tokens.values())

    def kinds(self) -> set[str]:
        """The kinds of value collected (for tests and summaries)."""
        return {k.value for k, v in self._tokens.items() if v}

    @property
    def needs_decoding(self) -> bool:
        """Whether the study's character sets write text that a byte search in UTF-8 or
        latin-1 cannot find (ISO 2022, GB18030, Greek, Cyrillic...): search decoded text."""
        plain = {"iso8859", "latin_1", "utf_8", "ascii"}
        return any(set(codecs) - plain for codecs in self._encodings)

    def _put(self, kind: LeakKind, token: str) -> None:
        tokens = self._tokens.setdefault(kind, set())
        tokens.add(token.upper())
        folded = ascii_fold(token)
        if folded != token and folded.isascii():  # Latin letters only: kana keep their marks
            tokens.add(folded.upper())
        if kind in _NAME_KINDS and "\u3000" not in token:  # as typed on other keyboards
            tokens.update(t for t in spellings(token) if len(t) >= 3)
        self._cache.clear()

    def _put_digits(self, kind: LeakKind, value: str) -> None:
        digits = digit_run(value)
        if len(digits) >= _MIN_DIGITS and len(set(digits)) > 1:
            self._digits.setdefault(digits, kind)
            self._cache.clear()

    def add(self, ds: Dataset) -> None:
        """Collect the identifying values of one original instance (file meta too)."""
        charset = ds.get("SpecificCharacterSet")
        if charset:
            codes = [charset] if isinstance(charset, str) else [str(c) for c in charset]
            self._encodings.add(tuple(convert_encodings(codes)))
            self._cache.clear()
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            self._walk(meta)
        self._walk(ds)
        for item in ds.get("OtherPatientIDsSequence") or []:
            self._add_id(LeakKind.OTHER_PATIENT_ID, item.get("PatientID"))

    def _add_id(self, kind: LeakKind, value: object) -> None:
        for v in _strings(value):
            v = v.strip()
            minimum = 6 if v.isdigit() else 4
            if len(v) >= minimum and v.upper() not in _ID_STOP and len(set(v)) > 1:
                self._put(kind, v)
            if kind in _DIGIT_KINDS:
                self._put_digits(kind, v)

    def _add_contact(self, value: object) -> None:
        for v in _strings(value):
            v = v.strip()
            if len(v) >= _MIN_CONTACT and v.upper() not in _ID_STOP:
                self._put(LeakKind.PATIENT_CONTACT, v)
            self._put_digits(LeakKind.PATIENT_CONTACT, v)

    def _add_place(self, kind: LeakKind, value: object) -> None:
        """An address or institution word by word (:func:`place_words`): "Rosebud Lane
        Springfield" and "Kingsbridge" give the place away without the whole value."""
        for v in _strings(value):
            for word in place_words(v):
                self._put(kind, word)

    def _add_date(self, kind: LeakKind, value: object) -> None:
        """Every original date (birth, study, series, acquisition, content) in all its
        renderings: a date a person types is as telling as the birth date."""
        for v in _strings(value):
            for form, compact in _date_forms(v):
                self._put(kind, form)
                if compact:
                    self._compact_dates.setdefault(kind, set()).add(form)
            for form in _written_dates(v):
                self._put(kind, form)

    def _add_name(self, kind: LeakKind, value: object, parts: bool) -> None:
        for v in _strings(value):
            for form in _name_forms(v):
                if form.upper() not in _NAME_STOP and form.upper() not in _ID_STOP:
                    self._put(kind, form)
            if parts:
                groups = v.split("=")
                components = [p for g in groups for p in g.split("^")[:2]]
                for component in components:
                    for word in name_words(component):
                        self._put(kind, word)
                        self._name_words.update(spellings(word))

    def _walk(self, ds: Dataset, kept: bool = True) -> None:
        """Collect the values of ``ds`` and its items; ``kept``: whether ``ds`` is still in
        the output (as far as the basic profile tells, :func:`_kept`)."""
        for elem in ds:
            keyword = elem.keyword
            vr = elem.VR
            if vr == "SQ":
                inner = kept and _kept(int(elem.tag), "SQ")
                for item in elem.value or ():
                    self._walk(item, inner)
                continue
            if keyword in _PLACES:
                self._add_place(_PLACES[keyword], elem.value)
            if keyword in _PATIENT_NAMES:
                self._add_name(LeakKind.PATIENT_NAME, elem.value, _PATIENT_NAMES[keyword])
            elif vr == "PN":
                self._add_name(LeakKind.PERSON_NAME, elem.value, False)
            elif keyword in _IDS:
                self._add_id(_IDS[keyword], elem.value)
            elif keyword in _DATES:
                self._add_date(_DATES[keyword], elem.value)
            elif keyword in _CONTACTS:
                self._add_contact(elem.value)
            elif keyword in _VOCABULARY:
                for v in _strings(elem.value):
                    self._vocabulary.update(w.upper() for w in _WORD.findall(v))
                    self._cache.clear()
            elif keyword == "CodeMeaning":
                if kept and _kept(int(elem.tag), str(vr)):  # a removed one exempts nothing
                    self._add_meaning(ds, elem.value)
            elif vr == "UI" and keyword not in KEPT_UID_KEYWORDS and "ClassUID" not in keyword:
                for v in _strings(elem.value):
                    v = v.strip().rstrip("\x00")
                    if len(v) >= _MIN_UID and v not in UID_dictionary:
                        self._put(LeakKind.ORIGINAL_UID, v)

    def _add_meaning(self, item: Dataset, value: object) -> None:
        """Remember the words of a Code Meaning of a standard coding scheme (dictionary text
        the output keeps on purpose); a local scheme's meaning is free text and lends none."""
        scheme = item.get("CodingSchemeDesignator")
        if str(scheme or "").strip().upper() not in STANDARD_SCHEMES:
            return
        for v in _strings(value):
            self._meanings.add(frozenset(w.upper() for w in _WORD.findall(v)))
            self._cache.clear()

    def vocabulary(self) -> set[str]:
        """The words kept on purpose: device words, and the words of standard Code Meanings
        except those that carry two or more of the patient's name words (a RIS that labels
        its own codes with a standard designator)."""
        words = set(self._vocabulary)
        for meaning in self._meanings:
            if len(meaning & self._name_words) < 2:
                words |= meaning
        return words

    def absorb(self, other: IdentifyingValues, skip: Collection[LeakKind] = ()) -> bool:
        """Add ``other``'s values (those of another instance of the study), less the kinds in
        ``skip``; whether any was new. The compiled searches are dropped only then, so a study
        whose files share their values compiles once."""
        new = False
        for kind, tokens in other._tokens.items():
            mine = self._tokens.setdefault(kind, set())
            if kind not in skip and not tokens <= mine:
                mine |= tokens
                new = True
        for kind, dates in other._compact_dates.items():
            mine = self._compact_dates.setdefault(kind, set())
            if kind not in skip and not dates <= mine:
                mine |= dates
                new = True
        for run, kind in other._digits.items():
            if kind not in skip and run not in self._digits:
                self._digits[run] = kind
                new = True
        if not other._vocabulary <= self._vocabulary:
            self._vocabulary |= other._vocabulary
            new = True
        if not other._meanings <= self._meanings:
            self._meanings |= other._meanings
            new = True
        if not other._name_words <= self._name_words:  # a name word takes its meanings' words back
            self._name_words |= other._name_words
            new = True
        if not other._encodings <= self._encodings:
            self._encodings |= other._encodings
            new = True
        if new:
            self._cache.clear()
        return new

    def matcher(self, allow: Collection[str] = (), allow_kinds: Collection[str] = ()) -> _Matcher:
        """The compiled search for these values less the allowed ones (cached per allow set)."""
        key = (frozenset(a.upper() for a in allow), frozenset(str(k) for k in allow_kinds))
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _Matcher(self, *key)
        return found


@functools.cache
def _basic_profile() -> Profile:
    return load_profile("basic")


def _kept(tag: int, vr: str) -> bool:
    """Whether the basic profile keeps element ``tag`` (or walks its items): the Code
    Meanings of a sequence it removes lend the gate no vocabulary, so a name there does not
    exempt the same name elsewhere. A project that keeps more (an option, an override) only
    makes the gate stricter; private sequences count as removed."""
    if tag & 0x10000:
        return False
    profile = _basic_profile()
    op = profile.ops.get(tag)
    if op is None:
        op = profile.op(tag, vr)
    return op in (Op.KEEP, Op.RECURSE, Op.CLEAN)


def _strings(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple | MultiValue):
        return [str(v) for v in value if v is not None and str(v)]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    text = str(value)
    return [text] if text else []


# --------------------------------------------------------------------------- matching


_LEAD = {"word": "[A-Za-z0-9]", "digit": "[0-9]", "date": "[0-9.]"}
_TAIL = {
    "word": "(?![A-Za-z0-9])",
    "digit": "(?![0-9])",
    "date": "(?![-./]?[0-9])",
    "none": "",
}


_Node = dict[str, "_Node"]


def trie(words: dict[str, tuple[str, str]]) -> str:
    """A regular expression matching any of ``words`` (token -> (lead, tail) boundary kind:
    ``word``, ``digit``, ``date`` or ``none``), factored as a prefix trie.

    Boundaries are asserted at the end of each token (the leading one as a fixed-width
    lookbehind), so the expression starts with literal characters and the regex engine can
    skip positions that cannot start a token: one pass costs about as much as one token.
    """
    root: _Node = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: _Node, prefix: str) -> str:
        alternatives = []
        for ch, sub in sorted(node.items()):
            if not ch:
                continue
            run = ch  # a chain of single children is one literal
            while len(sub) == 1 and "" not in sub:
                ((more, sub),) = sub.items()
                run += more
            alternatives.append(re.escape(run) + emit(sub, prefix + run))
        if "" in node:  # a token ends here; longer tokens are tried first
            lead, tail = words[prefix]
            behind = "" if lead == "none" else f"(?<!{_LEAD[lead]}[\\s\\S]{{{len(prefix)}}})"
            alternatives.append(behind + _TAIL[tail])
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    return emit(root, "")


class _Matcher:
    """One compiled regular expression (str and bytes) over all tokens, and their kinds."""

    def __init__(
        self, values: IdentifyingValues, allow: frozenset[str], allow_kinds: frozenset[str]
    ) -> None:
        allowed = set(allow)
        for a in allow:  # an allowed date is allowed in every rendering
            allowed |= {form.upper() for form in date_spellings(a)}
        words: dict[str, tuple[str, str]] = {}
        self.kinds: dict[str, str] = {}
        vocabulary = values.vocabulary()
        for kind, tokens in sorted(values._tokens.items()):
            if kind.value in allow_kinds:
                continue
            compact = values._compact_dates.get(kind, set())
            for token in sorted(tokens - allowed):
                if token in words:
                    continue
                if kind in _NAME_KINDS and vocabulary and set(_WORD.findall(token)) <= vocabulary:
                    continue  # device or code words the output keeps on purpose
                if kind is LeakKind.ORIGINAL_UID:
                    words[token] = ("digit", "digit")
                elif kind in (LeakKind.BIRTH_DATE, LeakKind.ORIGINAL_DATE):
                    if token in compact:
                        words[token] = ("digit", "none")
                    else:  # a whole date: not inside a UID or version (1.2.14.03.24.5)
                        words[token] = ("date" if token[0].isdigit() else "word", "date")
                else:
                    words[token] = ("word", "word")
                self.kinds[token] = kind.value
        self.digits = {
            run: kind.value
            for run, kind in values._digits.items()
            if kind.value not in allow_kinds and run not in allowed
        }
        self.empty = not words and not self.digits
        self._pattern = trie(words) if words else "(?!)"
        # Bytes: each token in UTF-8 and latin-1; non-ASCII ones also in lower and title case
        # (IGNORECASE on bytes folds ASCII only). Built as latin-1 text, then encoded.
        byte_words: dict[str, tuple[str, str]] = {}
        self.byte_kinds: dict[bytes, str] = {}
        for token, bounds in words.items():
            cases = {token} if token.isascii() else {token, token.lower(), token.title()}
            for variant in cases:
                for raw in _encoded(variant, values._encodings):
                    byte_words[raw.decode("latin-1")] = bounds
                    self.byte_kinds[raw.upper()] = self.kinds[token]
        byte_pattern = trie(byte_words) if byte_words else "(?!)"
        self.bytes = re.compile(byte_pattern.encode("latin-1"), re.IGNORECASE)

    # The text searches are compiled when first used: the common check of a written file
    # needs only the bytes one, and compiling a study's expression costs milliseconds.

    @functools.cached_property
    def text(self) -> re.Pattern[str]:
        """The tokens in text, in any case."""
        return re.compile(self._pattern, re.IGNORECASE)

    @functools.cached_property
    def upper(self) -> re.Pattern[str]:
        """The tokens in upper-cased text: 4x faster than ``text``."""
        return re.compile(self._pattern)

    def kind(self, found: str) -> str:
        """The kind of the token ``found`` matched (case-insensitively)."""
        kind = self.kinds.get(found.upper())
        if kind is None:
            folded = found.casefold()
            kind = next((k for t, k in self.kinds.items() if t.casefold() == folded), "unknown")
        return kind

    def digit_kinds(self, text: str | bytes) -> list[str]:
        """The kinds of the ID digit runs found in ``text`` (any separators, prefixes or
        leading zeros around the digits), each once, in order."""
        if not self.digits:
            return []
        found: list[str] = []
        runs = (
            _DIGIT_RUN_BYTES.findall(text) if isinstance(text, bytes) else _DIGIT_RUN.findall(text)
        )
        for run in runs:
            if len(run) < _MIN_DIGITS:
                continue
            digits = digit_run(run.decode("ascii") if isinstance(run, bytes) else run)
            kind = self.digits.get(digits)
            if kind is not None and kind not in found:
                found.append(kind)
        return found

    def byte_kind(self, found: bytes) -> str:
        """The kind of the token the bytes ``found`` matched."""
        return self.byte_kinds.get(found.upper()) or self.kind(found.decode("utf-8", "replace"))


def _encoded(token: str, encodings: set[tuple[str, ...]]) -> set[bytes]:
    """``token`` as the bytes it can take in a file: UTF-8, latin-1 and the study's own
    Specific Character Sets (ISO 2022 escapes, GB18030, Greek...)."""
    out: set[bytes] = set()
    for encoding in ("utf-8", "latin-1"):
        try:
            out.add(token.encode(encoding))
        except UnicodeEncodeError:
            continue
    if not token.isascii():
        for codecs in encodings:
            try:
                raw = encode_string(token, list(codecs))
            except Exception:  # a token the charset cannot write: it cannot be in the file
                continue
            out.add(raw)
            if raw.startswith(b"\x1b"):  # ISO 2022: also without the leading escape
                out.add(raw[3:] if raw[1:3] != b"$(" else raw[4:])
    return {raw for raw in out if raw}


# --------------------------------------------------------------------------- dataset walk

#: Binary signal data skipped by the element walk: pixels (burned-in text is the other
#: gate's job), overlays and waveforms (random bytes would give false hits).
_SKIP_TAGS = frozenset([0x7FE00010, 0x7FE00008, 0x7FE00009, 0x54001010])
_NUMERIC_VRS = frozenset(["US", "UL", "SS", "SL", "FL", "FD", "AT", "UV", "SV", "OF", "OD", "OL"])
_SEP = "\n\x00\n"


def _tag_name(tag: BaseTag) -> str:
    if not tag.is_private:
        keyword = keyword_for_tag(tag)
        if keyword:
            return keyword
    return f"({tag.group:04X},{tag.element:04X})"


def _skipped(tag: int) -> bool:
    return tag in _SKIP_TAGS or (tag & 0xFF01FFFF) == 0x60003000  # (60xx,3000) OverlayData


def _raw_vr(elem: RawDataElement) -> str:
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return "UN"


def _texts(ds: Dataset, prefix: str, out: list[tuple[str, str]]) -> None:
    """(path, searchable text) of every element of ``ds``, recursively."""
    for tag in sorted(ds.keys()):
        if _skipped(tag):
            continue
        path = prefix + _tag_name(Tag(tag))
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            vr = _raw_vr(elem)
            value = elem.value
            if vr != "SQ" and isinstance(value, bytes):
                text = value.decode("latin-1")
                out.append((path, text))
                escaped = "\x1b" in text  # ISO 2022: 7-bit bytes that decode to other text
                if not text.isascii():
                    out.append((path, value.decode("utf-8", "ignore")))
                textual = vr not in _NUMERIC_VRS and vr not in ("OB", "OW", "UN")
                if (escaped or not text.isascii()) and textual:
                    out.append((path, _converted(ds, tag)))
                continue
            elem = ds[tag]
        _element_texts(elem, path, out)


def _converted(ds: Dataset, tag: int) -> str:
    try:
        return "\\".join(_strings(ds[tag].value))
    except Exception:  # undecodable in its character set: the raw forms were searched
        return ""


def _element_texts(elem: DataElement, path: str, out: list[tuple[str, str]]) -> None:
    value = elem.value
    if elem.VR == "SQ":
        for i, item in enumerate(value or []):
            _texts(item, f"{path}[{i}].", out)
        return
    if value is None or elem.VR in _NUMERIC_VRS:
        return
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1")
        out.append((path, text))
        if not text.isascii():
            out.append((path, bytes(value).decode("utf-8", "ignore")))
        return
    if isinstance(value, PersonName):
        out.append((path, str(value)))
        return
    out.append((path, "\\".join(_strings(value))))


def find_leaks(
    output: Dataset,
    values: IdentifyingValues,
    *,
    allow: Collection[str] = (),
    allow_kinds: Collection[str] = (),
) -> list[Leak]:
    """Every element of ``output`` holding one of the original ``values`` (one Leak per
    element and kind, in element order).

    Walks every element at every level: file meta, nested sequence items, private blocks;
    text VRs as text (in the dataset's character set when not ASCII), binary ones (OB, OW, UN
    and friends) decoded as latin-1 (and UTF-8) since private data often hides text. Pixel
    data (7FE0,0010) and the float pixel data, overlay data (60xx,3000) and waveform data
    (5400,1010) are skipped: burned-in text is :mod:`engine.deid.burned_in`'s job.

    ``allow``: values the project deliberately keeps (retained UIDs, kept dates; a date is
    allowed in all its renderings); ``allow_kinds``: kinds kept wholesale (``original_date``
    under a keep-dates option).
    """
    matcher = values.matcher(allow, allow_kinds)
    if matcher.empty:
        return []
    parts: list[tuple[str, str]] = []
    meta = getattr(output, "file_meta", None)
    if meta is not None:
        _texts(meta, "", parts)
    _texts(output, "", parts)
    return _search_parts(parts, matcher)


def find_text_leaks(
    parts: Iterable[tuple[str, str]],
    values: IdentifyingValues,
    *,
    allow: Collection[str] = (),
    allow_kinds: Collection[str] = (),
) -> list[Leak]:
    """Every ``(path, text)`` of ``parts`` holding one of the original ``values``, searched as
    :func:`find_leaks` searches a dataset's elements: for the text of files other than DICOM
    that leave with a study (a NIfTI sidecar's fields, with their JSON keys as paths)."""
    matcher = values.matcher(allow, allow_kinds)
    if matcher.empty:
        return []
    return _search_parts(list(parts), matcher)


def _search_parts(parts: list[tuple[str, str]], matcher: _Matcher) -> list[Leak]:
    """The leaks of ``(path, text)`` pairs: one search over their concatenated text."""
    parts += [(path, ascii_fold(text)) for path, text in parts if not text.isascii()]
    starts: list[int] = []
    chunks: list[str] = []
    pos = 0
    for _, text in parts:
        starts.append(pos)
        chunks.append(text)
        pos += len(text) + len(_SEP)
    haystack = _SEP.join(chunks)
    upper = haystack.upper()
    search = matcher.upper if len(upper) == len(haystack) else matcher.text
    if search is matcher.upper:
        haystack = upper
    seen: set[tuple[int, str]] = set()
    leaks: list[Leak] = []
    for index, (path, text) in enumerate(parts):
        for kind in matcher.digit_kinds(text):
            if (index, kind) not in seen:
                seen.add((index, kind))
                leaks.append(Leak(path, f"{kind}, digits"))
    for match in search.finditer(haystack):
        index = bisect_right(starts, match.start()) - 1
        kind = matcher.kind(match.group())
        if (index, kind) not in seen:
            seen.add((index, kind))
            leaks.append(Leak(parts[index][0], kind))
    out: list[Leak] = []
    for leak in leaks:  # the same element searched in two decodings: report it once
        if leak not in out:
            out.append(leak)
    return out


# --------------------------------------------------------------------------- bytes scan

_DEFLATED = b"1.2.840.10008.1.2.1.99"


def _pixel_span(data: bytes, start: int, implicit: bool, little: bool) -> tuple[int, int] | None:
    """(start, end) of the top-level Pixel Data element in ``data`` (dataset from ``start``)."""
    from pydicom.filereader import read_dataset

    fp = io.BytesIO(data)
    fp.seek(start)

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        return int(tag) == 0x7FE00010

    try:
        read_dataset(fp, implicit, little, stop_when=stop)
    except Exception:
        return None
    begin = fp.tell()
    order = "<" if little else ">"
    if len(data) < begin + 8:
        return None
    group, element = struct.unpack(order + "HH", data[begin : begin + 4])
    if (group, element) != (0x7FE0, 0x0010):
        return None
    if implicit:
        (length,) = struct.unpack(order + "L", data[begin + 4 : begin + 8])
        value = begin + 8
    else:
        (length,) = struct.unpack(order + "L", data[begin + 8 : begin + 12])
        value = begin + 12
    if length != 0xFFFFFFFF:
        return begin, min(len(data), value + length)
    pos = value  # encapsulated: items until the sequence delimiter
    while pos + 8 <= len(data):
        g, e, n = struct.unpack(order + "HHL", data[pos : pos + 8])
        pos += 8
        if (g, e) == (0xFFFE, 0xE0DD):
            return begin, pos
        pos += n
    return begin, len(data)


def _segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of ``data`` to scan: all but the top-level Pixel Data value."""
    if len(data) < 132 or data[128:132] != b"DICM":
        yield 0, data
        return
    pos = 132  # file meta: explicit VR little endian, group 0002 only
    syntax = b""
    while pos + 8 <= len(data):
        group, element = struct.unpack("<HH", data[pos : pos + 4])
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack("<L", data[pos + 8 : pos + 12])
            value = pos + 12
        else:
            (length,) = struct.unpack("<H", data[pos + 6 : pos + 8])
            value = pos + 8
        if element == 0x0010:
            syntax = data[value : value + length].rstrip(b"\x00 ")
        pos = value + length
    if syntax == _DEFLATED:
        yield 0, data[:pos]
        try:  # offsets past the file meta are in the inflated stream
            yield pos, zlib.decompress(data[pos:], -zlib.MAX_WBITS)
        except zlib.error:
            yield pos, data[pos:]
        return
    implicit = syntax == b"1.2.840.10008.1.2"
    little = syntax != b"1.2.840.10008.1.2.2"
    span = _pixel_span(data, pos, implicit, little)
    if span is None:
        yield 0, data
        return
    yield 0, data[: span[0]]
    yield span[1], data[span[1] :]


def find_leaks_in_bytes(
    data: bytes,
    values: IdentifyingValues,
    *,
    allow: Collection[str] = (),
    allow_kinds: Collection[str] = (),
) -> list[ByteLeak]:
    """Belt and braces: the original ``values`` anywhere in a Part 10 file's bytes.

    Scans everything but the top-level Pixel Data value (file meta, header, trailing
    elements), so it also sees what a parser would skip. A Deflated file is inflated first
    (offsets past the file meta then refer to the inflated stream). Text in other encodings
    than ASCII/UTF-8/latin-1 (UTF-16, say) is not seen. Large binary elements (overlays,
    waveforms) are scanned too, so a short name part may rarely match by chance there.
    """
    matcher = values.matcher(allow, allow_kinds)
    if matcher.empty:
        return []
    leaks: list[ByteLeak] = []
    for offset, chunk in _segments(data):
        for match in matcher.bytes.finditer(chunk):
            leaks.append(ByteLeak(offset + match.start(), matcher.byte_kind(match.group())))
    return leaks
