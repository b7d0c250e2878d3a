"""pydicom as fiona uses it: set once per process, when this module is first imported.

pydicom validates values as it reads and writes them and reports an invalid one by quoting it
(``Invalid value for VR UI: '<the UID>'``) to its ``pydicom`` logger and as a ``UserWarning``;
the values it quotes are the patient's (a UID that embeds a birth date and an MRN, a name too
long for its VR). fiona never logs a header value, so:

- validation is off for reading and writing (``IGNORE``): fiona's own gates decide what a value
  means (a de-identified file is verified, a malformed one held with a reason);
- the ``pydicom`` logger does not pass its records on to fiona's handlers (only pydicom's own
  ``NullHandler`` sees them; ``pydicom.config.debug()`` still shows them when asked for);
- warnings raised in pydicom's modules are not shown.

Every engine module that uses pydicom imports this one, directly or through the module it
takes pydicom from (checked by ``tests/test_pydicom_setup.py``); importing it again is free.
"""

from __future__ import annotations

import logging
import warnings

from pydicom import config

#: pydicom's modules, as warnings name the module they are raised in.
PYDICOM_MODULES = r"pydicom(\.|$)"


def configure() -> None:
    """Apply the settings above (idempotent)."""
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    logging.getLogger("pydicom").propagate = False
    warnings.filterwarnings("ignore", module=PYDICOM_MODULES)


configure()
