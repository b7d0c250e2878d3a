"""The transfer layer: destination types and the durable outbox that feeds them.

Every destination type is registered here, in :data:`DESTINATIONS`. Adding one is a module in
this package with a :class:`~engine.transfer.base.Destination` subclass, a schema fragment
``schemas/destinations/<type>.schema.json``, a test against a real peer, and one line below.
"""

from __future__ import annotations

from engine.transfer.base import Destination
from engine.transfer.dicom import DicomDestination
from engine.transfer.folder import FolderDestination
from engine.transfer.sftp import SftpDestination
from engine.transfer.zip import ZipDestination

__all__ = ["DESTINATIONS", "Destination"]

#: Destination type name (``type:`` under a project's ``destinations``) -> its class.
DESTINATIONS: dict[str, type[Destination]] = {
    "dicom": DicomDestination,
    "folder": FolderDestination,
    "sftp": SftpDestination,
    "zip": ZipDestination,
}


def _check_registry() -> None:
    """Each entry's key is its class's ``type`` (checked once, at import)."""
    for key, cls in DESTINATIONS.items():
        if getattr(cls, "type", None) != key:
            raise TypeError(f"DESTINATIONS[{key!r}] is {cls.__name__}, whose type is not {key!r}")


_check_registry()
