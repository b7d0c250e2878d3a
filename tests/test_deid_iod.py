"""De-identified outputs stay valid objects: dciodvfy (dicom3tools) over ten synthetic IODs
(tests/iod_objects.py), for the basic profile and for each option, finds no error the input did
not have (issue 16, deliverable 1)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.deid.deidentifier import Deidentifier
from engine.deid.profile import OPTIONS, load_profile
from tests.iod_objects import BUILDERS, iod_object

SECRET = b"iod-test-secret-0123456789abcdef0123"
PROFILES = ("basic", *OPTIONS)


def dciodvfy_errors(path: Path) -> set[str]:
    """The Error lines dciodvfy prints for ``path``, values and frame numbers taken out."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (Debian dicom3tools) is not installed; run scripts/setup.sh")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return {_normalise(line) for line in lines if line.startswith("Error")}


def _normalise(line: str) -> str:
    line = re.sub(r"<[^<>]*[0-9][^<>]*>", "<v>", line)
    return re.sub(r"(?<!Type )\b\d+\b", "N", line)


def _files(kind: str, option: str, tmp: Path) -> tuple[Path, Path]:
    buffer = io.BytesIO()
    iod_object(kind).save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    options = () if option == "basic" else (option,)
    if option == "retain_longitudinal_full_dates":
        options = (option,)
    out = Deidentifier(load_profile("basic", options), SECRET).process_file(data).data
    source, target = tmp / f"{kind}-in.dcm", tmp / f"{kind}-{option}.dcm"
    source.write_bytes(data)
    target.write_bytes(out)
    return source, target


@pytest.mark.parametrize("option", PROFILES)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_output_has_no_new_dciodvfy_error(kind: str, option: str, tmp_path: Path) -> None:
    source, target = _files(kind, option, tmp_path)
    new = dciodvfy_errors(target) - dciodvfy_errors(source)
    assert not new, f"{kind} with {option}: dciodvfy errors not in the input: {sorted(new)}"


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_inputs_are_valid(kind: str, tmp_path: Path) -> None:
    """The synthetic inputs themselves carry no dciodvfy error, so the comparison above is
    against a clean baseline."""
    path = tmp_path / f"{kind}.dcm"
    iod_object(kind).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == set()
