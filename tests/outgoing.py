"""What a written test file looks like to the outbox: an OutgoingInstance read from its header."""

from __future__ import annotations

from pathlib import Path

import pydicom

from engine.transfer.base import OutgoingInstance


def outgoing(path: Path) -> OutgoingInstance:
    """The outbox item for the DICOM file at ``path`` (UIDs, series and size from the file)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutgoingInstance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        series_uid=str(ds.SeriesInstanceUID),
        path=path,
        size=path.stat().st_size,
        series_number=int(ds.SeriesNumber),
        modality=str(ds.Modality),
    )
