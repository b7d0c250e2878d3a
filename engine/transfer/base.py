"""What every destination type shares: the study it is given, what it reports back, the layout.

A destination type is one module in this package with a :class:`Destination` subclass, one
schema fragment ``schemas/destinations/<type>.schema.json`` for its options, one test against a
real peer, and one entry in ``DESTINATIONS`` (``engine/transfer/__init__.py``).

The outbox (``engine/transfer/outbox.py``) owns durability: it keeps every (study, destination)
transfer and each of its instances in the index, retries with backoff, and resumes after a
restart. A destination only moves bytes: :meth:`Destination.send` gets one study's instances,
skips the ones already confirmed, and calls ``confirm`` for each instance as soon as the peer
has it for good (a C-STORE Success, an upload renamed into place). ``confirm`` returns only once
the confirmation is committed, so an instance confirmed before a crash is never sent again.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from engine.config.issues import ConfigIssue
from engine.config.schema import schema_dir

__all__ = [
    "DATASET_KINDS",
    "DEFAULT_LAYOUT",
    "LAYOUT_FIELDS",
    "Confirm",
    "DeliveryError",
    "Destination",
    "InstanceResult",
    "JsonPath",
    "LayoutError",
    "OutgoingInstance",
    "StudyBatch",
    "check_layout",
    "destination_schema_file",
    "render_layout",
    "resolve",
]

JsonPath = tuple[str | int, ...]

#: Folder of one series at a file destination, below its root: ``layout`` option default.
DEFAULT_LAYOUT = "{project}/{subject}/{study_uid}/{series_uid}"

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FIELD = re.compile(r"\{([a-z_]+)\}")
#: Template fields a layout may use; each value is checked to be one safe path component.
LAYOUT_FIELDS = (
    "project",
    "subject",
    "event",
    "study_uid",
    "series_uid",
    "series_number",
    "modality",
    "sop_instance_uid",
)


@dataclass(frozen=True)
class OutgoingInstance:
    """One Part 10 file to deliver, as it leaves (de-identified when the pipeline anonymized).

    ``sop_instance_uid`` (0008,0018), ``sop_class_uid`` (0008,0016), ``series_uid``
    (0020,000E) and ``transfer_syntax`` (0002,0010) are the values in the file at ``path``;
    ``size`` is its length in bytes. ``series_number`` (0020,0011) and ``modality`` (0008,0060)
    feed the layout templates (empty/None when absent).
    """

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    series_uid: str
    path: Path
    size: int
    series_number: int | None = None
    modality: str = ""
    #: '' for a DICOM instance; for a converted file the convert step's format (``nifti``,
    #: ``bids``). Such a file's ``sop_instance_uid`` is a key unique in its transfer, its
    #: ``sop_class_uid`` and ``transfer_syntax`` are empty, and ``name`` is its path below
    #: the study folder (``nifti``) or the dataset folder (``bids``).
    kind: str = ""
    name: str = ""


#: ``OutgoingInstance.kind`` of files that belong to a dataset rather than a study folder.
DATASET_KINDS = frozenset({"bids"})


@dataclass(frozen=True)
class StudyBatch:
    """One transfer: the instances of one study (or of a follow-up for it) to one destination.

    ``study_uid`` is the Study Instance UID (0020,000D) the files carry; ``subject`` and
    ``event`` the project's pseudonym and event for it (``subject`` is the pseudonymised
    Patient ID once the pipeline anonymized; never an original identifier otherwise: the send
    step refuses to put one in a layout). ``follow_up`` is 0 for the study's first transfer and
    counts later ones (series that arrived after the study was sent). ``transfer_id`` is the
    outbox row.
    """

    transfer_id: int
    project: str
    study_uid: str
    subject: str
    event: str
    follow_up: int
    instances: tuple[OutgoingInstance, ...]

    @property
    def dataset(self) -> bool:
        """Whether the batch's files go into a dataset folder (BIDS) instead of a study's."""
        return any(i.kind in DATASET_KINDS for i in self.instances)


@dataclass(frozen=True)
class InstanceResult:
    """What the destination said about one instance.

    ``ok`` True means the peer has it for good (C-STORE Success or Warning; file renamed into
    place). ``status`` is the DIMSE status (0x0000, 0xB000, 0xA700...) for DICOM peers, None
    otherwise; ``detail`` a short text without PHI.
    """

    sop_instance_uid: str
    ok: bool
    status: int | None = None
    detail: str = ""


#: Called by :meth:`Destination.send` for each instance; returns once the result is committed.
Confirm = Callable[[InstanceResult], None]


class DeliveryError(Exception):
    """The destination could not take the study now (unreachable, refused, broke off).

    The outbox retries the transfer later; instances confirmed before the error stay confirmed.
    The message is shown to operators: no PHI, no file paths built from header values.
    """


class LayoutError(ValueError):
    """A layout template field has a value that is not one safe path component."""


def render_layout(template: str, batch: StudyBatch, instance: OutgoingInstance) -> PurePosixPath:
    """The relative folder of ``instance`` at a file destination (``layout`` option).

    Each field value must be one path component of letters, digits, ``.``, ``_`` and ``-``
    (UIDs and pseudonyms are); anything else raises :class:`LayoutError` rather than reach a
    file system.
    """
    values: dict[str, str] = {
        "project": batch.project,
        "subject": batch.subject,
        "event": batch.event,
        "study_uid": batch.study_uid,
        "series_uid": instance.series_uid,
        "series_number": "" if instance.series_number is None else str(instance.series_number),
        "modality": instance.modality,
        "sop_instance_uid": instance.sop_instance_uid,
    }

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise LayoutError(f"unknown layout field {{{name}}}")
        text = values[name] or "none"
        if not _SAFE_COMPONENT.match(text):
            raise LayoutError(f"layout field {{{name}}} is not a safe folder name")
        return text

    rendered = _FIELD.sub(value, template)
    path = PurePosixPath(rendered)
    if path.is_absolute() or any(part in ("", ".", "..") for part in rendered.split("/")):
        raise LayoutError("a layout must be a relative path without '.' or '..' parts")
    return path


def check_layout(template: str) -> str | None:
    """Why ``template`` is not a valid layout (None when it is)."""
    for name in _FIELD.findall(template):
        if name not in LAYOUT_FIELDS:
            return f"unknown field {{{name}}}; expected some of {', '.join(LAYOUT_FIELDS)}"
    rest = _FIELD.sub("x", template)
    if "{" in rest or "}" in rest:
        return "unbalanced '{' or '}'"
    if rest.startswith("/") or any(part in ("", ".", "..") for part in rest.split("/")):
        return "expected a relative path without empty, '.' or '..' parts"
    return None


def destination_schema_file(kind: str) -> Path:
    """``schemas/destinations/<kind>.schema.json``: the options of destination type ``kind``."""
    return schema_dir() / "destinations" / f"{kind}.schema.json"


class Destination(ABC):
    """A place studies are delivered to, built once per project from its options.

    ``options`` is the destination's mapping from the project file (``type`` included) with
    the schema fragment's defaults applied; ``project_file`` is the file relative paths in it
    (keys, known_hosts, folders) are relative to. ``name`` is its key under ``destinations``.
    """

    #: The type, as written after ``type:`` in a project file.
    type: ClassVar[str]

    def __init__(self, name: str, options: Mapping[str, Any], project_file: Path) -> None:
        self.name = name
        self.options: dict[str, Any] = dict(options)
        self.project_file = project_file

    @abstractmethod
    def send(self, batch: StudyBatch, already: frozenset[str], confirm: Confirm) -> None:
        """Deliver ``batch``'s instances whose SOP Instance UID is not in ``already``.

        Calls ``confirm`` for each instance the peer answered (``ok`` False for a per-instance
        failure, such as a C-STORE failure status); raises :class:`DeliveryError` when the
        peer cannot be reached or breaks off. A study-level file (a manifest) covers every
        instance of the batch, ``already`` included.
        """

    def verify(self, batch: StudyBatch) -> str | None:
        """After every instance was confirmed: a further check at the peer (a C-FIND count, a
        manifest read back). None when it passes (the default); else why it failed, and the
        outbox retries the transfer."""
        return None

    def close(self) -> None:
        """Release connections kept between sends (none by default)."""
        return None

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """Problems the schema cannot see (a key file missing, a layout field unknown), on
        options that passed the schema, with paths below ``base_path``
        (``("destinations", "pacs")``)."""
        return []

    @classmethod
    def schema_file(cls) -> Path:
        return destination_schema_file(cls.type)


def resolve(file: Path, value: str) -> Path:
    """A path option: absolute, or relative to the project file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (file.parent / path)
