"""Text in video pixel data: the user data of MPEG-2, H.264 and HEVC streams is blanked.

Streams are made by FFmpeg's encoders (through PyAV: x264 and x265 write their banner and
options as SEI user data of their own), then user data holding the synthetic patient's name,
ID and birth date is planted: an MPEG-2 ``user_data`` unit, an H.264 and an HEVC SEI
``user_data_unregistered`` message. After de-identification none of it is left, the stream has
the same length and fragments, and it decodes to the very same pictures.
"""

from __future__ import annotations

import io

import av
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import UID

from engine.deid import Deidentifier, load_profile
from engine.deid.burned_in import BurnedInPolicy
from engine.deid.export import Exported, Exporter, Held
from engine.deid.video import VIDEO_SYNTAXES, user_data
from tests import synth

SECRET = b"v" * 48
NAME, PID, BORN = "VIDEOPATIENT^ANNA", "VID778899", "19700512"
PLANTED = f"patient {NAME} id {PID} born {BORN}".encode()
UUID = bytes(range(16))
#: Codec, FFmpeg raw format, transfer syntax.
CODECS = {
    "h264": ("libx264", "h264", "1.2.840.10008.1.2.4.102"),
    "hevc": ("libx265", "hevc", "1.2.840.10008.1.2.4.107"),
    "mpeg2": ("mpeg2video", "mpeg2video", "1.2.840.10008.1.2.4.100"),
}
VIDEO_ENDOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.1.1"


def _encode(codec: str, fmt: str, frames: int = 6, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=none"}
        for i in range(frames):
            image = np.zeros((size, size, 3), np.uint8)
            image[:, :, 0] = (np.arange(size)[None, :] * 4 + i * 10) % 256
            image[:, :, 1] = (np.arange(size)[:, None] * 3) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _sei(payload: bytes) -> bytes:
    """An SEI ``user_data_unregistered`` message (payload type 5) and its trailing bits."""
    body = UUID + payload
    assert len(body) < 255
    return bytes([5, len(body)]) + body + b"\x80"


def _first_picture(stream: bytes, kind: str) -> int:
    """Where the start code of the first IDR slice begins (H.264 type 5; HEVC 19 or 20)."""
    pos = stream.index(b"\x00\x00\x01")
    while True:
        head = stream[pos + 3]
        nal_type = head & 0x1F if kind == "h264" else (head >> 1) & 0x3F
        if nal_type in ((5,) if kind == "h264" else (19, 20)):
            return pos
        pos = stream.index(b"\x00\x00\x01", pos + 3)


def _plant(stream: bytes, kind: str, text: bytes = PLANTED) -> bytes:
    """``stream`` with user data holding ``text`` before its first picture."""
    if kind == "mpeg2":
        at = stream.index(b"\x00\x00\x01\xb8")  # before the first GOP header
        return stream[:at] + b"\x00\x00\x01\xb2" + text + stream[at:]
    at = _first_picture(stream, kind)
    header = b"\x06" if kind == "h264" else b"\x4e\x01"  # SEI; HEVC: prefix SEI (type 39)
    return stream[:at] + b"\x00\x00\x01" + header + _sei(text) + stream[at:]


def _decoded(stream: bytes, fmt: str) -> list[np.ndarray]:
    with av.open(io.BytesIO(stream), format=fmt) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _video_file(stream: bytes, syntax: str) -> bytes:
    spec = synth.make_study_spec(5)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = VIDEO_ENDOSCOPIC
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = synth.study_uid(spec)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "ES"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PID, BORN
    ds.StudyDate = "20240101"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PlanarConfiguration, ds.NumberOfFrames = 0, 6
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = encapsulate([stream], fragments_per_frame=3, has_bot=False)
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _export(data: bytes) -> Exported | Held:
    open_policy = BurnedInPolicy(
        sop_classes=frozenset(), modalities=frozenset(), image_types=frozenset(),
        conversion_types=frozenset(), series_descriptions=(), trust_burned_in_no=True,
    )  # fmt: skip
    deid = Deidentifier(load_profile("basic", ()), SECRET, project="p")
    return Exporter(deid, open_policy).export(data)


def _stream_of(data: bytes) -> tuple[bytes, list[int]]:
    ds = pydicom.dcmread(io.BytesIO(data))
    fragments = list(generate_fragments(ds.PixelData))
    return b"".join(fragments), [len(f) for f in fragments]


@pytest.mark.parametrize("kind", sorted(CODECS))
def test_video_user_data_is_blanked_and_the_pictures_are_unchanged(kind: str) -> None:
    codec, fmt, syntax = CODECS[kind]
    stream = _plant(_encode(codec, fmt), kind)
    data = _video_file(stream, syntax)
    assert PLANTED in data
    result = _export(data)
    assert isinstance(result, Exported), result
    out = bytes(result.header) + bytes(result.pixels)
    for secret in (NAME.encode(), PID.encode(), BORN.encode(), b"x264", b"x265"):
        assert secret not in out, secret
    assert result.counts["pixel_text_removed"] >= 1
    cleaned, lengths = _stream_of(out)
    original, original_lengths = _stream_of(data)  # the stream, padded to even length
    assert len(cleaned) == len(original) and lengths == original_lengths, "lengths are kept"
    before, after = _decoded(stream, fmt), _decoded(cleaned, fmt)
    assert len(after) == len(before) == 6
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_sei_user_data_with_emulation_prevention_bytes_is_held() -> None:
    codec, fmt, syntax = CODECS["h264"]
    # 00 00 01 inside an SEI payload must be written 00 00 03 01 (H.264 7.4.1): blanking it
    # would change the NAL unit's length, so the file is held instead of passed unread.
    text = PLANTED + b"\x00\x00\x01"
    plain = _plant(_encode(codec, fmt), "h264", text)
    escaped = plain.replace(text, PLANTED + b"\x00\x00\x03\x01")
    result = _export(_video_file(escaped, syntax))
    assert isinstance(result, Held) and result.reason == "deidentification_failed", result
    assert "emulation prevention" in result.detail and NAME not in result.detail


def test_user_data_finds_each_unit_and_only_for_video_syntaxes() -> None:
    codec, fmt, syntax = CODECS["h264"]
    stream = _plant(_encode(codec, fmt), "h264")
    element = _pixel_element(_video_file(stream, syntax))
    units = user_data(element, syntax)
    assert any(PLANTED in u for u in units) and any(b"x264" in u for u in units)
    assert user_data(element, "1.2.840.10008.1.2.4.50") == []
    assert set(VIDEO_SYNTAXES.values()) == {"mpeg2", "h264", "hevc"}


def _pixel_element(data: bytes) -> bytes:
    """The Pixel Data element of a little-endian file, from its tag to the end."""
    return data[data.rindex(b"\xe0\x7f\x10\x00OB") :]
