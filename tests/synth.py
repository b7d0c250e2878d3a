"""Synthetic DICOM study generator for tests and benchmarks.

Everything produced here is fake: names, identifiers, dates, devices and pixel
content are generated from a seed. No real person's data is ever involved and no
DICOM files are committed to the repository; tests write them to tmp dirs.

Usage from the repo root::

    from tests.synth import make_study_spec, make_study, write_study
    spec = make_study_spec(3)
    paths = write_study(make_study(spec), tmp_path / "study")

Command line::

    python -m tests.synth OUT_DIR [--studies N] [--size 64|512] [--seed S] [--files N]
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = [
    "BIDS_SERIES",
    "CT_SERIES",
    "MR_SERIES",
    "SeriesSpec",
    "StudySpec",
    "dataset_missing",
    "dataset_with_bad_uid",
    "default_series",
    "frame_of_reference_uid",
    "iter_series",
    "make_corpus",
    "make_series",
    "make_study",
    "make_study_spec",
    "series_uid",
    "study_uid",
    "write_dataset",
    "write_garbage",
    "write_study",
    "write_truncated",
    "write_truncated_pair",
]

IMPLEMENTATION_VERSION_NAME = "FIONA_SYNTH"

_LAST_NAMES = (
    "DOE", "ROE", "POE", "SYNTHETIC", "FAKE", "TESTPERSON", "EXAMPLE", "PLACEHOLDER",
    "MOCK", "DUMMY", "SAMPLE", "NOBODY", "PHANTOM", "FICTIVE", "MADEUP", "SIMULATED",
)  # fmt: skip
_FIRST_NAMES = (
    "JANE", "JOHN", "ALEX", "SAM", "KIM", "ROBIN", "CHRIS", "PAT",
    "LEE", "DANA", "JESSE", "TERRY", "CASEY", "JORDAN", "MORGAN", "TAYLOR",
)  # fmt: skip
_DESCRIPTIONS = (
    "SYNTH BRAIN MRI RESEARCH",
    "SYNTH HEAD PROTOCOL",
    "SYNTH NEURO STUDY",
    "SYNTH MRI BRAIN W/O CONTRAST",
)


# --------------------------------------------------------------------------- specs


@dataclass
class StudySpec:
    """Patient/study level values. All defaults are obviously fake."""

    seed: int = 0
    patient_name: str = "DOE^JANE^SYNTH"
    patient_id: str = "SYNPID00000000"
    birth_date: str = "19700101"
    sex: str = "F"
    patient_age: str = "050Y"
    patient_weight: float = 70.0
    accession_number: str = "SYNACC0000000"
    study_id: str = "SYN0"
    study_description: str = "SYNTH BRAIN MRI RESEARCH"
    study_date: str = "20230101"
    study_time: str = "080000"
    modalities: tuple[str, ...] = ("MR",)
    referring_physician: str = "WHO^DOCTOR^SYNTH"
    performing_physician: str = "NOBODY^RADIOLOGIST^SYNTH"
    operators_name: str = "TECH^SYNTH"
    institution_name: str = "SYNTHETIC GENERAL HOSPITAL"
    institution_address: str = "1 FAKE STREET, NOWHERE 00000"
    institutional_department: str = "SYNTH RADIOLOGY"
    station_name: str = "SYNSTATION0"
    device_serial_number: str = "SYN-SN-00000"
    manufacturer: str = "SYNTHETICA"
    manufacturer_model_name: str = "FAKESCAN 3T"
    software_versions: str = "SYNTH 1.0"
    magnetic_field_strength: float = 3.0
    body_part: str = "HEAD"
    patient_position: str = "HFS"
    uid_prefix: str = PYDICOM_ROOT_UID
    # Explicit UID override; derived deterministically from the spec when None.
    study_instance_uid: str | None = None

    def uid_key(self) -> str:
        """Entropy key for this study's UIDs (same spec -> same UIDs)."""
        return f"fiona-synth|{self.seed}|{self.patient_id}|{self.accession_number}"


