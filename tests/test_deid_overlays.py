"""Overlays drawn inside Pixel Data (engine.deid.overlays): the retired embedded encoding
(Overlay Bit Position (60xx,0102) naming a plane in bits 12-15 of 16-bit data) and any bit above
Bits Stored are cleared on the way out, on both de-identification paths.

Images are synthetic MR (Bits Allocated 16, Bits Stored 12) with a "label" drawn in bit 13 as
an embedded overlay and stray bits in bit 15 where no overlay is declared.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from engine.deid import Deidentifier, load_profile
from engine.deid.export import Exported, Exporter, Held
from engine.deid.overlays import PixelBits, clear_unused_bits
from tests import synth

SECRET = b"o" * 48
LABEL = (slice(2, 6), slice(3, 20))  # rows, columns of the drawn text
STRAY = (slice(20, 24), slice(3, 20))


def _image(*, signed: bool = False, embedded: bool = True) -> tuple[Dataset, np.ndarray]:
    """(dataset with the overlay burned in, the image as it should come out)."""
    ds = synth.make_study(synth.make_study_spec(5), [synth.MR_SERIES["t2_tse"]], size=32)[0]
    image = ds.pixel_array.astype(np.int32)
    if signed:
        image -= 1000  # negative values, sign-extended into bits 12-15 as 16-bit cells
        ds.PixelRepresentation = 1
    cells = (image & 0xFFFF).astype(np.uint16)
    drawn = cells.copy()
    drawn[LABEL] ^= 1 << 13
    drawn[STRAY] ^= 1 << 15
    ds.PixelData = drawn.tobytes()
    if embedded:
        ds.add_new(0x60000010, "US", 32)  # Overlay Rows
        ds.add_new(0x60000011, "US", 32)  # Overlay Columns
        ds.add_new(0x60000040, "CS", "G")  # Overlay Type
        ds.add_new(0x60000050, "SS", [1, 1])  # Overlay Origin
        ds.add_new(0x60000100, "US", 16)  # Overlay Bits Allocated: the pixel cell's
        ds.add_new(0x60000102, "US", 13)  # Overlay Bit Position: the plane drawn in
    return ds, image


def _bytes(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return buffer.getvalue()


def _out_pixels(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.int32)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("byte_path", [True, False], ids=["byte-path", "pydicom-path"])
def test_embedded_overlay_and_high_bits_are_cleared(
    syntax: str, byte_path: bool, signed: bool
) -> None:
    ds, image = _image(signed=signed)
    data = _bytes(ds, syntax)
    result = Deidentifier(load_profile("basic"), SECRET).process_file(data, byte_path=byte_path)
    out = pydicom.dcmread(io.BytesIO(result.data))
    assert 0x60000102 not in out and 0x60000100 not in out
    raw = np.frombuffer(out.PixelData, dtype="<u2").reshape(image.shape)
    # exactly the image's cells: no bit 13 label, no bit 15 strays (signed: sign-extended)
    np.testing.assert_array_equal(raw, (image & 0xFFFF).astype(np.uint16))
    np.testing.assert_array_equal(out.pixel_array.astype(np.int32), image)
    assert result.counts["pixel_overlay_bits_cleared"] == 1


def test_an_image_with_nothing_outside_its_bits_is_passed_as_the_same_bytes() -> None:
    ds = synth.make_study(synth.make_study_spec(5), [synth.MR_SERIES["t2_tse"]], size=32)[0]
    data = _bytes(ds)
    result = Deidentifier(load_profile("basic"), SECRET).process_file(data)
    assert bytes(result.pixels) in data
    assert "pixel_overlay_bits_cleared" not in result.counts


def test_stray_high_bits_are_cleared_without_an_overlay_header() -> None:
    ds, image = _image(embedded=False)
    result = Exporter(Deidentifier(load_profile("basic"), SECRET)).export(_bytes(ds))
    assert isinstance(result, Exported)
    np.testing.assert_array_equal(_out_pixels(result.data), image)


def test_a_kept_overlay_keeps_its_plane_and_loses_the_other_bits() -> None:
    cells = np.array([0x0123 | 1 << 13 | 1 << 15, 0x0FFF], dtype="<u2")
    bits = PixelBits(16, 12, 11, False, (13,))
    kept = np.frombuffer(
        clear_unused_bits(cells.tobytes(), bits, remove_overlays=False) or b"", "<u2"
    )
    assert kept.tolist() == [0x0123 | 1 << 13, 0x0FFF]
    removed = clear_unused_bits(cells.tobytes(), bits, remove_overlays=True) or b""
    assert np.frombuffer(removed, "<u2").tolist() == [0x0123, 0x0FFF]


def test_a_plane_named_inside_the_stored_bits_is_cleared_too() -> None:
    cells = np.array([0x0F0F, 0x00F0], dtype="<u2")
    bits = PixelBits(16, 12, 11, False, (4,))
    cleared = clear_unused_bits(cells.tobytes(), bits) or b""
    assert np.frombuffer(cleared, "<u2").tolist() == [0x0F0F, 0x00E0]


def test_an_embedded_overlay_in_compressed_pixels_is_held() -> None:
    ds, _ = _image()
    ds.compress(RLELossless, generate_instance_uid=False)
    held = Exporter(Deidentifier(load_profile("basic"), SECRET)).export(_bytes(ds, RLELossless))
    assert isinstance(held, Held)
    assert held.reason == "burned_in" and "overlay embedded in compressed" in held.detail


def test_a_deflated_file_is_cleared_too() -> None:
    ds, image = _image()
    data = _bytes(ds, DeflatedExplicitVRLittleEndian)
    result = Deidentifier(load_profile("basic"), SECRET).process_file(data)
    assert result.counts["pixel_overlay_bits_cleared"] == 1
    np.testing.assert_array_equal(_out_pixels(result.data), image)


@pytest.mark.parametrize("little", [True, False])
@pytest.mark.parametrize(("allocated", "stored"), [(8, 6), (16, 12), (32, 20)])
@pytest.mark.parametrize("cells", [1, 3, 4, 5, 13])
def test_a_stray_bit_in_any_cell_is_found(
    little: bool, allocated: int, stored: int, cells: int
) -> None:
    """Clean images are checked 8 bytes at a time; a stray bit in any cell, including those
    after the last whole 64-bit word and in big-endian data, is still found and cleared."""
    bits = PixelBits(allocated, stored, stored - 1, False, (), little)
    dtype = np.dtype(f"{'<' if little else '>'}u{allocated // 8}")
    clean = np.full(cells, (1 << stored) - 1, dtype=dtype)
    assert clear_unused_bits(clean.tobytes(), bits) is None
    for index in range(cells):
        dirty = clean.copy()
        dirty[index] |= 1 << (allocated - 1)
        out = clear_unused_bits(dirty.tobytes(), bits)
        assert out is not None, index
        assert np.array_equal(np.frombuffer(out, dtype=dtype), clean), index
