"""REDCap access: where consent, research IDs and transfer requests live.

:class:`RedcapClient` (``client.py``) is fiona's only way to REDCap, over PyCap, configured by a
project's ``redcap:`` section (``schemas/redcap.schema.json``, parsed into
:class:`RedcapConfig`). Errors are :class:`RedcapError` subclasses whose messages carry neither
the API token nor PHI. ``settings.py`` reads a project's ``redcap`` section and shares one
connection per REDCap. What uses REDCap lives in the layer it belongs to: the consent step,
research IDs, the consent re-check and transfer requests in :mod:`engine.pipeline`.
"""

from engine.redcap.client import (
    RedcapClient,
    RedcapConfig,
    RedcapError,
    RedcapRefused,
    RedcapRejected,
    RedcapUnavailable,
    TokenFileError,
    load_token,
)

__all__ = [
    "RedcapClient",
    "RedcapConfig",
    "RedcapError",
    "RedcapRefused",
    "RedcapRejected",
    "RedcapUnavailable",
    "TokenFileError",
    "load_token",
]
