"""De-identification (PS3.15 Annex E): profiles as data, keyed pseudonyms, a fast file path;
verification and burned-in gates (verify, burned_in, pixels).

Public API::

    from engine.deid import Deidentifier, load_profile, load_secret
    profile = load_profile("basic", ["retain_longitudinal_modified_dates"], {"StudyID": "hash"})
    deid = Deidentifier(profile, load_secret("/etc/fiona/project.key"), project="lung")
    out_bytes = deid.deidentify_file(in_bytes)
"""

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)
from engine.deid.deidentifier import Deidentifier, Result
from engine.deid.keys import (
    DateShifter,
    HashPseudonyms,
    Pseudonym,
    PseudonymSource,
    SecretError,
    UidMapper,
    load_secret,
)
from engine.deid.profile import OPTIONS, Override, Profile, ProfileError, load_profile

__all__ = [
    "OPTIONS",
    "DateShifter",
    "Deidentifier",
    "HashPseudonyms",
    "Override",
    "Profile",
    "ProfileError",
    "Pseudonym",
    "PseudonymSource",
    "Result",
    "SecretError",
    "UidMapper",
    "load_profile",
    "load_secret",
]