@dataclass
class SeriesSpec:
    """One acquisition. Number of instances = n_slices * max(1, len(b_values)) * n_repeats."""

    name: str
    modality: str = "MR"
    series_description: str = ""
    protocol_name: str = ""
    sequence_name: str = ""
    scanning_sequence: tuple[str, ...] = ("GR",)
    sequence_variant: tuple[str, ...] = ("SP",)
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str = "2D"
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    flip_angle: float | None = None
    slice_thickness: float = 5.0
    spacing_between_slices: float = 5.0
    n_slices: int = 10
    n_repeats: int = 1  # temporal positions (fMRI)
    b_values: tuple[float, ...] = ()  # diffusion
    # Diffusion gradient direction of each b-value (0018,9089); empty: none written.
    gradient_directions: tuple[tuple[float, float, float], ...] = ()
    # Fieldmap: one magnitude volume per echo time (ms), then a phase-difference volume.
    echo_times: tuple[float, ...] = ()
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND")
    orientation: str = "AX"  # AX | SAG | COR | LOCALIZER (cycles SAG, COR, AX)
    fov_mm: float = 240.0
    size: int | None = None  # overrides make_study(size=...)
    window_center: float = 1200.0
    window_width: float = 2400.0
    contrast: float = 1.0  # pixel intensity scale, cosmetic
    frame_of_reference_key: str = "MR"
    # CT only
    kvp: float = 120.0
    convolution_kernel: str = "SYN_H30"
    xray_tube_current: int = 200
    rescale_intercept: float = -1024.0
    rescale_slope: float = 1.0

    @property
    def n_volumes(self) -> int:
        """Volumes per repeat: b-values, or a fieldmap's echoes and its phase image."""
        if self.echo_times:
            return len(self.echo_times) + 1
        return max(1, len(self.b_values))

    @property
    def n_instances(self) -> int:
        return self.n_slices * self.n_volumes * self.n_repeats


_MR_IT = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")

MR_SERIES: dict[str, SeriesSpec] = {
    "localizer": SeriesSpec(
        name="localizer", series_description="localizer", protocol_name="localizer",
        sequence_name="*fl2d1", scanning_sequence=("GR",), sequence_variant=("SP", "OSP"),
        echo_time=5.0, repetition_time=8.6, flip_angle=20.0, slice_thickness=7.0,
        spacing_between_slices=7.0, n_slices=3, orientation="LOCALIZER", fov_mm=250.0,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), contrast=0.8,
    ),
    "t1_mprage": SeriesSpec(
        name="t1_mprage", series_description="t1_mprage_sag_p2_iso",
        protocol_name="t1_mprage_sag_p2_iso", sequence_name="*tfl3d1_16ns",
        scanning_sequence=("GR", "IR"), sequence_variant=("SP", "MP"), scan_options=("IR",),
        mr_acquisition_type="3D", echo_time=2.98, repetition_time=2300.0,
        inversion_time=900.0, flip_angle=9.0, slice_thickness=1.0, spacing_between_slices=1.0,
        n_slices=16, orientation="SAG", fov_mm=256.0, image_type=_MR_IT, contrast=1.0,
    ),
    "t2_tse": SeriesSpec(
        name="t2_tse", series_description="t2_tse_tra", protocol_name="t2_tse_tra",
        sequence_name="*tse2d1_15", scanning_sequence=("SE",),
        sequence_variant=("SK", "SP", "OSP"), echo_time=95.0, repetition_time=6000.0,
        flip_angle=150.0, slice_thickness=4.0, spacing_between_slices=4.4, n_slices=12,
        orientation="AX", fov_mm=220.0, image_type=_MR_IT, contrast=1.3,
    ),
    "flair": SeriesSpec(
        name="flair", series_description="t2_tirm_tra_dark-fluid",
        protocol_name="t2_tirm_tra_dark-fluid", sequence_name="*tir2d1_16",
        scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP", "MP", "OSP"),
        scan_options=("IR",), echo_time=81.0, repetition_time=9000.0, inversion_time=2500.0,
        flip_angle=150.0, slice_thickness=4.0, spacing_between_slices=4.4, n_slices=12,
        orientation="AX", fov_mm=220.0, image_type=_MR_IT, contrast=0.9,
    ),
    "dwi": SeriesSpec(
        name="dwi", series_description="ep2d_diff_tra", protocol_name="ep2d_diff_tra",
        sequence_name="*ep_b", scanning_sequence=("EP",), sequence_variant=("SK", "SP"),
        echo_time=89.0, repetition_time=5000.0, flip_angle=90.0, slice_thickness=5.0,
        spacing_between_slices=5.0, n_slices=8, b_values=(0.0, 1000.0), orientation="AX",
        fov_mm=230.0, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"), contrast=0.7,
    ),
    "bold": SeriesSpec(
        name="bold", series_description="ep2d_bold_rest", protocol_name="ep2d_bold_rest",
        sequence_name="*epfid2d1_64", scanning_sequence=("EP",), sequence_variant=("SK",),
        echo_time=30.0, repetition_time=2000.0, flip_angle=90.0, slice_thickness=3.0,
        spacing_between_slices=3.0, n_slices=6, n_repeats=4, orientation="AX", fov_mm=192.0,
        image_type=("ORIGINAL", "PRIMARY", "FMRI", "NONE"), contrast=0.6,
    ),
}  # fmt: skip

