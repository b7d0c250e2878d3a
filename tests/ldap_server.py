"""A real OpenLDAP ``slapd`` for the portal's directory logins, on free loopback ports.

Everything it uses is thrown away with its work folder: a ``slapd.conf`` (mdb database under the
suffix ``dc=fiona,dc=test``, the ``memberof`` overlay so user entries carry ``memberOf`` as Active
Directory's do), the database, the pid file and the log (``-d stats``: one line per bind and
search, which the tests read). Synthetic people and groups are loaded with ``ldapadd`` after
the start, their passwords hashed by ``slappasswd`` ({SSHA}). Anonymous users may only bind:
searching needs the service account, as in most hospitals' Active Directory. With
``tls=(cert, key)``, it also serves ldaps:// and StartTLS with that certificate.

The Debian package (``slapd``) may start a system slapd on port 389 when installed; nothing here
uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers import PeerMissing, free_port, wait_for_port

__all__ = ["GROUPS", "PEOPLE", "SUFFIX", "LdapServer"]

SUFFIX = "dc=fiona,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
SERVICE_DN = f"cn=svc-fiona,ou=services,{SUFFIX}"
#: Synthetic people: uid -> password (none of them real).
PEOPLE = {
    "ada": "ada-secret-password-1",
    "carl": "carl-secret-password-2",
    "dora": "dora-secret-password-3",
    "nobody": "nobody-secret-password-4",
    "alpha1": "alpha1-secret-password-5",
}
#: Groups (cn under ou=groups) -> members (uids).
GROUPS = {
    "fiona-admins": ["ada"],
    "fiona-coord-alpha": ["carl", "alpha1"],
    "fiona-viewers": ["dora"],
    "fiona-phi": ["ada", "dora"],
    "canteen": ["nobody", "carl"],
}
SERVICE_PASSWORD = "svc-fiona-secret-password"
_ROOT_PASSWORD = "root-secret-password-for-tests"
_SCHEMAS = ("core", "cosine", "inetorgperson", "nis")


def _binary(name: str, candidates: tuple[str, ...]) -> str:
    for path in (*candidates, shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise PeerMissing(f"{name} is not installed (Debian: apt-get install slapd ldap-utils)")


def person_dn(uid: str) -> str:
    return f"uid={uid},ou=people,{SUFFIX}"


def group_dn(cn: str) -> str:
    return f"cn={cn},ou=groups,{SUFFIX}"


@dataclass
class LdapServer:
    """``slapd -d stats`` on 127.0.0.1 (ldap:// on :attr:`port`, ldaps:// on :attr:`tls_port`
    when started with certificates)."""

    work_dir: Path
    tls: tuple[Path, Path] | None = None  # (certificate, key), PEM
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "slapd.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 30.0) -> LdapServer:
        slapd = _binary("slapd", ("/usr/sbin/slapd",))
        ldapadd = _binary("ldapadd", ("/usr/bin/ldapadd",))
        slappasswd = _binary("slappasswd", ("/usr/sbin/slappasswd",))
        schemas = Path("/etc/ldap/schema")
        if not (schemas / "inetorgperson.schema").is_file():
            raise PeerMissing(f"OpenLDAP's schemas are not in {schemas} (apt-get install slapd)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "db").mkdir(exist_ok=True)
        config = self.work_dir / "slapd.conf"
        config.write_text(self._config(schemas, _hash(slappasswd, _ROOT_PASSWORD)))
        urls = self.url + (f" {self.ldaps_url}" if self.tls else "")
        log = self.log_path.open("ab")
        # -d: stay in the foreground and log (stats: connections, binds, searches) to stderr.
        self.proc = subprocess.Popen(
            [slapd, "-f", str(config), "-h", urls, "-d", "stats"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, timeout, self.proc)
        self.add(self._entries(slappasswd), ldapadd)
        return self

    def _config(self, schemas: Path, root_hash: str) -> str:
        lines = [f"include {schemas / name}.schema" for name in _SCHEMAS]
        lines += [
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "moduleload memberof",
            f"pidfile {self.work_dir / 'slapd.pid'}",
            f"argsfile {self.work_dir / 'slapd.args'}",
            # As Active Directory may: a bind with a DN and no password is an anonymous bind
            # that succeeds. fiona must never send one (tests/test_ldap.py checks it does not).
            "allow bind_anon_cred",
        ]
        if self.tls:
            cert, key = self.tls
            lines += [f"TLSCertificateFile {cert}", f"TLSCertificateKeyFile {key}"]
        lines += [
            "database mdb",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOT_DN}"',
            f"rootpw {root_hash}",
            f"directory {self.work_dir / 'db'}",
            "maxsize 16777216",
            "overlay memberof",
            "access to attrs=userPassword by self write by anonymous auth by * none",
            "access to * by users read by * none",
        ]
        return "\n".join(lines) + "\n"

    def _entries(self, slappasswd: str) -> str:
        def block(*lines: str) -> str:
            return "\n".join(lines) + "\n\n"

        out = block(f"dn: {SUFFIX}", "objectClass: dcObject", "objectClass: organization",
                    "o: fiona test", "dc: fiona")  # fmt: skip
        for ou in ("people", "groups", "services"):
            out += block(f"dn: ou={ou},{SUFFIX}", "objectClass: organizationalUnit", f"ou: {ou}")
        out += block(f"dn: {SERVICE_DN}", "objectClass: organizationalRole",
                     "objectClass: simpleSecurityObject", "cn: svc-fiona",
                     f"userPassword: {_hash(slappasswd, SERVICE_PASSWORD)}")  # fmt: skip
        for uid, password in PEOPLE.items():
            out += block(f"dn: {person_dn(uid)}", "objectClass: inetOrgPerson", f"uid: {uid}",
                         f"cn: Test {uid}", f"sn: {uid}",
                         f"userPassword: {_hash(slappasswd, password)}")  # fmt: skip
        for cn, members in GROUPS.items():
            out += block(f"dn: {group_dn(cn)}", "objectClass: groupOfNames", f"cn: {cn}",
                         *[f"member: {person_dn(m)}" for m in members])  # fmt: skip
        return out

    def add(self, ldif: str, ldapadd: str | None = None) -> None:
        """Load ``ldif`` as the directory's manager (``ldapadd``)."""
        self._as_manager(ldapadd or _binary("ldapadd", ("/usr/bin/ldapadd",)), ldif)

    def modify(self, ldif: str) -> None:
        """Apply the changes in ``ldif`` as the directory's manager (``ldapmodify``)."""
        self._as_manager(_binary("ldapmodify", ("/usr/bin/ldapmodify",)), ldif)

    def _as_manager(self, tool: str, ldif: str) -> None:
        done = subprocess.run(
            [tool, "-x", "-H", self.url, "-D", ROOT_DN, "-w", _ROOT_PASSWORD],
            input=ldif.encode(), capture_output=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _hash(slappasswd: str, password: str) -> str:
    """``{SSHA}...`` of ``password`` (salted SHA-1, slapd's default scheme)."""
    done = subprocess.run(
        [slappasswd, "-h", "{SSHA}", "-T", "/dev/stdin"],
        input=password.encode(), capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout.decode().strip()
