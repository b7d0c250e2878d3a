"""Explain one uploaded file (``POST /api/v1/explain``, the portal's test-a-file page): which
projects would claim it and why, its labels and the steps that would run, as ``fiona explain
FILE`` prints it. Nothing is written but an audit entry naming the user and the study's token.

Header values (the patient's name, ID and birth date; the values routing criteria saw; the
series description) are under the ``"phi"`` key, filled only for a user with the PHI grant;
everyone gets the explanation without them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from engine.config.model import ProjectConfig, SiteConfig
from engine.route.explain import explain_lines
from engine.store.audit import AuditLog, uid_token

__all__ = ["NotDicom", "explain_upload"]


class NotDicom(ValueError):
    """The upload is not a DICOM file with a study and a series UID."""


def _patient(path: Path) -> tuple[str, dict[str, str]]:
    """The study UID (0020,000D) and the patient's name, ID and birth date (0010,0010),
    (0010,0020), (0010,0030) of a file; :class:`NotDicom` when it cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study_uid, _ = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    except Exception as exc:
        raise NotDicom("not a DICOM file fiona can read (no study and series UID)") from exc
    fields = {"patient_name": "PatientName", "patient_id": "PatientID",
              "birth_date": "PatientBirthDate"}  # fmt: skip
    return study_uid, {k: str(ds.get(v, "")) for k, v in fields.items()}


def explain_upload(
    site: SiteConfig,
    data: bytes,
    origin: tuple[str, str, str],
    projects: Sequence[ProjectConfig],
    *,
    operator: str,
    user: str,
    phi: bool,
) -> dict[str, Any]:
    """The explanation of the file ``data`` received from ``origin`` (calling AE, called AE,
    calling IP): ``lines`` without header values, ``study`` (the study UID's token) and, when
    ``phi``, ``phi.lines`` and ``phi.patient`` with them. :class:`NotDicom` for any other
    file; ``OSError`` when the audit log cannot be written (nothing is shown then)."""
    with tempfile.TemporaryDirectory(prefix="fiona-explain-") as tmp:
        path = Path(tmp) / "upload.dcm"
        path.write_bytes(data)
        study_uid, patient = _patient(path)
        token = uid_token(study_uid)
        AuditLog(site.data_dir).write(
            "file_explained", operator=operator, user=user, study=token, bytes=len(data)
        )
        out: dict[str, Any] = {
            "study": token,
            "lines": explain_lines(site, [str(path)], origin, projects, values=False),
        }
        if phi:
            lines = explain_lines(site, [str(path)], origin, projects)
            out["phi"] = {"lines": lines, "patient": patient}
    return out
