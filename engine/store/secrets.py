"""The per-install secret in the data folder: created once, at ``fiona serve``'s start.

``<data_dir>/secrets/install.key`` (:data:`engine.deid.keys.INSTALL_SECRET`) is what the
shipped example project de-identifies with (``secret_file: {data_dir}/secrets/install.key``);
:mod:`engine.deid.keys` reads it like any other secret file.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from engine.deid.keys import INSTALL_SECRET, INSTALL_SECRET_RANDOM_BYTES
from engine.store.fsio import create_durable, ensure_dir

__all__ = ["ensure_install_secret"]


def ensure_install_secret(data_dir: Path) -> tuple[Path, bool]:
    """The per-install secret ``<data_dir>/secrets/install.key``, created when missing:
    48 random bytes (base64, one line), mode 600 in a folder of mode 700, written atomically
    and never overwritten. Returns (path, whether it was created now). Raises OSError when the
    data folder cannot be written."""
    path = data_dir / INSTALL_SECRET
    if path.exists():
        return path, False
    if not path.parent.is_dir():
        ensure_dir(path.parent)
        os.chmod(path.parent, 0o700)
    data = base64.b64encode(secrets.token_bytes(INSTALL_SECRET_RANDOM_BYTES)) + b"\n"
    return path, create_durable(path, data, mode=0o600)
