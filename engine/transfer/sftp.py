"""``sftp``: deliver studies to an SSH server's file system.

Options (``schemas/destinations/sftp.schema.json``)::

    destinations:
      lab:
        type: sftp
        host: research.example.org
        port: 22
        username: fiona
        key_file: keys/fiona_ed25519            # unencrypted, mode 600; relative to the project
        known_hosts: keys/known_hosts           # the server's pinned host key
        path: /data/incoming                    # remote root; must exist
        study_layout: "{project}/{subject}/{study_uid}"
        layout: "{study_layout}/{series_uid}"

Files land at ``<path>/<layout>/<SOPInstanceUID>.dcm`` with ``MD5SUMS`` and ``manifest.json``
in the study folder (:mod:`engine.transfer.files`), as with a ``folder`` destination.

Trust: the server's host key must be in the ``known_hosts`` file, and only there (no system or
user known_hosts). An unknown host or a changed key is refused, never learnt: a changed key is
what a man in the middle looks like, and research data must not go to one. Authentication is by
the key in ``key_file`` only (no agent, no password, no ``~/.ssh`` keys).

Each file is uploaded to ``.<name>.part`` and renamed into place (OpenSSH's posix-rename, which
replaces atomically; on servers without it, remove then rename), and confirmed after the
rename. One connection serves a whole batch. :meth:`SftpDestination.verify` reads the remote
manifest back and checks the size of each of the batch's files with ``stat``; reading every
file back for its MD5 would double the transfer, so the checksums are left to ``md5sum -c``
at the other end.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import paramiko

from engine.config.issues import ConfigIssue, format_path
from engine.transfer.base import (
    Confirm,
    DeliveryError,
    Destination,
    InstanceResult,
    JsonPath,
    StudyBatch,
    resolve,
)
from engine.transfer.files import (
    MANIFEST_JSON,
    MD5SUMS,
    FileEntry,
    Layout,
    Manifest,
    Placed,
    check_file_options,
    digest,
    part_name,
    why,
)

__all__ = ["SftpDestination", "known_hosts_name"]

#: What a failing network, server or SSH layer raises inside paramiko.
_NETWORK_ERRORS = (OSError, EOFError, paramiko.SSHException)


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH (and paramiko) name a server in known_hosts: ``[host]:port`` unless 22."""
    return host if port == 22 else f"[{host}]:{port}"


class _UnknownHost(paramiko.SSHException):
    """The server's host key is not in the known_hosts file."""


class _Refuse(paramiko.RejectPolicy):
    """RejectPolicy with its own exception, so an unknown host gets its own message."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHost(hostname)


class _Remote:
    """The remote side of one session: folders made so far, and how to rename."""

    def __init__(self, sftp: paramiko.SFTPClient, root: PurePosixPath) -> None:
        self.sftp = sftp
        self.root = root
        self.made: set[PurePosixPath] = set()
        self.posix_rename = True

    def require_root(self, name: str) -> None:
        try:
            mode = self.sftp.stat(str(self.root)).st_mode
        except FileNotFoundError:
            mode = None
        if mode is None or not stat.S_ISDIR(mode):
            raise DeliveryError(f"destination {name}: the remote folder 'path' does not exist")

    def ensure(self, folder: PurePosixPath) -> None:
        """Create ``folder`` (relative to the root) and its missing parents."""
        if folder in self.made or folder == PurePosixPath():
            return
        full = str(self.root / folder)
        try:
            self.sftp.stat(full)
        except FileNotFoundError:
            self.ensure(folder.parent)
            try:
                self.sftp.mkdir(full)
            except OSError:
                self.sftp.stat(full)  # made meanwhile by a concurrent transfer: fine
        self.made.add(folder)

    def put(self, placed: Placed, target: PurePosixPath) -> FileEntry:
        """Upload the instance's file to ``target`` (relative to the root) by a temp name."""
        self.ensure(target.parent)
        part = target.parent / part_name(target.name)
        with self.sftp.open(str(self.root / part), "wb") as out:
            out.set_pipelined(True)  # writes acknowledged at close, not one by one
            entry = digest(placed, out.write)
        self.rename(part, target)
        return entry

    def write(self, target: PurePosixPath, data: bytes) -> None:
        self.ensure(target.parent)
        part = target.parent / part_name(target.name)
        with self.sftp.open(str(self.root / part), "wb") as out:
            out.write(data)
        self.rename(part, target)

    def read(self, target: PurePosixPath) -> bytes | None:
        try:
            with self.sftp.open(str(self.root / target), "rb") as src:
                return bytes(src.read())
        except FileNotFoundError:
            return None

    def size(self, target: PurePosixPath) -> int | None:
        try:
            return self.sftp.stat(str(self.root / target)).st_size
        except FileNotFoundError:
            return None

    def rename(self, part: PurePosixPath, target: PurePosixPath) -> None:
        src, dst = str(self.root / part), str(self.root / target)
        if self.posix_rename:
            try:
                self.sftp.posix_rename(src, dst)
                return
            except OSError as exc:
                if exc.errno is not None:  # no such file, permission denied: a real failure
                    raise
                self.posix_rename = False  # the server lacks posix-rename@openssh.com
        # Plain SFTP rename refuses an existing target; the gap is the price of such servers.
        with suppress(FileNotFoundError):
            self.sftp.remove(dst)
        self.sftp.rename(src, dst)


