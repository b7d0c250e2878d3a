"""Keyed, persistent pseudonymisation: the project secret, UIDs, date offsets, pseudonyms.

Everything here is a function of the per-project secret and the original value, so the same input
gives the same output in every run and on every machine holding the secret, and nobody without it
can reverse or recompute the mapping. Each use has its own HMAC-SHA256 domain prefix.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom._uid_dict import UID_dictionary

MIN_SECRET_BYTES = 32
MAX_UID_LENGTH = 64
DEFAULT_DATE_RANGE = (-365, -1)


class SecretError(ValueError):
    """A secret file that must not be used; the message says why."""


def load_secret(path: str | Path) -> bytes:
    """The project secret from ``path`` (raw bytes; one trailing newline is dropped).

    Refuses a file other users can read or write (chmod 600 it) and a secret shorter than
    32 bytes. Secrets never come from config files, which are shared and versioned.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise SecretError(f"secret file {path}: cannot read ({exc.strerror})") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise SecretError(
            f"secret file {path} is readable or writable by every user "
            f"(mode {stat.filemode(mode)}); run: chmod 600 {path}"
        )
    if data.endswith(b"\n"):
        data = data[:-1].removesuffix(b"\r")
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"secret file {path} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} are needed "
            f"(e.g. head -c 48 /dev/urandom | base64 > {path})"
        )
    return data


#: The per-install secret, relative to the data folder; ``fiona serve`` creates it at start.
INSTALL_SECRET = Path("secrets") / "install.key"
#: How a project's ``secret_file`` refers to the data folder (``{data_dir}/secrets/install.key``).
DATA_DIR_FIELD = "{data_dir}"
#: Random bytes in a new install secret (written base64-encoded, one line).
INSTALL_SECRET_RANDOM_BYTES = 48


def secret_in_data_dir(value: str) -> Path | None:
    """For a ``secret_file`` of the form ``{data_dir}/REL``: REL (relative to the data folder);
    None for any other value. Raises SecretError for a malformed reference."""
    if DATA_DIR_FIELD not in value:
        return None
    rest = value.removeprefix(DATA_DIR_FIELD + "/")
    rel = Path(rest)
    if rest == value or not rest or "{" in rest or rel.is_absolute() or ".." in rel.parts:
        raise SecretError(
            f"secret_file {value!r}: {DATA_DIR_FIELD} must start the path and be followed by "
            f"a path inside the data folder, e.g. {DATA_DIR_FIELD}/{INSTALL_SECRET}"
        )
    return rel


def _mac(secret: bytes, domain: bytes, value: str) -> bytes:
    return hmac.new(secret, domain + b"\0" + value.encode("utf-8"), hashlib.sha256).digest()


def is_well_known_uid(uid: str) -> bool:
    """Whether ``uid`` is a UID the standard defines (SOP class, transfer syntax, ...)."""
    return uid in UID_dictionary


@dataclass
class UidMapper:
    """Maps instance UIDs to ``<root>.<digits of HMAC-SHA256(secret, uid)>`` (at most 64 chars).

    The default root ``2.25`` takes the first 128 bits of the MAC as a decimal integer, as for a
    UUID-derived UID (PS3.5 B.2). Well-known UIDs pass unchanged. Results are memoised.
    """

    secret: bytes
    root: str = "2.25"
    _memo: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        parts = self.root.split(".")
        if not all(p.isdigit() for p in parts) or len(self.root) > MAX_UID_LENGTH - 25:
            raise ValueError(f"UID root {self.root!r}: digits and dots, at most 39 characters")

    def map(self, uid: str) -> str:
        """The new UID for ``uid`` (stripped of padding); well-known UIDs unchanged."""
        uid = uid.strip("\0 ")
        hit = self._memo.get(uid)
        if hit is not None:
            return hit
        if not uid or is_well_known_uid(uid):
            return uid
        digest = _mac(self.secret, b"uid", uid)
        if self.root == "2.25":
            number = int.from_bytes(digest[:16], "big")
        else:
            number = int.from_bytes(digest, "big") % 10 ** (MAX_UID_LENGTH - len(self.root) - 1)
        new = f"{self.root}.{number}"
        self._memo[uid] = new
        return new


@dataclass(frozen=True)
class DateShifter:
    """Shifts dates by a per-patient number of days from HMAC(secret, original Patient ID).

    The offset is in ``[low, high]`` (days, inclusive), the same for every instance of a patient,
    so intervals between a patient's dates are kept.
    """

    secret: bytes
    low: int = DEFAULT_DATE_RANGE[0]
    high: int = DEFAULT_DATE_RANGE[1]

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"date shift range [{self.low}, {self.high}] is empty")

    def offset_days(self, patient_id: str) -> int:
        span = self.high - self.low + 1
        return self.low + int.from_bytes(_mac(self.secret, b"date", patient_id)[:8], "big") % span

    @staticmethod
    def shift_da(value: str, days: int) -> str:
        """Shift a DA value (``YYYYMMDD``, a range ``A-B`` or several values ``a\\b``).

        Anything that is not a full date (partial or malformed) becomes empty.
        """
        out = []
        for item in value.split("\\"):
            ends = [_shift_date(part.strip(), days) for part in item.split("-")]
            out.append("-".join(ends) if all(ends) or "-" in item else "")
        return "\\".join(out)

    @staticmethod
    def shift_dt(value: str, days: int) -> str:
        """Shift the date part of a DT value; time, fraction and UTC offset are kept."""
        out = []
        for item in value.split("\\"):
            item = item.strip()
            head = _shift_date(item[:8], days)
            out.append(head + item[8:] if head else "")
        return "\\".join(out)


def _shift_date(text: str, days: int) -> str:
    if not text:
        return ""
    if len(text) != 8 or not text.isdigit():
        return ""
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return ""
    return (day + datetime.timedelta(days=days)).strftime("%Y%m%d")


@dataclass(frozen=True)
class Pseudonym:
    """Replacement Patient ID (0010,0020) and Patient's Name (0010,0010)."""

    id: str
    name: str


class PseudonymSource(Protocol):
    """Where pseudonyms come from: a keyed hash, or later the index's mapping table."""

    def pseudonym(self, patient_id: str, patient_name: str) -> Pseudonym: ...


@dataclass(frozen=True)
class HashPseudonyms:
    """``<prefix><base32 of HMAC(secret, PatientID)>``; the name is the same text.

    When the Patient ID is empty the Patient's Name is hashed instead (and when both are empty
    the result is still a fixed keyed value, never the empty string).
    """

    secret: bytes
    prefix: str = "SUBJ-"
    length: int = 16

    def pseudonym(self, patient_id: str, patient_name: str) -> Pseudonym:
        key = f"id:{patient_id}" if patient_id else f"name:{patient_name}"
        text = base32(_mac(self.secret, b"pseudonym", key), self.length)
        value = f"{self.prefix}{text}"[:64]
        return Pseudonym(value, value)


def base32(digest: bytes, length: int) -> str:
    """Upper-case base32 without padding, cut to ``length`` (valid in CS, SH, LO, AE)."""
    return base64.b32encode(digest).decode("ascii").rstrip("=")[:length]


def keyed_hash(secret: bytes, attribute: int, value: str, length: int) -> str:
    """A keyed hash of one attribute's value, ``length`` base32 characters (for ``hash``)."""
    return base32(_mac(secret, b"attr%08x" % attribute, value), length)
