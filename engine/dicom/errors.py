"""The one error type of header reading."""

from __future__ import annotations


class HeaderError(ValueError):
    """The bytes are not a DICOM dataset the engine can file.

    ``code`` is the quarantine reason code (``unparseable`` or ``invalid_uid``); ``detail`` says
    what was wrong without quoting header values (they may carry PHI).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