class SftpDestination(Destination):
    """Uploads each study over SFTP (see the module doc)."""

    type = "sftp"

    def __init__(self, name: str, options: Mapping[str, Any], project_file: Path) -> None:
        super().__init__(name, options, project_file)
        self.host = str(options["host"])
        self.port = int(options.get("port", 22))
        self.username = str(options["username"])
        self.key_file = resolve(project_file, str(options["key_file"]))
        self.known_hosts = resolve(project_file, str(options["known_hosts"]))
        self.root = PurePosixPath(str(options["path"]))
        self.layout = Layout.from_options(options)
        self.connect_timeout = float(options.get("connect_timeout", 15))
        self.auth_timeout = float(options.get("auth_timeout", 30))
        self.io_timeout = float(options.get("io_timeout", 60))

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def send(self, batch: StudyBatch, already: frozenset[str], confirm: Confirm) -> None:
        plan = self.layout.plan(batch)
        plan.refuse(already, confirm)
        if not plan.files:
            return
        with self._session() as remote:
            remote.require_root(self.name)
            entries = []
            for placed in plan.files:
                uid = placed.instance.sop_instance_uid
                if uid in already:
                    entries.append(digest(placed))
                    continue
                entries.append(remote.put(placed, plan.study / placed.path))
                confirm(InstanceResult(uid, True))
            manifest = Manifest.read(remote.read(plan.study / MANIFEST_JSON), batch)
            manifest = manifest.merged(entries)
            remote.write(plan.study / MD5SUMS, manifest.md5sums())
            remote.write(plan.study / MANIFEST_JSON, manifest.to_json())

    def verify(self, batch: StudyBatch) -> str | None:
        """The remote manifest lists the batch's files, each with the listed remote size."""
        plan = self.layout.plan(batch)
        try:
            with self._session() as remote:
                data = remote.read(plan.study / MANIFEST_JSON)
                if data is None:
                    return f"no {MANIFEST_JSON} in the remote study folder"
                manifest = Manifest.read(data, batch)
                return manifest.problems(plan, lambda path: remote.size(plan.study / path))
        except DeliveryError as exc:
            return str(exc)

    @contextmanager
    def _session(self) -> Iterator[_Remote]:
        """A connected, authenticated SFTP session; network errors become DeliveryError."""
        client = self._connect()
        try:
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(self.io_timeout)  # type: ignore[union-attr]
            yield _Remote(sftp, self.root)
        except _NETWORK_ERRORS as exc:
            raise DeliveryError(f"sftp to {self.server} broke off: {why(exc)}") from exc
        finally:
            client.close()

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_Refuse())
        try:
            # Only this file: no system or user known_hosts, and nothing is ever written back.
            client.get_host_keys().load(str(self.known_hosts))
            key = paramiko.PKey.from_path(self.key_file)
        except (OSError, paramiko.SSHException) as exc:
            raise DeliveryError(
                f"destination {self.name}: cannot read key_file or known_hosts: {why(exc)}"
            ) from exc
        try:
            client.connect(
                self.host,
                self.port,
                username=self.username,
                pkey=key,
                allow_agent=False,
                look_for_keys=False,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.auth_timeout,
                channel_timeout=self.io_timeout,
            )
        except _NETWORK_ERRORS as exc:
            client.close()
            raise self._connect_error(exc) from exc
        except BaseException:
            client.close()
            raise
        return client

    def _connect_error(self, exc: Exception) -> DeliveryError:
        """The DeliveryError an operator can act on, for a failed connect."""
        if isinstance(exc, paramiko.BadHostKeyException):
            return DeliveryError(
                f"the host key of {self.server} differs from the one in known_hosts; refused"
                " (the server's key changed, or this is not the server)"
            )
        if isinstance(exc, _UnknownHost):
            return DeliveryError(
                f"{known_hosts_name(self.host, self.port)} is not in the known_hosts file;"
                " refused (add its key after checking its fingerprint)"
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return DeliveryError(
                f"{self.server} refused the key of user '{self.username}' (check key_file"
                " and the server's authorized_keys)"
            )
        return DeliveryError(f"cannot connect to {self.server}: {why(exc)}")

    @classmethod
    def check(
        cls, options: Mapping[str, Any], file: Path, base_path: JsonPath
    ) -> list[ConfigIssue]:
        """The layouts, the key file, and the known_hosts file's entry for the server."""
        issues = check_file_options(options, file, base_path)
        found = [
            ("key_file", _key_problem(resolve(file, str(options["key_file"])))),
            (
                "known_hosts",
                _known_hosts_problem(
                    resolve(file, str(options["known_hosts"])),
                    known_hosts_name(str(options["host"]), int(options.get("port", 22))),
                ),
            ),
        ]
        for key, message in found:
            if message:
                issues.append(ConfigIssue(file, None, format_path((*base_path, key)), message))
        return issues


def _readable_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"expected a file, found nothing at {path}"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}"
    return None


def _key_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable private key: unreadable, encrypted, open to others."""
    problem = _readable_problem(path)
    if problem:
        return problem
    try:
        paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        return f"{path} is encrypted; fiona runs unattended and needs a key without passphrase"
    except (OSError, paramiko.SSHException, ValueError) as exc:
        return f"{path} is not a private key fiona can read ({why(exc)})"
    if path.stat().st_mode & 0o077:
        return f"{path} is readable by other users; chmod 600 it"
    return None


def _known_hosts_problem(path: Path, name: str) -> str | None:
    """Why ``path`` does not pin the key of server ``name`` (``[host]:port`` form)."""
    problem = _readable_problem(path)
    if problem:
        return problem
    try:
        entry = paramiko.HostKeys(str(path)).lookup(name)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        return f"cannot read {path} as a known_hosts file ({why(exc)})"
    if not entry:
        return (
            f"no key for {name} in {path}; add the server's key (ssh-keyscan, then compare its"
            " fingerprint with the server's)"
        )
    return None
