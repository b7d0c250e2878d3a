"""UID checks: a header value becomes part of a path only after passing :func:`is_valid_uid`."""

from __future__ import annotations

import re

#: PS3.5 9.1: components of digits separated by dots, at most 64 characters. Leading zeros are
#: not allowed by the standard but some devices send them; they are harmless in a path, so they
#: are accepted. What matters for safety is that nothing but digits and single dots gets through.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True if ``value`` is a str of digits and single dots, 1-64 characters long."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID_RE.match(value) is not None
    )