#: Series a BIDS dataset needs beyond MR_SERIES (not in default_series): diffusion with
#: gradient directions, and a phase-difference fieldmap (two magnitude echoes and the phase).
BIDS_SERIES: dict[str, SeriesSpec] = {
    "dwi_dirs": SeriesSpec(
        name="dwi_dirs", series_description="ep2d_diff_mddw_6", protocol_name="ep2d_diff_mddw_6",
        sequence_name="*ep_b", scanning_sequence=("EP",), sequence_variant=("SK", "SP"),
        echo_time=89.0, repetition_time=5000.0, flip_angle=90.0, slice_thickness=5.0,
        spacing_between_slices=5.0, n_slices=6, b_values=(0.0, 1000.0, 1000.0, 1000.0),
        gradient_directions=((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
        orientation="AX", fov_mm=230.0, image_type=("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"),
        contrast=0.7,
    ),
    "fieldmap": SeriesSpec(
        name="fieldmap", series_description="gre_field_mapping",
        protocol_name="gre_field_mapping", sequence_name="*fm2d2r", scanning_sequence=("GR",),
        sequence_variant=("SP",), echo_time=4.92, echo_times=(4.92, 7.38),
        repetition_time=500.0, flip_angle=60.0, slice_thickness=3.0,
        spacing_between_slices=3.0, n_slices=6, orientation="AX", fov_mm=220.0,
        image_type=("ORIGINAL", "PRIMARY", "M", "ND"), contrast=0.8,
    ),
}  # fmt: skip

CT_SERIES: dict[str, SeriesSpec] = {
    "ct_head": SeriesSpec(
        name="ct_head", modality="CT", series_description="SYNTH HEAD 5mm",
        protocol_name="SYNTH HEAD ROUTINE", slice_thickness=5.0, spacing_between_slices=5.0,
        n_slices=10, orientation="AX", fov_mm=220.0, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        window_center=40.0, window_width=80.0, frame_of_reference_key="CT",
    ),
}  # fmt: skip


def default_series(modalities: Sequence[str] = ("MR",)) -> list[SeriesSpec]:
    """The realistic default series list for the given modality mix."""
    out: list[SeriesSpec] = []
    if "MR" in modalities:
        out.extend(MR_SERIES.values())
    if "CT" in modalities:
        out.extend(CT_SERIES.values())
    return out


def make_study_spec(seed: int, **overrides: object) -> StudySpec:
    """Deterministic, seed-varied fake StudySpec. Keyword overrides win.

    patient_id/accession_number always encode the seed, so they differ per seed;
    patient_name is unique for 0 <= seed < 256 (and seed 0 gives DOE^JANE^SYNTH).
    """
    if seed < 0:
        raise ValueError("seed must be >= 0")
    rng = np.random.default_rng([seed, 0x5EED])
    nl = len(_LAST_NAMES)
    last = _LAST_NAMES[seed % nl]
    first = _FIRST_NAMES[(seed // nl) % len(_FIRST_NAMES)]
    study_year = 2018 + int(rng.integers(0, 7))
    birth_year = 1940 + int(rng.integers(0, 60))
    birth_month, birth_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    study_month, study_day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    before_birthday = (study_month, study_day) < (birth_month, birth_day)
    age = study_year - birth_year - (1 if before_birthday else 0)
    hour, minute, sec = int(rng.integers(7, 19)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    values: dict[str, object] = {
        "seed": seed,
        "patient_name": f"{last}^{first}^SYNTH",
        "patient_id": f"SYNPID{seed:08d}",
        "birth_date": f"{birth_year:04d}{birth_month:02d}{birth_day:02d}",
        "sex": ("F", "M", "O")[int(rng.integers(0, 3))],
        "patient_age": f"{age:03d}Y",
        "patient_weight": float(int(rng.integers(45, 110))),
        "accession_number": f"SYNACC{seed:07d}",
        "study_id": f"SYN{seed}"[:16],
        "study_description": _DESCRIPTIONS[int(rng.integers(0, len(_DESCRIPTIONS)))],
        "study_date": f"{study_year:04d}{study_month:02d}{study_day:02d}",
        "study_time": f"{hour:02d}{minute:02d}{sec:02d}",
        "referring_physician": f"{_LAST_NAMES[(seed + 3) % nl]}^REFERRER^SYNTH",
        "station_name": f"SYNSTATION{int(rng.integers(0, 10))}",
        "device_serial_number": f"SYN-SN-{int(rng.integers(0, 100000)):05d}",
        "magnetic_field_strength": (1.5, 3.0)[int(rng.integers(0, 2))],
    }
    values["manufacturer_model_name"] = (
        "FAKESCAN 3T" if values["magnetic_field_strength"] == 3.0 else "FAKESCAN 1.5T"
    )
    values.update(overrides)
    return StudySpec(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- UIDs


def _uid(spec: StudySpec, *parts: object) -> str:
    return str(generate_uid(spec.uid_prefix, [spec.uid_key(), *(str(p) for p in parts)]))


def study_uid(spec: StudySpec) -> str:
    return spec.study_instance_uid or _uid(spec, "study")


def frame_of_reference_uid(spec: StudySpec, key: str = "MR") -> str:
    return _uid(spec, "for", key)


def series_uid(spec: StudySpec, series: SeriesSpec, series_number: int) -> str:
    return _uid(spec, "series", series_number, series.name)


# --------------------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=8)
def _phantom(size: int) -> np.ndarray:
    """Cheap head-like phantom in [0, ~1]: disc + gradient + inner disc."""
    ax = np.linspace(0.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(ax, ax, indexing="ij")
    r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
    img = (r2 < 0.42**2) * (0.45 + 0.25 * x + 0.15 * y) + (r2 < 0.18**2) * 0.15
    img.setflags(write=False)
    return img


def _pixels(
    spec: StudySpec, series: SeriesSpec, series_number: int, k: int, size: int, scale: float
) -> bytes:
    rng = np.random.default_rng([spec.seed, series_number, k])
    base = _phantom(size)
    if series.modality == "CT":
        # stored values (int16); HU = stored + intercept. Air ~ -1000 HU, brain ~ 40 HU.
        img = (base * (1064.0 / 0.6)).astype(np.int16)
        img += 24
        img += rng.integers(0, 16, size=(size, size), dtype=np.int16)
        return img.tobytes()
    img = (base * (2400.0 * series.contrast * scale)).astype(np.uint16)
    img += rng.integers(0, 64, size=(size, size), dtype=np.uint16)
    np.minimum(img, 4095, out=img)
    return img.tobytes()


# --------------------------------------------------------------------------- geometry

_ORIENT = {
    "AX": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "SAG": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "COR": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def _geometry(
    series: SeriesSpec, slice_index: int, size: int
) -> tuple[list[float], list[float], float, float]:
    """(ImagePositionPatient, ImageOrientationPatient, SliceLocation, pixel spacing)."""
    if series.orientation == "LOCALIZER":
        orient = ("SAG", "COR", "AX")[slice_index % 3]
        offset = 0.0
    else:
        orient = series.orientation
        offset = (slice_index - (series.n_slices - 1) / 2.0) * series.spacing_between_slices
    row, col = (np.array(v) for v in _ORIENT[orient])
    normal = np.cross(row, col)
    ps = series.fov_mm / size
    half = size * ps / 2.0
    ipp = -half * row - half * col + offset * normal
    iop = [*row.tolist(), *col.tolist()]
    return (
        [round(float(v), 4) + 0.0 for v in ipp],
        [float(v) + 0.0 for v in iop],
        round(float(np.dot(ipp, normal)), 4) + 0.0,
        round(ps, 6),
    )


def _add_seconds(hhmmss: str, seconds: float) -> str:
    total = int(hhmmss[0:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds
    total %= 86400
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


# --------------------------------------------------------------------------- datasets


def _instance(
    spec: StudySpec,
    series: SeriesSpec,
    series_number: int,
    k: int,
    size: int,
    series_instance_uid: str,
    study_instance_uid: str,
    for_uid: str,
) -> Dataset:
    nb = series.n_volumes
    slice_index = k % series.n_slices
    b_index = (k // series.n_slices) % nb
    rep = k // (series.n_slices * nb)
    is_ct = series.modality == "CT"
    sop_class = CTImageStorage if is_ct else MRImageStorage
    sop_uid = _uid(spec, "instance", series_number, series.name, k)

    ds = Dataset()
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta

    series_time = _add_seconds(spec.study_time, 300 * series_number)
    acq_time = _add_seconds(series_time, rep * (series.repetition_time or 1000.0) / 1000.0)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(series.image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.AcquisitionDate = spec.study_date
    ds.ContentDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.SeriesTime = series_time
    ds.AcquisitionTime = acq_time
    ds.ContentTime = acq_time
    ds.AccessionNumber = spec.accession_number
    ds.Modality = series.modality
    ds.Manufacturer = spec.manufacturer
    ds.InstitutionName = spec.institution_name
    ds.InstitutionAddress = spec.institution_address
    ds.ReferringPhysicianName = spec.referring_physician
    ds.StationName = spec.station_name
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = series.series_description or series.name
    ds.InstitutionalDepartmentName = spec.institutional_department
    ds.PerformingPhysicianName = spec.performing_physician
    ds.OperatorsName = spec.operators_name
    ds.ManufacturerModelName = spec.manufacturer_model_name

    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = spec.sex
    ds.PatientAge = spec.patient_age
    ds.PatientWeight = spec.patient_weight

    ds.BodyPartExamined = spec.body_part
    ds.SliceThickness = series.slice_thickness
    ds.DeviceSerialNumber = spec.device_serial_number
    ds.SoftwareVersions = spec.software_versions
    ds.ProtocolName = series.protocol_name or series.name
    ds.PatientPosition = spec.patient_position

    if is_ct:
        ds.KVP = series.kvp
        ds.DataCollectionDiameter = 500.0
        ds.ReconstructionDiameter = series.fov_mm
        ds.GantryDetectorTilt = 0.0
        ds.XRayTubeCurrent = series.xray_tube_current
        ds.ConvolutionKernel = series.convolution_kernel
        ds.SpacingBetweenSlices = series.spacing_between_slices
    else:
        ds.ScanningSequence = list(series.scanning_sequence)
        ds.SequenceVariant = list(series.sequence_variant)
        ds.ScanOptions = list(series.scan_options) if series.scan_options else ""
        ds.MRAcquisitionType = series.mr_acquisition_type
        seq_name = series.sequence_name
        if series.b_values and not series.gradient_directions:
            seq_name = f"{seq_name}{int(series.b_values[b_index])}"
        ds.SequenceName = seq_name
        ds.RepetitionTime = series.repetition_time
        ds.EchoTime = series.echo_time
        if series.echo_times:  # magnitude echoes, then the phase difference (at echo 2's TE)
            echo = min(b_index, len(series.echo_times) - 1)
            ds.EchoTime = series.echo_times[echo]
            ds.EchoNumbers = echo + 1
            if b_index == len(series.echo_times):
                ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]
        if series.inversion_time is not None:
            ds.InversionTime = series.inversion_time
        ds.NumberOfAverages = 1.0
        ds.ImagingFrequency = round(42.577478 * spec.magnetic_field_strength, 6)
        ds.ImagedNucleus = "1H"
        if not series.echo_times:
            ds.EchoNumbers = 1
        ds.MagneticFieldStrength = spec.magnetic_field_strength
        ds.SpacingBetweenSlices = series.spacing_between_slices
        ds.EchoTrainLength = 1
        ds.FlipAngle = series.flip_angle
        if series.b_values:
            b = series.b_values[b_index]
            ds.DiffusionBValue = b
            ds.DiffusionDirectionality = "ISOTROPIC" if b > 0 else "NONE"
            if series.gradient_directions:
                ds.DiffusionDirectionality = "DIRECTIONAL" if b > 0 else "NONE"
                ds.DiffusionGradientOrientation = list(series.gradient_directions[b_index])

    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = spec.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = rep + 1
    ds.InstanceNumber = k + 1
    ipp, iop, sl_loc, ps = _geometry(series, slice_index, size)
    ds.ImagePositionPatient = ipp
    ds.ImageOrientationPatient = iop
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    if series.n_repeats > 1:
        ds.TemporalPositionIdentifier = rep + 1
        ds.NumberOfTemporalPositions = series.n_repeats
    ds.SliceLocation = sl_loc

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.PixelSpacing = [ps, ps]
    ds.BitsAllocated = 16
    if is_ct:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = series.window_center
        ds.WindowWidth = series.window_width
        ds.RescaleIntercept = series.rescale_intercept
        ds.RescaleSlope = series.rescale_slope
        ds.RescaleType = "HU"
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = series.window_center
        ds.WindowWidth = series.window_width

    scale = 1.0 - 0.02 * abs(slice_index - series.n_slices / 2.0)
    if series.b_values and series.b_values[b_index] > 0:
        scale *= 0.35
    ds.PixelData = _pixels(spec, series, series_number, k, size, scale)
    ds["PixelData"].VR = "OW"
    return ds


def iter_series(
    spec: StudySpec, series: SeriesSpec, series_number: int, *, size: int = 64
) -> Iterator[Dataset]:
    """Lazily yield the instances of one series (memory-friendly for big corpora)."""
    size = series.size or size
    if size <= 0:
        raise ValueError("size must be positive")
    s_uid = series_uid(spec, series, series_number)
    st_uid = study_uid(spec)
    for_uid = frame_of_reference_uid(spec, series.frame_of_reference_key)
    for k in range(series.n_instances):
        yield _instance(spec, series, series_number, k, size, s_uid, st_uid, for_uid)


def make_series(
    spec: StudySpec, series: SeriesSpec, series_number: int = 1, *, size: int = 64
) -> list[Dataset]:
    """All instances of one series; UIDs consistent with make_study for the same spec."""
    return list(iter_series(spec, series, series_number, size=size))


def make_study(
    spec: StudySpec, series: list[SeriesSpec] | None = None, *, size: int = 64
) -> list[Dataset]:
    """A whole study. SeriesNumber = position in `series` (1-based)."""
    chosen = default_series(spec.modalities) if series is None else series
    out: list[Dataset] = []
    for i, s in enumerate(chosen, start=1):
        out.extend(iter_series(spec, s, i, size=size))
    return out


# --------------------------------------------------------------------------- writing


def write_dataset(ds: Dataset, path: Path, *, enforce_file_format: bool = True) -> Path:
    """Write one dataset (creating parents), tolerating deliberately invalid values."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.save_as(path, enforce_file_format=enforce_file_format)
    return path


def write_study(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write as out_dir/<series_index>/<InstanceNumber>.dcm.

    series_index is the 1-based order in which each SeriesInstanceUID first appears.
    """
    out_dir = Path(out_dir)
    index: dict[str, int] = {}
    paths: list[Path] = []
    for ds in datasets:
        s_idx = index.setdefault(str(ds.SeriesInstanceUID), len(index) + 1)
        paths.append(write_dataset(ds, out_dir / str(s_idx) / f"{int(ds.InstanceNumber)}.dcm"))
    return paths


_CORPUS_SERIES_LEN = 50
_CORPUS_SERIES_PER_STUDY = 4


def make_corpus(
    out_dir: Path, n_files: int, size: int, seed: int = 0, *, modality: str = "MR"
) -> list[Path]:
    """n_files single-modality instances of size x size, written incrementally as
    out_dir/study<NNN>/<series_index>/<instance>.dcm (<=50 per series, <=4 series per
    study; study k uses make_study_spec(seed + k))."""
    if modality not in ("MR", "CT"):
        raise ValueError("modality must be 'MR' or 'CT'")
    template = MR_SERIES["t1_mprage"] if modality == "MR" else CT_SERIES["ct_head"]
    out_dir = Path(out_dir)
    paths: list[Path] = []
    remaining = n_files
    study_k = 0
    while remaining > 0:
        spec = make_study_spec(seed + study_k)
        study_dir = out_dir / f"study{study_k:03d}"
        for s_idx in range(1, _CORPUS_SERIES_PER_STUDY + 1):
            if remaining <= 0:
                break
            n = min(_CORPUS_SERIES_LEN, remaining)
            s = replace(template, name=f"{template.name}_{s_idx}", n_slices=n, size=size)
            for ds in iter_series(spec, s, s_idx, size=size):
                paths.append(write_dataset(ds, study_dir / str(s_idx) / f"{ds.InstanceNumber}.dcm"))
            remaining -= n
        study_k += 1
    return paths


# --------------------------------------------------------------------------- bad input


def write_garbage(path: Path, n_bytes: int = 4096, seed: int = 0) -> Path:
    """Random non-DICOM bytes (never has 'DICM' at offset 128)."""
    data = bytearray(np.random.default_rng([seed, 0xBAD]).bytes(n_bytes))
    if len(data) >= 132 and data[128:132] == b"DICM":
        data[128] = ord("X")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _pixel_value_offset(data: bytes) -> tuple[int, int]:
    """(offset of Pixel Data value, its length) in an Explicit VR LE file."""
    for vr in (b"OW", b"OB"):
        idx = data.rfind(b"\xe0\x7f\x10\x00" + vr + b"\x00\x00")
        if idx >= 0:
            length = int.from_bytes(data[idx + 8 : idx + 12], "little")
            return idx + 12, length
    raise ValueError("no Pixel Data element found")


def _pydicom_fails(data: bytes) -> bool:
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pydicom.dcmread(io.BytesIO(data))
    except Exception:
        return True
    return False


def write_truncated(
    src: Path, dst: Path, keep_fraction: float = 0.5, *, where: str = "pixels"
) -> Path:
    """Copy src to dst cut short.

    where="pixels": cut inside the Pixel Data value, keeping keep_fraction of it
    (always at least 1 byte kept and 1 byte lost). pydicom.dcmread still succeeds;
    decoding pixels / size checks fail.
    where="header": cut at keep_fraction of the bytes before Pixel Data if
    pydicom.dcmread raises there; pydicom is lenient about most such cuts, so
    otherwise the cut is moved into the File Meta header (mid length field of
    (0002,0001)), where dcmread is guaranteed to raise. dcmtk also rejects it.
    where="header_partial": cut at keep_fraction of the bytes before Pixel Data, no
    guarantee: pydicom usually returns a partial dataset (no PixelData, maybe no UIDs).
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError("keep_fraction must be within [0, 1]")
    data = Path(src).read_bytes()
    value_off, length = _pixel_value_offset(data)
    if where == "pixels":
        if length < 2:
            raise ValueError("pixel data too short to truncate")
        cut = value_off + min(max(int(length * keep_fraction), 1), length - 1)
    elif where in ("header", "header_partial"):
        cut = min(int((value_off - 12) * keep_fraction), value_off - 13)
        if where == "header" and not _pydicom_fails(data[:cut]):
            version = data.find(b"\x02\x00\x01\x00OB\x00\x00", 132)
            cut = version + 10 if version >= 0 else 64  # 64: inside the preamble
    else:
        raise ValueError("where must be 'pixels', 'header' or 'header_partial'")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:cut])
    return dst


def write_truncated_pair(src: Path, out_dir: Path, keep_fraction: float = 0.5) -> tuple[Path, Path]:
    """(pixel-truncated, header-truncated) copies of src in out_dir."""
    out_dir = Path(out_dir)
    return (
        write_truncated(src, out_dir / "truncated_pixels.dcm", keep_fraction, where="pixels"),
        write_truncated(src, out_dir / "truncated_header.dcm", keep_fraction, where="header"),
    )


def dataset_with_bad_uid(
    ds: Dataset, which: str = "SOPInstanceUID", value: str = "1.2.3.abc/../../etc"
) -> Dataset:
    """Deep copy with a malformed UID (default: a path-traversal attempt).

    For SOPInstanceUID/SOPClassUID the matching file-meta UID is changed too, so the
    file stays self-consistent. Write it with write_dataset() (silences pydicom's
    validation warnings).
    """
    bad = copy.deepcopy(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        setattr(bad, which, value)
        meta = getattr(bad, "file_meta", None)
        if meta is not None:
            if which == "SOPInstanceUID":
                meta.MediaStorageSOPInstanceUID = value
            elif which == "SOPClassUID":
                meta.MediaStorageSOPClassUID = value
    return bad


def dataset_missing(ds: Dataset, keyword: str) -> Dataset:
    """Deep copy without `keyword` (looked up in the dataset, else the file meta)."""
    out = copy.deepcopy(ds)
    if keyword in out:
        delattr(out, keyword)
    elif getattr(out, "file_meta", None) is not None and keyword in out.file_meta:
        delattr(out.file_meta, keyword)
    else:
        raise KeyError(keyword)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.synth", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--studies", type=int, default=1, help="number of default studies")
    p.add_argument("--size", type=int, default=64, choices=(64, 512))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=None, help="benchmark corpus of N MR files")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    paths: list[Path] = []
    if args.files is not None:
        paths = make_corpus(args.out_dir, args.files, args.size, args.seed)
    else:
        for i in range(args.studies):
            spec = make_study_spec(args.seed + i)
            paths += write_study(make_study(spec, size=args.size), args.out_dir / f"study{i:03d}")
    total = sum(pth.stat().st_size for pth in paths)
    print(
        f"wrote {len(paths)} files ({total / 1e6:.1f} MB, size {args.size}, seed {args.seed}) "
        f"to {args.out_dir} in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
