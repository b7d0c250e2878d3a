"""Text inside compressed pixel data (engine.deid.encapsulated): JPEG COM and APPn segments,
JPEG 2000 comments and JP2 boxes are stripped from every frame, frames are re-encapsulated
(offset tables rewritten), decoding is unchanged, and the verification gate reads what is left.

Frames come from real encoders (dcmtk's dcmcjpeg and dcmcjpls, pydicom's JPEG 2000 encoder);
the planted segments hold the synthetic patient's name, ID and birth date.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames

from engine.cli import main
from engine.deid import Deidentifier, load_profile
from engine.deid import deidentifier as deidentifier_module
from engine.deid.encapsulated import BadBitstream, frames_of, strip_text, text_segments
from engine.deid.export import Exported, Exporter, Held
from tests import synth
from tests.compressed import CODECS, Codec, compress

SECRET = b"e" * 48
NAME, PID, BIRTH = "SEGMENT^PLANTED^NAME", "SEGPID0004711", "19680403"
TEXT = f"{NAME} {PID} {BIRTH}".encode()
_CODECS = {c.name: c for c in CODECS}
JPEG_CODECS = ["dcmcjpeg-baseline", "dcmcjpeg-lossless", "dcmcjpls-lossless"]
J2K_CODECS = ["pydicom-j2k-lossless"]


def _source(tmp_path: Path, frames: int = 1) -> Path:
    ds = synth.make_study(synth.make_study_spec(3), [synth.MR_SERIES["t2_tse"]], size=32)[0]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BIRTH
    if frames > 1:
        ds.PixelData = ds.PixelData * frames
        ds.NumberOfFrames = frames
    return synth.write_dataset(ds, tmp_path / "src.dcm")


def _compressed(tmp_path: Path, codec: Codec, frames: int = 1) -> Dataset:
    return pydicom.dcmread(compress(_source(tmp_path, frames), tmp_path / "c.dcm", codec))


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _plant_jpeg(frame: bytes) -> bytes:
    """A COM, an APP1 (Exif-like) and an APP0 JFIF with a thumbnail after SOI, a COM before EOI."""
    jfif = b"JFIF\0\x01\x01\0\0\x01\0\x01\x01\x01" + TEXT[:3]
    planted = _segment(0xFE, TEXT) + _segment(0xE1, b"Exif\0\0" + TEXT) + _segment(0xE0, jfif)
    end = frame.rindex(b"\xff\xd9")
    return frame[:2] + planted + frame[2:end] + _segment(0xFE, TEXT) + frame[end:]


def _plant_j2k(frame: bytes) -> bytes:
    """A COM (FF64, Latin-1 text) right after SIZ in the main header."""
    siz_end = 2 + 2 + struct.unpack_from(">H", frame, 4)[0]
    return frame[:siz_end] + _segment(0x64, b"\0\x01" + TEXT) + frame[siz_end:]


def _planted(ds: Dataset, plant, extended: bool = False) -> bytes:  # type: ignore[no-untyped-def]
    frames = [
        plant(f)
        for f in generate_frames(ds.PixelData, number_of_frames=ds.get("NumberOfFrames", 1))
    ]
    if extended:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    else:
        ds.PixelData = encapsulate(frames, has_bot=len(frames) > 1)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _exporter() -> Exporter:
    return Exporter(Deidentifier(load_profile("basic"), SECRET, project="p"))


def _pixels(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


@pytest.mark.parametrize("byte_path", [True, False], ids=["byte-path", "pydicom-path"])
@pytest.mark.parametrize("codec", JPEG_CODECS + J2K_CODECS)
def test_planted_segments_leave_no_trace_and_decoding_is_unchanged(
    tmp_path: Path, codec: str, byte_path: bool
) -> None:
    ds = _compressed(tmp_path, _CODECS[codec])
    clean = io.BytesIO()
    ds.save_as(clean, enforce_file_format=True)
    data = _planted(ds, _plant_j2k if codec in J2K_CODECS else _plant_jpeg)
    assert TEXT in data
    result = Deidentifier(load_profile("basic"), SECRET).process_file(data, byte_path=byte_path)
    out = result.data
    for value in (NAME, PID, BIRTH, "SEGMENT"):
        assert value.encode() not in out
    assert result.counts["pixel_text_removed"] >= 2
    left = text_segments(result.pixels)  # only the fixed fields decoding needs
    assert all(s == b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0" or s.startswith(b"Adobe") for s in left)
    np.testing.assert_array_equal(_pixels(out), _pixels(clean.getvalue()))


def test_an_unplanted_frame_is_passed_as_the_same_bytes(tmp_path: Path) -> None:
    ds = _compressed(tmp_path, _CODECS["dcmcjpeg-baseline"])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    result = Deidentifier(load_profile("basic"), SECRET).process_file(data)
    assert bytes(result.pixels) in data
    assert "pixel_text_removed" not in result.counts


@pytest.mark.parametrize("extended", [False, True], ids=["basic-offset-table", "extended"])
def test_multi_frame_offset_tables_are_rewritten(tmp_path: Path, extended: bool) -> None:
    ds = _compressed(tmp_path, _CODECS["dcmcjpeg-lossless"], frames=3)
    expected = ds.pixel_array
    data = _planted(ds, _plant_jpeg, extended=extended)
    result = _exporter().export(data)
    assert isinstance(result, Exported), result
    assert TEXT not in result.data
    out = pydicom.dcmread(io.BytesIO(result.data))
    table, frames = frames_of(result.pixels)
    assert len(frames) == 3
    if extended:
        assert table == b""
        offsets = struct.unpack("<3Q", out.ExtendedOffsetTable)
        lengths = struct.unpack("<3Q", out.ExtendedOffsetTableLengths)
        element = bytes(result.pixels)
        first = 12 + 8  # element header, empty offset table item
        for offset, length, frame in zip(offsets, lengths, frames, strict=True):
            assert element[first + offset + 8 : first + offset + 8 + length] == frame
    else:
        assert struct.unpack("<3L", table) == (
            0,
            8 + len(frames[0]),
            16 + len(frames[0]) + len(frames[1]),
        )
    assert all(len(f) % 2 == 0 for f in frames)
    np.testing.assert_array_equal(out.pixel_array, expected)


def test_jp2_boxes_other_than_the_image_are_dropped(tmp_path: Path) -> None:
    ds = _compressed(tmp_path, _CODECS["pydicom-j2k-lossless"])
    expected = ds.pixel_array

    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">L4s", len(body) + 8, kind) + body

    depth = (ds.BitsStored - 1) | (0x80 if ds.PixelRepresentation else 0)
    ihdr = struct.pack(">LLHBBBB", ds.Rows, ds.Columns, 1, depth, 7, 0, 0)
    header = box(b"ihdr", ihdr) + box(b"colr", struct.pack(">BBBL", 1, 0, 0, 17))

    def jp2(stream: bytes) -> bytes:
        return (
            box(b"jP  ", b"\r\n\x87\n")
            + box(b"ftyp", b"jp2 \0\0\0\0jp2 ")
            + box(b"jp2h", header)
            + box(b"xml ", b"<patient>" + TEXT + b"</patient>")
            + box(b"jp2c", _plant_j2k(stream))
            + box(b"uuid", b"\x01" * 16 + TEXT)
        )

    data = _planted(ds, jp2)
    result = _exporter().export(data)
    assert isinstance(result, Exported), result
    assert TEXT not in result.data and b"xml " not in bytes(result.pixels)
    np.testing.assert_array_equal(_pixels(result.data), expected)


def test_the_gate_holds_a_frame_whose_segments_were_not_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = _compressed(tmp_path, _CODECS["dcmcjpeg-baseline"])
    data = _planted(ds, _plant_jpeg)
    monkeypatch.setattr(deidentifier_module, "strip_text", lambda element: None)
    held = _exporter().export(data)
    assert isinstance(held, Held)
    assert held.reason == "verification_failed"
    assert "PixelData frame segment (patient_name)" in held.detail
    for value in (NAME, PID, BIRTH, "SEGMENT"):
        assert value not in held.detail


def test_a_frame_that_is_not_a_bitstream_is_held(tmp_path: Path) -> None:
    ds = _compressed(tmp_path, _CODECS["dcmcjpeg-baseline"])
    data = _planted(ds, lambda f: b"\xff\xd8" + _segment(0xFE, TEXT)[:6])
    held = _exporter().export(data)
    assert isinstance(held, Held) and held.reason == "deidentification_failed"
    assert "pixel data" in held.detail and NAME not in held.detail
    with pytest.raises(BadBitstream):
        strip_text(b"\xe0\x7f\x10\x00OB\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\0\0\0\0")


def test_fiona_anonymize_strips_a_jpeg_comment(tmp_path: Path) -> None:
    ds = _compressed(tmp_path, _CODECS["dcmcjpeg-baseline"])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_bytes(_planted(ds, _plant_jpeg))
    secret = tmp_path / "k"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    out = tmp_path / "out"
    code = main(
        ["anonymize", str(tmp_path / "in"), str(out), "--profile", "basic",
         "--secret-file", str(secret), "--no-progress", "--no-sync"]
    )  # fmt: skip
    assert code == 0
    written = [p for p in out.rglob("*.dcm")]
    assert len(written) == 1
    assert TEXT not in written[0].read_bytes() and NAME.encode() not in written[0].read_bytes()
