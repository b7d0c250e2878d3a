"""dcm2niix for the ``convert`` step: one series folder in, NIfTI and checked sidecars out.

:func:`convert_series` runs ``dcm2niix`` (Debian ``dcm2niix``) on one folder holding one
de-identified series, with a timeout and a bound on the output it keeps, writing compressed
NIfTI (``-z y``), BIDS sidecars (``-b y``, anonymised: ``-ba y``) under a fixed file name
pattern (``-f <stem>``): names are made by fiona, never from header values. The defaults file
of the account is ignored (``-g i``), so a ``~/.dcm2nii.ini`` cannot change the output.

Then every output is checked before anything leaves:

* names: each file is ``<stem>[_<suffix>].<ext>`` with ``ext`` one of NIfTI, JSON, bval,
  bvec, and the suffix only of what dcm2niix appends (echo ``_e2``, phase ``_ph``, ``a``/``b``
  for a split series, ...): letters, digits and ``_`` (anything else fails the series);
* sidecars: fields that carry a date or time of day (a key with ``Date`` or ``Time`` whose
  value is text: ``AcquisitionDateTime``, ``AcquisitionTime``; never the ``RepetitionTime`` or
  ``EchoTime`` numbers) are removed unless the project keeps dates, and the rest is searched
  by the verification gate (:func:`engine.deid.verify.find_text_leaks`) for the identifying
  values of the original series;
* the NIfTI header's text fields (``descrip``, ``aux_file``, ``intent_name``) are searched the
  same way.

A failure of the tool (exit status, timeout, no output) raises :class:`ConversionFailed` with
a message fit for the quarantine (its first error lines, paths shortened to names, checked
against the same values); a leak raises :class:`SidecarLeak`.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.deid.verify import IdentifyingValues, Leak, find_text_leaks, leak_reason

__all__ = [
    "DCM2NIIX",
    "ConversionFailed",
    "Converted",
    "SidecarLeak",
    "convert_series",
    "dcm2niix_command",
    "dcm2niix_path",
]

#: The converter's executable name (searched on PATH).
DCM2NIIX = "dcm2niix"
#: Seconds one series may take before dcm2niix is stopped.
TIMEOUT_SECONDS = 600.0
#: Characters of the tool's output kept (for the quarantine reason).
OUTPUT_LIMIT = 64 * 1024
#: Characters of a failure message kept in a quarantine reason.
MESSAGE_LIMIT = 300
#: Extensions dcm2niix writes with ``-z y -b y`` (and for diffusion).
EXTENSIONS = (".nii.gz", ".json", ".bval", ".bvec")
_SUFFIX = re.compile(r"^[A-Za-z0-9_]{0,32}$")
#: NIfTI-1 header: (name, offset, length) of its text fields.
_NIFTI_TEXT = (("descrip", 148, 80), ("aux_file", 228, 24), ("intent_name", 328, 16))


class ConversionFailed(Exception):
    """dcm2niix could not convert a series; the message is fit for a quarantine reason."""


class SidecarLeak(Exception):
    """An output of the converter holds an original identifying value (paths, kinds only)."""


@dataclass(frozen=True)
class Converted:
    """The files of one converted series: ``stem`` and the suffixes dcm2niix added.

    ``volumes`` maps each image's suffix (``""``, ``"_e2"``, ``"_ph"``) to its files by
    extension (``.nii.gz``, ``.json``, ``.bval``, ``.bvec``), all in ``folder``.
    """

    folder: Path
    stem: str
    volumes: dict[str, dict[str, Path]]


def dcm2niix_path() -> str | None:
    """The dcm2niix executable on PATH (None when it is not installed)."""
    return shutil.which(DCM2NIIX)


def dcm2niix_command(executable: str, source: Path, out: Path, stem: str) -> list[str]:
    """The command line converting the series in ``source`` into ``out/<stem>*``."""
    return [
        executable, "-g", "i", "-b", "y", "-ba", "y", "-z", "y", "-d", "1", "-w", "1",
        "-f", stem, "-o", str(out), str(source),
    ]  # fmt: skip


def _message(output: str, source: Path, out: Path, values: IdentifyingValues | None) -> str:
    """The tool's error lines (else its last lines), paths shortened, checked for PHI."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(?i)error|unable|unsupported|fail", line)]
    text = "; ".join(errors or lines[-2:]) or "no output"
    for folder in (str(source), str(out)):
        text = text.replace(folder + "/", "").replace(folder, "<folder>")
    if values is not None and find_text_leaks([("message", text)], values):
        return "its message quoted an identifying value and is withheld"
    return text[:MESSAGE_LIMIT]


