"""Compressed test files, made by the encoders a hospital's files come from: dcmtk's
``dcmcjpeg``, ``dcmcjpls`` and ``dcmcrle`` (real binaries), and pydicom's own encoders (RLE;
JPEG-LS with pyjpegls; JPEG 2000 with pylibjpeg-openjpeg).

``CODECS`` names each way of compressing; :func:`compress` applies one to a Part 10 file.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tests.conftest import need_peer


@dataclass(frozen=True)
class Codec:
    """One way to compress: a dcmtk tool and its options, or a pydicom encoder."""

    name: str
    syntax: UID
    lossless: bool
    tool: str = ""  # dcmtk's binary; empty: pydicom's encoder
    args: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of Dataset.compress

    def __str__(self) -> str:
        return self.name


CODECS = [
    Codec("dcmcjpeg-lossless", JPEGLosslessSV1, True, "dcmcjpeg"),
    Codec("dcmcjpeg-baseline", JPEGBaseline8Bit, False, "dcmcjpeg", ("+eb",)),
    Codec("dcmcjpeg-extended", JPEGExtended12Bit, False, "dcmcjpeg", ("+ee",)),
    Codec("dcmcjpls-lossless", JPEGLSLossless, True, "dcmcjpls"),
    Codec("dcmcjpls-near", JPEGLSNearLossless, False, "dcmcjpls", ("+en",)),
    Codec("dcmcrle", RLELossless, True, "dcmcrle"),
    Codec("pydicom-rle", RLELossless, True),
    Codec("pydicom-jpegls", JPEGLSLossless, True),
    Codec("pydicom-jpegls-near", JPEGLSNearLossless, False, options=(("jls_error", 3),)),
    Codec("pydicom-j2k-lossless", JPEG2000Lossless, True),
    Codec("pydicom-j2k", JPEG2000, False, options=(("j2k_cr", [10]),)),
]


def compress(src: Path, dst: Path, codec: Codec) -> Path:
    """``src`` compressed with ``codec`` into ``dst`` (SOP Instance UID kept)."""
    if codec.tool:
        subprocess.run(
            [need_peer(codec.tool), *codec.args, str(src), str(dst)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:
        ds = pydicom.dcmread(src)
        ds.compress(codec.syntax, generate_instance_uid=False, **dict(codec.options))
        ds.save_as(dst, enforce_file_format=True)
    got = pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert got == codec.syntax, (codec.name, got.name)
    return dst
