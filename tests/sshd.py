"""A real OpenSSH server for sftp destination tests: ``sshd`` on a free loopback port.

Everything it uses is thrown away with its work folder: a config file, an ed25519 host key, a
user key pair whose public half is the only authorized key, the pid file and the log. It logs
in the user running the tests (root in CI, hence ``PermitRootLogin prohibit-password``), by key
only, and serves sftp with ``internal-sftp``, so the sftp root of a test is a local folder the
test can read directly.

PAM: as root (CI) the server runs with ``UsePAM no``. An sshd started by an ordinary user
cannot read ``/etc/shadow``, and without PAM it then takes the account for locked and refuses
every login ("account is locked"); with ``UsePAM yes`` the system's PAM stack checks the account
instead (through its setgid helper), so that is what an ordinary user gets.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import PeerMissing, free_port, wait_for_port

__all__ = ["SshServer"]

#: Where Debian puts sshd; it must be started by absolute path (it re-executes itself).
_SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def _binary(name: str, candidates: tuple[str, ...] = ()) -> str:
    """Absolute path of ``name`` or PeerMissing."""
    for path in (*candidates, shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise PeerMissing(f"{name} is not installed (Debian: apt-get install openssh-server)")


def _keygen(ssh_keygen: str, path: Path, comment: str) -> Path:
    """A fresh unencrypted ed25519 key pair at ``path`` and ``path``.pub (mode 600)."""
    subprocess.run(
        [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


@dataclass
class SshServer:
    """OpenSSH ``sshd -D -e`` on 127.0.0.1 with throw-away keys under ``work_dir``."""

    work_dir: Path
    port: int = field(default_factory=free_port)
    user: str = field(default_factory=lambda: pwd.getpwuid(os.getuid()).pw_name)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host_key(self) -> Path:
        return self.work_dir / "ssh_host_ed25519_key"

    @property
    def user_key(self) -> Path:
        """The private key that may log in as :attr:`user`."""
        return self.work_dir / "user_ed25519_key"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "sshd.log"

    def start(self, timeout: float = 20.0) -> SshServer:
        sshd = _binary("sshd", _SSHD_CANDIDATES)
        keygen = _binary("ssh-keygen", ("/usr/bin/ssh-keygen",))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _keygen(keygen, self.host_key, "fiona-test-host")
        _keygen(keygen, self.user_key, "fiona-test-user")
        authorized = self.work_dir / "authorized_keys"
        shutil.copyfile(self.user_key.with_suffix(".pub"), authorized)
        if os.geteuid() == 0:
            # sshd running as root insists on its privilege separation folder.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        config = self.work_dir / "sshd_config"
        config.write_text(self._config(authorized))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for_port(self.port, timeout, self.proc)
        return self

    def _config(self, authorized: Path) -> str:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.work_dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no" if os.geteuid() == 0 else "UsePAM yes",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
        ]
        return "\n".join(lines) + "\n"

    def known_hosts_line(self) -> str:
        """This server's entry for a known_hosts file: ``[127.0.0.1]:PORT ssh-ed25519 ...``."""
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