def _run(command: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, output) of ``command``; ConversionFailed when it times out."""
    try:
        proc = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConversionFailed(f"dcm2niix took longer than {timeout:g} s and was stopped") from exc
    except OSError as exc:
        raise ConversionFailed(f"dcm2niix could not be started: {exc.strerror}") from exc
    output = proc.stdout[-OUTPUT_LIMIT:].decode("utf-8", "replace")
    return proc.returncode, output


def _volumes(out: Path, stem: str) -> dict[str, dict[str, Path]]:
    """The outputs in ``out`` grouped by suffix; ConversionFailed on a name not expected."""
    volumes: dict[str, dict[str, Path]] = {}
    for path in sorted(out.iterdir()):
        name = path.name
        ext = next((e for e in EXTENSIONS if name.endswith(e)), None)
        rest = name[len(stem) : len(name) - len(ext)] if ext else ""
        if ext is None or not name.startswith(stem) or not _SUFFIX.match(rest) or path.is_symlink():
            raise ConversionFailed("dcm2niix wrote a file of an unexpected name or type")
        volumes.setdefault(rest, {})[ext] = path
    images = {s: files for s, files in volumes.items() if ".nii.gz" in files}
    if not images:
        raise ConversionFailed("dcm2niix wrote no image")
    if len(images) != len(volumes):
        raise ConversionFailed("dcm2niix wrote a sidecar without its image")
    return images


def _is_date_field(key: str, value: object) -> bool:
    """A sidecar field holding a date or a time of day (text), not a duration (a number)."""
    return isinstance(value, str) and ("Date" in key or "Time" in key)


def clean_sidecar(doc: dict[str, Any], keep_dates: bool) -> dict[str, Any]:
    """``doc`` without its date and time-of-day fields (unless ``keep_dates``)."""
    if keep_dates:
        return doc
    return {k: v for k, v in doc.items() if not _is_date_field(k, v)}


def _sidecar_texts(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(JSON key, text) of every string in a sidecar, nested values flattened."""
    out: list[tuple[str, str]] = []

    def walk(path: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                out.append((f"{path}.{k}" if path else str(k), str(k)))
                walk(f"{path}.{k}" if path else str(k), v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        elif isinstance(value, str):
            out.append((path, value))

    walk("", doc)
    return out


def _header_texts(image: Path, name: str) -> list[tuple[str, str]]:
    """(``<file>:<field>``, text) of the NIfTI-1 header's text fields."""
    with gzip.open(image, "rb") as f:
        header = f.read(348)
    if len(header) < 348:
        raise ConversionFailed("dcm2niix wrote a NIfTI file without a whole header")
    return [
        (f"{name}:{field}", header[at : at + size].split(b"\x00", 1)[0].decode("latin-1"))
        for field, at, size in _NIFTI_TEXT
    ]


def check_outputs(
    converted: Converted,
    values: IdentifyingValues,
    *,
    keep_dates: bool,
    allow_kinds: Collection[str] = (),
) -> None:
    """Clean every sidecar (dates) in place and search sidecars and NIfTI headers for the
    original values; SidecarLeak naming where (no value) when one is found."""
    leaks: list[Leak] = []
    for suffix, files in converted.volumes.items():
        name = f"{converted.stem}{suffix}"
        sidecar = files.get(".json")
        if sidecar is not None:
            try:
                doc = json.loads(sidecar.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConversionFailed("dcm2niix wrote a sidecar that is not JSON") from exc
            if not isinstance(doc, dict):
                raise ConversionFailed("dcm2niix wrote a sidecar that is not a JSON object")
            doc = clean_sidecar(doc, keep_dates)
            sidecar.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            parts = [(f"{name}.json:{p}", t) for p, t in _sidecar_texts(doc)]
            leaks += find_text_leaks(parts, values, allow_kinds=allow_kinds)
        image_texts = _header_texts(files[".nii.gz"], f"{name}.nii.gz")
        leaks += find_text_leaks(image_texts, values, allow_kinds=allow_kinds)
    if leaks:
        raise SidecarLeak(leak_reason(leaks))


def convert_series(
    source: Path,
    out: Path,
    stem: str,
    *,
    values: IdentifyingValues | None = None,
    timeout: float = TIMEOUT_SECONDS,
    executable: str | None = None,
) -> Converted:
    """Convert the one series in folder ``source`` into the empty folder ``out`` as
    ``<stem>*`` (see the module doc); ``values`` (the original series' identifying values)
    check the tool's message. Raises ConversionFailed."""
    tool = executable or dcm2niix_path()
    if tool is None:
        raise ConversionFailed("dcm2niix is not installed (Debian package dcm2niix)")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", stem):
        raise ValueError(f"not a safe file name stem: {stem!r}")
    status, output = _run(dcm2niix_command(tool, source, out, stem), timeout)
    if status != 0:
        raise ConversionFailed(
            f"dcm2niix exit status {status}: {_message(output, source, out, values)}"
        )
    return Converted(out, stem, _volumes(out, stem))
