"""Decoding compressed Pixel Data (7FE0,0010) to native, for the two places that need it.

The ``dicom`` destination decodes a file whose compressed transfer syntax the peer did not
accept (:mod:`engine.net.scu`), and pixel cleaning decodes before it blanks burned-in text
(:mod:`engine.deid.pixels`). Both use :func:`decompress`.

The decoders are pydicom's plug-ins, runtime dependencies of fiona (``pyproject.toml``):
pydicom's own RLE decoder; pylibjpeg with pylibjpeg-libjpeg (JPEG baseline, extended and
lossless, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000, HTJ2K) and pylibjpeg-rle (RLE, faster).
Which transfer syntaxes can be decoded here is :func:`can_decode`.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

import engine.dicom.pydicom_setup  # noqa: F401  (pydicom's settings: no value in any log)

__all__ = ["DecodeFailed", "can_decode", "decompress", "is_compressed"]

#: Syntaxes whose every image went through lossy compression, with the Lossy Image Compression
#: Method (0028,2114) term for it. Others (JPEG-LS near-lossless, JPEG 2000) may be lossless:
#: for them the header's own Lossy Image Compression (0028,2110) is kept as it is.
_ALWAYS_LOSSY = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1"}


class _Quiet(logging.Filter):
    """pydicom logs a failed frame at ERROR with its traceback, and then raises; the caller
    reports the failure in one line (:class:`DecodeFailed`), so the log keeps it at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_Quiet())


class DecodeFailed(Exception):
    """Pixel data could not be decoded; the message is short and PHI-free."""


def is_compressed(syntax: str) -> bool:
    """Whether transfer syntax ``syntax`` (a UID) holds compressed (encapsulated) pixel data;
    a syntax pydicom does not know (a private one) counts as compressed."""
    try:
        return bool(UID(syntax).is_compressed)
    except ValueError:  # not a transfer syntax pydicom knows
        return True


def can_decode(syntax: str) -> bool:
    """Whether an installed decoder handles transfer syntax ``syntax`` (a UID)."""
    from pydicom.pixels.decoders.base import get_decoder

    uid = UID(syntax)
    if not is_compressed(uid):
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:  # pydicom has no decoder for this syntax at all
        return False


def decompress(ds: Dataset) -> None:
    """Decode ``ds``'s compressed Pixel Data in place to native Explicit VR Little Endian.

    Every frame is decoded; YCbCr (YBR_FULL_422, YBR_FULL, YBR_ICT, YBR_RCT) becomes RGB with
    Photometric Interpretation (0028,0004) and Planar Configuration (0028,0006) (0: pixel
    interleaved) updated; Number of Frames (0028,0008) set for multi-frame data; the Transfer
    Syntax UID (0002,0010) becomes Explicit VR Little Endian. SOP Instance UID (0008,0018) is
    kept (whoever calls owns UIDs). An image from a syntax that is always lossy (JPEG baseline
    or extended) keeps or gets Lossy Image Compression (0028,2110) ``01`` and a Lossy Image
    Compression Method (0028,2114), as PS3.3 C.7.6.1.1.5 asks of decompressed images.

    Raises :class:`DecodeFailed` when no decoder is installed for the syntax or the stream
    is corrupt; ``ds`` is then unchanged.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str((meta or {}).get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    if not is_compressed(syntax):
        return
    if not can_decode(syntax):
        raise DecodeFailed(f"no decoder installed for {syntax.name}")
    try:
        ds.decompress(as_rgb=True, generate_instance_uid=False)
    except Exception as exc:  # decoders raise many kinds (corrupt stream, bad header values)
        raise DecodeFailed(f"{syntax.name} pixel data is corrupt ({type(exc).__name__})") from exc
    method = _ALWAYS_LOSSY.get(syntax)
    if method is not None:
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method
