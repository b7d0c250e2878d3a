"""REDCap access: where consent, research IDs and transfer requests live.

:class:`RedcapClient` (``client.py``) is fiona's only way to REDCap, over PyCap, configured by a
project's ``redcap:`` section (``schemas/redcap.schema.json``, parsed into
:class:`RedcapConfig`). Errors are :class:`RedcapError` subclasses whose messages carry neither
the API token nor PHI.
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
