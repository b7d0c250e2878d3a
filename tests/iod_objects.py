"""Synthetic objects of ten IODs, as valid as dciodvfy (dicom3tools) lets them be, for the test
that de-identified outputs stay valid (tests/test_deid_iod.py). All values are fake; the
identifying ones are the planted values of tests/deid_phi.py.

:func:`iod_objects` gives one Dataset per kind: MR, CT (tests/synth.py), Enhanced MR
(multi-frame), SEG, Basic Text SR, Comprehensive SR, GSPS, Secondary Capture, US and
Encapsulated PDF. The Type 1 and 2 attributes that the basic profile removes or empties are
filled on purpose (Segment Label, Stack ID, Content Sequence, Verifying Observer, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.deid_phi import PLANTED
from tests.synth import default_series, make_study, make_study_spec

_ROOT = "1.2.826.0.1.3680043.8.498.7."
STUDY = generate_uid(_ROOT, ["iod-study"])
FRAME_OF_REFERENCE = generate_uid(_ROOT, ["iod-for"])

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def _uid(*parts: str) -> str:
    return str(generate_uid(_ROOT, list(parts)))


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _base(kind: str, sop_class: str, modality: str) -> Dataset:
    """Patient, General Study, General Series, General Equipment and SOP Common modules."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid(kind, "instance")
    ds.PatientName = PLANTED["name"]
    ds.PatientID = PLANTED["pid"]
    ds.PatientBirthDate = "19680403"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = STUDY
    ds.StudyDate = "20230101"
    ds.StudyTime = "101010"
    ds.ReferringPhysicianName = PLANTED["physician"]
    ds.StudyID = "SYNSTUDY1"
    ds.AccessionNumber = PLANTED["accession"]
    ds.StudyDescription = "SYNTH STUDY"
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(kind, "series")
    ds.SeriesNumber = 1
    ds.SeriesDate = "20230101"
    ds.SeriesTime = "101010"
    ds.SeriesDescription = f"SYNTH {kind}"
    ds.Laterality = ""
    ds.InstanceNumber = 1
    ds.ContentDate = "20230101"
    ds.ContentTime = "101010"
    ds.Manufacturer = "FAKEVENDOR"
    ds.InstitutionName = "FAKE HOSPITAL"
    ds.StationName = "SYNSTATION1"
    ds.ManufacturerModelName = "FAKESCAN"
    ds.DeviceSerialNumber = "SYN-SN-00001"
    ds.SoftwareVersions = "1.0"
    return ds


def _mpps() -> Sequence:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.3"
    item.ReferencedSOPInstanceUID = _uid("mpps")
    return Sequence([item])


def _image(ds: Dataset, rows: int = 8, cols: int = 8, frames: int = 1) -> None:
    """Image Pixel module: unsigned 16-bit monochrome, ``frames`` frames."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    pixels = (np.arange(rows * cols * frames, dtype=np.uint16) % 4096).tobytes()
    ds.PixelData = pixels


def _plane(ds: Dataset) -> None:
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    ds.PositionReferenceIndicator = ""


def _mr() -> Dataset:
    return make_study(make_study_spec(0), default_series(("MR",))[:1], size=8)[0]


def _ct() -> Dataset:
    return make_study(make_study_spec(0), default_series(("CT",))[:1], size=8)[0]


def _enhanced_mr() -> Dataset:
    ds = _base("emr", ENHANCED_MR, "MR")
    _plane(ds)
    _image(ds, frames=2)
    ds.NumberOfFrames = 2
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = "20230101101010"
    ds.AcquisitionDuration = 1.0
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = 3.0
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "SYNTH"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.PixelPresentation = "MONOCHROME"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20230101", "101010"
    ds.ReferencedPerformedProcedureStepSequence = _mpps()
    ds.DimensionOrganizationType = "3D"
    org = Dataset()
    org.DimensionOrganizationUID = _uid("emr", "dim")
    ds.DimensionOrganizationSequence = Sequence([org])
    index = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):
        item = Dataset()
        item.DimensionOrganizationUID = org.DimensionOrganizationUID
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        index.append(item)
    ds.DimensionIndexSequence = Sequence(index)
    ds.AcquisitionContextSequence = Sequence()
    ds.SharedFunctionalGroupsSequence = Sequence([_mr_shared()])
    ds.PerFrameFunctionalGroupsSequence = Sequence([_mr_frame(k) for k in range(2)])
    ds.PatientPosition = "HFS"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    del ds.Laterality  # 2C: not a paired body part
    for kw, value in (
        ("PulseSequenceName", "SYNTHSE"), ("MRAcquisitionType", "2D"),
        ("EchoPulseSequence", "SPIN"), ("MultipleSpinEcho", "NO"),
        ("MultiPlanarExcitation", "NO"), ("PhaseContrast", "NO"),
        ("TimeOfFlightContrast", "NO"), ("SteadyStatePulseSequence", "NONE"),
        ("EchoPlanarPulseSequence", "NO"), ("SaturationRecovery", "NO"),
        ("SpectrallySelectedSuppression", "NONE"), ("OversamplingPhase", "NONE"),
        ("GeometryOfKSpaceTraversal", "RECTILINEAR"), ("SegmentedKSpaceTraversal", "SINGLE"),
        ("NumberOfKSpaceTrajectories", 1),
    ):  # fmt: skip
        setattr(ds, kw, value)
    return ds


def _mr_shared() -> Dataset:
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [1.0, 1.0]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = Sequence([orient])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    for kw, value in (
        ("PixelPresentation", "MONOCHROME"), ("VolumetricProperties", "VOLUME"),
        ("VolumeBasedCalculationTechnique", "NONE"), ("ComplexImageComponent", "MAGNITUDE"),
        ("AcquisitionContrast", "T1"),
    ):  # fmt: skip
        setattr(frame_type, kw, value)
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = 500.0, 90.0
    timing.EchoTrainLength = timing.RFEchoTrainLength = timing.GradientEchoTrainLength = 1
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.1
    timing.SpecificAbsorptionRateSequence = Sequence([sar])
    mode = Dataset()
    mode.OperatingModeType = "STATIC FIELD"
    mode.OperatingMode = "IEC_NORMAL"
    timing.OperatingModeSequence = Sequence([mode])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    coil = Dataset()
    coil.TransmitCoilName = "BODY"
    coil.TransmitCoilManufacturerName = "FAKEVENDOR"
    coil.TransmitCoilType = "BODY"
    shared.MRTransmitCoilSequence = Sequence([coil])
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([code("12738006", "SCT", "Brain")])
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = Sequence([anatomy])
    modifier = Dataset()
    modifier.InversionRecovery = modifier.FlowCompensation = "NO"
    modifier.FlowCompensation = "NONE"
    modifier.T2Preparation = modifier.SpectrallySelectedExcitation = "NO"
    modifier.SpectrallySelectedExcitation = "NONE"
    modifier.SpatialPresaturation = "NONE"
    modifier.PartialFourier = "NO"
    modifier.ParallelAcquisition = "NO"
    shared.MRModifierSequence = Sequence([modifier])
    imaging = Dataset()
    imaging.MagnetizationTransfer = "NONE"
    imaging.BloodSignalNulling = "NO"
    imaging.Tagging = "NONE"
    imaging.TransmitterFrequency = 123.0
    imaging.PixelBandwidth = 200.0
    shared.MRImagingModifierSequence = Sequence([imaging])
    receive = Dataset()
    receive.ReceiveCoilName = "HEAD"
    receive.ReceiveCoilManufacturerName = "FAKEVENDOR"
    receive.ReceiveCoilType = "VOLUME"
    receive.QuadratureReceiveCoil = "YES"
    shared.MRReceiveCoilSequence = Sequence([receive])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = 8
    fov.MRAcquisitionPhaseEncodingStepsInPlane = 8
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    shared.MRFOVGeometrySequence = Sequence([fov])
    averages = Dataset()
    averages.NumberOfAverages = 1.0
    shared.MRAveragesSequence = Sequence([averages])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 2048.0, 4096.0
    shared.FrameVOILUTSequence = Sequence([voi])
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = 0.0, 1.0, "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    return shared


def _mr_frame(k: int) -> Dataset:
    frame = Dataset()
    content = Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = k + 1
    content.DimensionIndexValues = [1, k + 1]
    content.FrameAcquisitionDateTime = "20230101101010"
    content.FrameReferenceDateTime = "20230101101010"
    content.FrameAcquisitionDuration = 1.0
    frame.FrameContentSequence = Sequence([content])
    position = Dataset()
    position.ImagePositionPatient = [0.0, 0.0, float(k)]
    frame.PlanePositionSequence = Sequence([position])
    echo = Dataset()
    echo.EffectiveEchoTime = 10.0
    frame.MREchoSequence = Sequence([echo])
    return frame


def _seg() -> Dataset:
    ds = _base("seg", SEGMENTATION, "SEG")
    _plane(ds)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.PixelData = bytes([0x0F]) * 8
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel = "SYNTHSEG"
    ds.ContentDescription = "LIVER BY FAKEPERSON"
    ds.ContentCreatorName = PLANTED["physician"]
    ds.SegmentationType = "BINARY"
    del ds.Laterality  # 2C: not a paired body part
    ds.LossyImageCompression = "00"
    ds.ReferencedPerformedProcedureStepSequence = _mpps()
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = "LIVER"
    segment.SegmentAlgorithmType = "AUTOMATIC"
    segment.SegmentAlgorithmName = "FAKEALGO"
    segment.SegmentedPropertyCategoryCodeSequence = Sequence(
        [code("91723000", "SCT", "Anatomical Structure")]
    )
    segment.SegmentedPropertyTypeCodeSequence = Sequence([code("10200004", "SCT", "Liver")])
    family = Dataset()
    family.AlgorithmFamilyCodeSequence = Sequence([code("123109", "DCM", "Manual Processing")])
    family.AlgorithmName = "FAKEALGO"
    family.AlgorithmVersion = "1"
    segment.SegmentationAlgorithmIdentificationSequence = Sequence([family])
    ds.SegmentSequence = Sequence([segment])
    org = Dataset()
    org.DimensionOrganizationUID = _uid("seg", "dim")
    ds.DimensionOrganizationSequence = Sequence([org])
    dims = []
    for pointer, group in ((0x0062000B, 0x0062000A), (0x00200032, 0x00209113)):
        item = Dataset()
        item.DimensionOrganizationUID = org.DimensionOrganizationUID
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        dims.append(item)
    ds.DimensionIndexSequence = Sequence(dims)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [1.0, 1.0]
    measures.SliceThickness = 1.0
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frame = Dataset()
    content = Dataset()
    content.DimensionIndexValues = [1, 1]
    frame.FrameContentSequence = Sequence([content])
    position = Dataset()
    position.ImagePositionPatient = [0.0, 0.0, 0.0]
    frame.PlanePositionSequence = Sequence([position])
    ident = Dataset()
    ident.ReferencedSegmentNumber = 1
    frame.SegmentIdentificationSequence = Sequence([ident])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    return ds


def _sr(kind: str, sop_class: str) -> Dataset:
    ds = _base(kind, sop_class, "SR")
    ds.ReferencedPerformedProcedureStepSequence = _mpps()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = PLANTED["sr_name"]
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    observer.VerifyingOrganization = "FAKE HOSPITAL"
    observer.VerificationDateTime = "20230101101010"
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = Sequence([code("121071", "DCM", "Finding")])
    text.TextValue = f"Seen with {PLANTED['name']}, no findings"
    items = [text]
    if kind == "comprehensive":
        number = Dataset()
        number.RelationshipType = "CONTAINS"
        number.ValueType = "NUM"
        number.ConceptNameCodeSequence = Sequence([code("121206", "DCM", "Distance")])
        measured = Dataset()
        measured.NumericValue = "12"
        measured.MeasurementUnitsCodeSequence = Sequence([code("mm", "UCUM", "millimeter")])
        number.MeasuredValueSequence = Sequence([measured])
        items.append(number)
    ds.ContentSequence = Sequence(items)
    return ds


def _gsps() -> Dataset:
    ds = _base("gsps", GSPS, "PR")
    ds.ReferencedPerformedProcedureStepSequence = _mpps()
    ds.ContentLabel = "SYNTHPR"
    ds.ContentDescription = "ANNOTATED BY FAKEPERSON"
    ds.PresentationCreationDate = "20230101"
    ds.PresentationCreationTime = "101010"
    ds.ContentCreatorName = PLANTED["physician"]
    mr = _mr()
    image = Dataset()
    image.ReferencedSOPClassUID = mr.SOPClassUID
    image.ReferencedSOPInstanceUID = mr.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = mr.SeriesInstanceUID
    series.ReferencedImageSequence = Sequence([image])
    ds.ReferencedSeriesSequence = Sequence([series])
    area = Dataset()
    area.ReferencedImageSequence = Sequence([image])
    area.PixelOriginInterpretation = "FRAME"
    area.DisplayedAreaTopLeftHandCorner = [1, 1]
    area.DisplayedAreaBottomRightHandCorner = [8, 8]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelSpacing = [1.0, 1.0]
    ds.DisplayedAreaSelectionSequence = Sequence([area])
    ds.ImageRotation = 0
    ds.ImageHorizontalFlip = "N"
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0.0, 1.0, "US"
    return ds


def _sc() -> Dataset:
    ds = _base("sc", SECONDARY_CAPTURE, "OT")
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    _image(ds)
    return ds


def _us() -> Dataset:
    ds = _base("us", US_IMAGE, "US")
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _pdf() -> Dataset:
    ds = _base("pdf", ENCAPSULATED_PDF, "DOC")
    del ds.SeriesDate, ds.SeriesTime
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = "REPORT FOR FAKEPERSON"
    ds.ConceptNameCodeSequence = Sequence()
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.AcquisitionDateTime = "20230101101010"
    body = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.EncapsulatedDocument = body
    ds.EncapsulatedDocumentLength = len(body)
    return ds


BUILDERS: dict[str, Callable[[], Dataset]] = {
    "MR": _mr,
    "CT": _ct,
    "EnhancedMR": _enhanced_mr,
    "SEG": _seg,
    "BasicSR": lambda: _sr("basic", BASIC_TEXT_SR),
    "ComprehensiveSR": lambda: _sr("comprehensive", COMPREHENSIVE_SR),
    "GSPS": _gsps,
    "SC": _sc,
    "US": _us,
    "PDF": _pdf,
}


def iod_object(kind: str) -> Dataset:
    """One object of ``kind`` (a key of :data:`BUILDERS`), with its file meta."""
    ds = BUILDERS[kind]()
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    return ds
