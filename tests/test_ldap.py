"""Portal logins through a directory (``web.ldap``), against a real OpenLDAP ``slapd``
(:mod:`tests.ldap_server`): first the directory client on its own (escaping, empty passwords,
failover, TLS, the service account's password file), then over real HTTP against a running
``fiona serve`` whose site config points at the slapd.

Each HTTP test that fails logins sends them from its own loopback address (127.0.0.N), so one
test's failures do not lock another's out; the test that stops the slapd comes last.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config.loader import load_site
from engine.config.model import LdapConfig, LdapRoleRule, LdapSearch
from engine.config.validate import run_validate
from engine.store.audit import AuditLog
from engine.store.users import Role
from engine.web.ldap import (
    Directory,
    Grant,
    Member,
    Rejected,
    Unavailable,
    escape_dn_value,
    escape_filter_value,
    grant_of,
)
from tests.dbutil import connect_index, on_postgresql
from tests.ldap_server import (
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SUFFIX,
    LdapServer,
    group_dn,
    person_dn,
)
from tests.peers import REPO, FionaServer, PeerMissing, free_port, wait_for_port
from tests.test_tls import need_peer_binary, tls_files  # noqa: F401  (tls_files: the fixture)

LOCAL_PASSWORD = "correct horse battery staple"
USER_FILTER = "(&(objectClass=inetOrgPerson)(uid={username}))"


def _started(server: LdapServer) -> LdapServer:
    """``server.start()``; a missing slapd skips locally and fails under CI (CI=true)."""
    try:
        return server.start()
    except PeerMissing as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


# -- the directory client against a real slapd ---------------------------------------------------


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LdapServer]:
    server = _started(LdapServer(tmp_path_factory.mktemp("slapd")))
    yield server
    server.stop()


@pytest.fixture
def config(slapd: LdapServer, tmp_path: Path) -> LdapConfig:
    """A service account that searches for the user; groups from ``memberOf``."""
    return LdapConfig(
        urls=(slapd.url,),
        role_map=(),
        bind_dn=SERVICE_DN,
        bind_password_file=_secret_file(tmp_path / "svc.pw", SERVICE_PASSWORD),
        user_search=LdapSearch(f"ou=people,{SUFFIX}", USER_FILTER),
        timeout=5,
    )


@pytest.mark.parametrize(
    ("value", "in_filter", "in_dn"),
    [
        ("carl", "carl", "carl"),
        ("*", r"\2a", "*"),
        ("*)(uid=*", r"\2a\29\28uid=\2a", r"*)(uid\=*"),
        ("a\\b", r"a\5cb", r"a\\b"),
        ("nul\0", r"nul\00", r"nul\00"),
        ("x,ou=services", "x,ou=services", r"x\,ou\=services"),
        ('a+b"<>;', 'a+b"<>;', r"a\+b\"\<\>\;"),
        ("#lead", "#lead", r"\#lead"),
        (" both ", " both ", r"\ both\ "),
    ],
)
def test_names_are_escaped_as_rfc_4515_and_4514_say(value: str, in_filter: str, in_dn: str) -> None:
    assert escape_filter_value(value) == in_filter
    assert escape_dn_value(value) == in_dn


def test_a_member_is_let_in_with_its_groups(config: LdapConfig) -> None:
    found = Directory(config).authenticate("carl", PEOPLE["carl"])
    assert isinstance(found, Member) and found.dn == person_dn("carl")
    assert {g.lower() for g in found.groups} == {group_dn("fiona-coord-alpha"), group_dn("canteen")}
    # The same with a DN template (no service account) and a group search.
    by_template = replace(
        config, bind_dn=None, bind_password_file=None, user_search=None,
        user_dn_template=f"uid={{username}},ou=people,{SUFFIX}",
        group_search=LdapSearch(f"ou=groups,{SUFFIX}", "(member={user_dn})"),
    )  # fmt: skip
    found = Directory(by_template).authenticate("dora", PEOPLE["dora"])
    assert isinstance(found, Member)
    assert sorted(found.groups) == [group_dn("fiona-phi"), group_dn("fiona-viewers")]


def test_a_wrong_password_or_an_unknown_user_is_rejected(config: LdapConfig) -> None:
    directory = Directory(config)
    assert isinstance(directory.authenticate("carl", PEOPLE["dora"]), Rejected)
    assert isinstance(directory.authenticate("zed", PEOPLE["dora"]), Rejected)


def test_a_filter_injection_finds_nobody(config: LdapConfig, slapd: LdapServer) -> None:
    """Unescaped, ``*)(uid=alpha1`` makes the search ``(&(...)(uid=*)(uid=alpha1))``: alpha1
    alone, whose password then lets the attacker in under a name that is not theirs."""
    directory = Directory(config)
    for name in ("*)(uid=alpha1", "alpha*", "*"):
        assert isinstance(directory.authenticate(name, PEOPLE["alpha1"]), Rejected), name
    assert r"(uid=\2A\29\28uid=alpha1)" in slapd.log_text()  # sent escaped


def test_an_empty_password_is_never_sent(config: LdapConfig, slapd: LdapServer) -> None:
    """The slapd takes a DN with an empty password as an anonymous bind that succeeds."""
    binds = slapd.log_text().count(f'BIND dn="{person_dn("ada")}"')
    no_search = replace(config, bind_dn=None, bind_password_file=None, user_search=None,
                        user_dn_template=f"uid={{username}},ou=people,{SUFFIX}")  # fmt: skip
    for directory in (Directory(config), Directory(no_search)):
        assert isinstance(directory.authenticate("ada", ""), Rejected)
    assert slapd.log_text().count(f'BIND dn="{person_dn("ada")}"') == binds


def test_a_dead_server_is_unavailable_and_the_next_one_is_tried(config: LdapConfig) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    down = Directory(replace(config, urls=(dead,))).authenticate("carl", PEOPLE["carl"])
    assert isinstance(down, Unavailable) and "127.0.0.1" in down.why
    assert PEOPLE["carl"] not in down.why
    failover = Directory(replace(config, urls=(dead, *config.urls)))
    assert isinstance(failover.authenticate("carl", PEOPLE["carl"]), Member)


def test_a_service_password_file_others_may_read_is_not_used(
    config: LdapConfig, tmp_path: Path
) -> None:
    assert config.bind_password_file is not None
    os.chmod(config.bind_password_file, 0o644)
    found = Directory(config).authenticate("carl", PEOPLE["carl"])
    assert isinstance(found, Unavailable) and "chmod 600" in found.why
    assert SERVICE_PASSWORD not in found.why
    wrong = replace(config, bind_password_file=_secret_file(tmp_path / "bad.pw", "not-it"))
    assert isinstance(Directory(wrong).authenticate("carl", PEOPLE["carl"]), Unavailable)


GROUP = f"ou=groups,{SUFFIX}"
COORD = Role.COORDINATOR


@pytest.mark.parametrize(
    ("groups", "grant"),
    [
        ([], None),
        (["cn=canteen," + GROUP], None),
        (["cn=phi," + GROUP], None),  # the phi grant alone is no role
        (["CN=Admins, OU=Groups, DC=fiona, DC=test"], Grant(Role.ADMIN, (), False)),
        (["cn=coord-a," + GROUP, "cn=coord-b," + GROUP], Grant(COORD, ("a", "b"), False)),
        (["cn=coord-a," + GROUP, "cn=view-c," + GROUP], Grant(COORD, ("a",), False)),
        (["cn=view-c," + GROUP, "cn=phi," + GROUP], Grant(Role.VIEWER, ("c",), True)),
        (["cn=view-c," + GROUP, "cn=view-all," + GROUP], Grant(Role.VIEWER, (), False)),
        (["cn=admins," + GROUP, "cn=coord-a," + GROUP], Grant(Role.ADMIN, (), False)),
        ([r"cn=coord-a\,x," + GROUP], None),  # a comma inside a name is not a separator
    ],
)
def test_groups_map_to_the_highest_role_and_its_projects(
    groups: list[str], grant: Grant | None
) -> None:
    role_map = (
        LdapRoleRule("cn=admins," + GROUP, "admin"),
        LdapRoleRule("cn=coord-a," + GROUP, "coordinator", ("a",)),
        LdapRoleRule("cn=coord-b," + GROUP, "coordinator", ("b",)),
        LdapRoleRule("cn=view-c," + GROUP, "viewer", ("c",)),
        LdapRoleRule("cn=view-all," + GROUP, "viewer"),
        LdapRoleRule("cn=phi," + GROUP, None, phi=True),
    )
    assert grant_of(tuple(groups), role_map) == grant


# -- fiona validate ----------------------------------------------------------------------------


def test_validate_checks_the_service_password_file_passwords_in_clear_and_projects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    projects = tmp_path / "projects"
    projects.mkdir()
    password_file = _secret_file(tmp_path / "svc.pw", SERVICE_PASSWORD, mode=0o644)
    ldap = {
        "url": "ldap://dc1.hospital.example ldap://dc2.hospital.example:389",
        "bind": {"dn": "svc-fiona@hospital.example", "password_file": "svc.pw"},
        "user_search": {"base": "OU=Staff,DC=hospital,DC=example",
                        "filter": "(&(objectClass=user)(sAMAccountName={username}))"},
        "role_map": [{"group": "CN=Fiona Admins,OU=Groups,DC=hospital,DC=example",
                      "role": "admin"},
                     {"group": "CN=Fiona Lung,OU=Groups,DC=hospital,DC=example",
                      "role": "coordinator", "projects": ["lung-ct", "lung-mr"]}],
    }  # fmt: skip
    (projects / "lung-ct.yaml").write_text("name: lung-ct\n")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"projects_dir": "projects", "web": {"ldap": ldap}}))
    loaded = load_site(site).web.ldap
    assert loaded is not None and loaded.bind_password_file == password_file  # next to the file
    assert loaded.urls == ("ldap://dc1.hospital.example", "ldap://dc2.hospital.example:389")
    assert run_validate([], site_path=site, projects_dir=projects) == 1
    out = capsys.readouterr().out
    assert "web.ldap.bind.password_file: " in out and f"chmod 600 {password_file}" in out
    assert "web.ldap.url: warning: ldap://dc1.hospital.example without start_tls" in out
    assert f"web.ldap.role_map[1].projects: warning: no project 'lung-mr' in {projects}" in out
    assert "'lung-ct' in" not in out
    assert SERVICE_PASSWORD not in out
    os.chmod(password_file, 0o600)
    assert run_validate([], site_path=site, projects_dir=projects) == 0
    assert "2 warnings" in capsys.readouterr().out
    (projects / "lung-mr.yaml").write_text("name: lung-mr\n")
    ldap["start_tls"] = True
    site.write_text(yaml.safe_dump({"projects_dir": "projects", "web": {"ldap": ldap}}))
    assert run_validate([], site_path=site, projects_dir=projects) == 0
    assert "warning" not in capsys.readouterr().out


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LdapServer, Path]]:
    """A slapd serving ldaps:// and StartTLS with a certificate for ``localhost`` (not for
    127.0.0.1) signed by a throw-away CA; the CA's file."""
    openssl = need_peer_binary("openssl")
    work = tmp_path_factory.mktemp("slapd-tls")
    names = ("ca.key", "ca.pem", "key.pem", "csr.pem", "cert.pem")
    ca_key, ca, key, csr, cert = (work / n for n in names)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "1", "-subj", "/CN=fiona test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=localhost")  # fmt: skip
    extensions = work / "san.cnf"
    extensions.write_text("subjectAltName=DNS:localhost\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(extensions))  # fmt: skip
    os.chmod(key, 0o644)  # slapd may run as another user than the files' owner
    server = _started(LdapServer(work / "slapd", tls=(cert, key)))
    yield server, ca
    server.stop()


def test_ldaps_and_starttls_with_the_sites_ca(
    tls_slapd: tuple[LdapServer, Path],
    tls_files: tuple[Path, Path],  # noqa: F811  (the fixture of tests/test_tls.py)
) -> None:
    server, ca = tls_slapd
    ldaps, ldap = (u.replace("127.0.0.1", "localhost") for u in (server.ldaps_url, server.url))
    base = LdapConfig(
        urls=(ldaps,), role_map=(), ca_file=ca, timeout=5,
        user_dn_template=f"uid={{username}},ou=people,{SUFFIX}",
    )  # fmt: skip
    for config in (base, replace(base, urls=(ldap,), start_tls=True)):
        assert isinstance(Directory(config).authenticate("ada", PEOPLE["ada"]), Member)
    # A CA that did not sign the directory's certificate, or a certificate for another name: no
    # password is sent, and the login page will say that the directory is not reachable.
    _, other_ca = tls_files
    starttls = replace(base, urls=(ldap,), start_tls=True)
    by_ip = {ldaps: server.ldaps_url, ldap: server.url}
    refused = [
        ("CERTIFICATE_VERIFY_FAILED", replace(base, ca_file=other_ca)),
        ("CERTIFICATE_VERIFY_FAILED", replace(starttls, ca_file=other_ca)),
        ("doesn't match", replace(base, urls=(by_ip[ldaps],))),
        ("doesn't match", replace(starttls, urls=(by_ip[ldap],))),
    ]
    for why, config in refused:
        found = Directory(config).authenticate("ada", PEOPLE["ada"])
        assert isinstance(found, Unavailable) and why in found.why, (config.urls, found)
    # Each of ada's two binds travelled encrypted (slapd's ssf: the strength of the channel).
    bind = rf'BIND dn="{person_dn("ada")}" mech=SIMPLE .*?\bssf=(\d+)'
    binds = re.findall(bind, server.log_text())
    assert len(binds) == 2 and all(int(ssf) >= 128 for ssf in binds), binds


# -- over HTTP: fiona serve with web.ldap ----------------------------------------------------------


@dataclass
class Portal:
    """The running service, its slapd and folders."""

    server: FionaServer
    slapd: LdapServer
    root: Path
    web_port: int

    def fiona(self, *argv: str) -> subprocess.CompletedProcess[str]:
        where = ["--config", str(self.root / "site.yaml"), "--data", str(self.root / "data"),
                 "--projects", str(self.root / "projects")]  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", "engine.cli", *argv, *where],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def user_row(self, name: str) -> tuple[Any, ...] | None:
        with connect_index(self.root / "data" / "index.sqlite") as db:
            row = db.execute(
                "SELECT role, phi, source, password_hash FROM users WHERE name = ?", (name,)
            ).fetchone()
            projects = [
                r[0]
                for r in db.execute(
                    "SELECT project FROM user_projects WHERE user = ? ORDER BY project", (name,)
                )
            ]
        return None if row is None else (*row, projects)

    def audit(self) -> list[dict[str, Any]]:
        return AuditLog(self.root / "data").entries()

    def secrets_leaked(self) -> list[str]:
        """Passwords of the directory found in the audit log, the service log or the index."""
        texts = [
            *(f.read_text() for f in (self.root / "data" / "audit").glob("*.jsonl")),
            self.server.log_text(),
        ]
        if on_postgresql():  # every text the users' and sessions' rows hold
            with connect_index(self.root / "data" / "index.sqlite") as db:
                for table in ("users", "web_sessions", "login_failures", "api_tokens"):
                    texts += [repr(r) for r in db.execute(f"SELECT * FROM {table}")]
        else:
            texts.append((self.root / "data" / "index.sqlite").read_bytes().decode("latin-1"))
        secrets = [*PEOPLE.values(), SERVICE_PASSWORD]
        return [s for s in secrets if any(s in t for t in texts)]


@dataclass
class Client:
    """A browser from loopback address ``source``: one cookie, ``Origin`` on every POST."""

    port: int
    source: str = "127.0.0.1"
    cookie: str = ""

    def go(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=60, source_address=(self.source, 0)
        )
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers |= {"Origin": f"http://127.0.0.1:{self.port}",
                        "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
        try:
            conn.request("POST" if form is not None else "GET", path, body, headers)
            answer = conn.getresponse()
            text = answer.read().decode()
            cookie = answer.getheader("Set-Cookie")
            if cookie:
                self.cookie = cookie.split(";")[0]
            return answer.status, text
        finally:
            conn.close()

    def login(self, name: str, password: str) -> tuple[int, str]:
        return self.go("/login", {"name": name, "password": password, "next": "/"})


def _site_ldap(slapd: LdapServer, password_file: Path) -> dict[str, Any]:
    groups = f"ou=groups,{SUFFIX}"
    return {
        "url": slapd.url,
        "timeout_seconds": 5,
        "bind": {"dn": SERVICE_DN, "password_file": str(password_file)},
        "user_search": {"base": f"ou=people,{SUFFIX}", "filter": USER_FILTER},
        "role_map": [
            {"group": "CN=fiona-admins, OU=groups, DC=fiona, DC=test", "role": "admin"},
            {"group": f"cn=fiona-coord-alpha,{groups}", "role": "coordinator",
             "projects": ["alpha"]},
            {"group": f"cn=fiona-viewers,{groups}", "role": "viewer", "projects": ["beta"]},
            {"group": f"cn=fiona-phi,{groups}", "phi": True},
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    root = tmp_path_factory.mktemp("ldap-portal")
    slapd = _started(LdapServer(root / "slapd"))
    projects = root / "projects"
    projects.mkdir()
    for name, aet in (("alpha", "MR1"), ("beta", "MR2")):
        doc = {"name": name, "routing": {"calling_ae": [aet]}, "pipeline": [{"step": "classify"}]}
        (projects / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    web_port = free_port()
    password_file = _secret_file(root / "svc.pw", SERVICE_PASSWORD)
    site = {"web": {"enabled": True, "port": web_port, "ldap": _site_ldap(slapd, password_file)}}
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    server = FionaServer(root / "data", projects, config=root / "site.yaml", web_port=None)
    try:
        server.start()
        wait_for_port(web_port, 30, server.proc)
        found = Portal(server, slapd, root, web_port)
        (root / "local.pw").write_text(LOCAL_PASSWORD + "\n")
        for argv in (("localadm", "--role", "admin"), ("alpha1", "--role", "viewer")):
            made = found.fiona("user", "add", *argv, "--password-file", str(root / "local.pw"))
            assert made.returncode == 0, made.stderr
        yield found
    finally:
        server.stop()
        slapd.stop()


def _is_admin(client: Client) -> bool:
    """Whether the session may open an admin-only page (a study's Assign form)."""
    status, _ = client.go("/studies/1.2.3.4/assign")
    return status != 403


def test_a_directory_admin_logs_in_as_admin(portal: Portal) -> None:
    ada = Client(portal.web_port)
    assert ada.login("Ada", PEOPLE["ada"])[0] == 303  # the directory ignores case; one row
    assert portal.user_row("ada") == ("admin", 1, "ldap", "", [])
    status, html = ada.go("/")
    assert status == 200 and "ada (admin, phi)" in html
    assert _is_admin(ada)
    assert any(e["event"] == "login" and e["user"] == "ada" for e in portal.audit())
    assert Client(portal.web_port).login("ada", PEOPLE["ada"])[0] == 303  # nothing changed
    grants = [e for e in portal.audit() if e["event"] == "user_directory_grants"]
    assert [(e["user"], e["role"], e["projects"], e["phi_grant"]) for e in grants] == [
        ("ada", "admin", [], True)
    ]
    listed = portal.fiona("user", "list")
    assert "from the directory (LDAP)" in listed.stdout and "ada" in listed.stdout
    # API tokens stay local.
    token = portal.fiona("user", "token", "ada")
    assert token.returncode == 1 and "API tokens are for local users" in token.stderr
    # Nor is a password set here: the directory's is the one.
    (portal.root / "new.pw").write_text("a new password of length\n")
    password = portal.fiona(
        "user", "password", "ada", "--password-file", str(portal.root / "new.pw")
    )
    assert password.returncode != 0 and "change the password there" in password.stderr
    assert f"log in through the directory at {portal.slapd.url}" in portal.server.log_text()
    assert portal.secrets_leaked() == []


def test_a_directory_coordinator_sees_only_its_projects(portal: Portal) -> None:
    carl = Client(portal.web_port)
    assert carl.login("carl", PEOPLE["carl"])[0] == 303
    assert portal.user_row("carl") == ("coordinator", 0, "ldap", "", ["alpha"])
    status, html = carl.go("/projects")
    assert status == 200 and 'id="p-alpha"' in html and 'id="p-beta"' not in html
    assert not _is_admin(carl)
    dora = Client(portal.web_port)
    assert dora.login("dora", PEOPLE["dora"])[0] == 303
    assert portal.user_row("dora") == ("viewer", 1, "ldap", "", ["beta"])  # phi: its own group


def test_no_role_a_wrong_or_empty_password_and_an_injection_are_refused_alike(
    portal: Portal,
) -> None:
    c = Client(portal.web_port, source="127.0.0.2")
    answers = [
        c.login("nobody", PEOPLE["nobody"]),  # in the directory, in no mapped group
        c.login("ada", PEOPLE["carl"]),
        c.login("ada", ""),
        c.login("*)(uid=alpha1", PEOPLE["alpha1"]),
    ]
    for status, html in answers:
        assert status == 401 and "wrong user name or password" in html
        assert 'id="logout"' not in html
    assert portal.user_row("nobody") is None
    refused = [e for e in portal.audit() if e["event"] == "login_refused"]
    assert any(e["user"] == "nobody" and e["why"] == "no role" for e in refused)
    failed = [e for e in portal.audit() if e["event"] == "login_failed"]
    assert len([e for e in failed if e["address"] == "127.0.0.2"]) == 3
    assert "Traceback" not in portal.server.log_text()
    assert portal.secrets_leaked() == []


def test_groups_are_read_again_at_each_login(portal: Portal) -> None:
    first = Client(portal.web_port, source="127.0.0.3")
    assert first.login("carl", PEOPLE["carl"])[0] == 303
    groups = f"ou=groups,{SUFFIX}"
    portal.slapd.modify(
        f"dn: cn=fiona-coord-alpha,{groups}\nchangetype: modify\n"
        f"delete: member\nmember: {person_dn('carl')}\n\n"
        f"dn: cn=fiona-viewers,{groups}\nchangetype: modify\n"
        f"add: member\nmember: {person_dn('carl')}\n"
    )
    again = Client(portal.web_port, source="127.0.0.3")
    assert again.login("carl", PEOPLE["carl"])[0] == 303
    assert portal.user_row("carl") == ("viewer", 0, "ldap", "", ["beta"])
    last = [e for e in portal.audit() if e["event"] == "user_directory_grants"][-1]
    assert (last["user"], last["role"], last["projects"]) == ("carl", "viewer", ["beta"])
    portal.slapd.modify(
        f"dn: cn=fiona-viewers,{groups}\nchangetype: modify\n"
        f"delete: member\nmember: {person_dn('carl')}\n"
    )
    assert Client(portal.web_port, source="127.0.0.3").login("carl", PEOPLE["carl"])[0] == 401
    assert portal.user_row("carl") is None  # and so its sessions ended
    assert first.go("/")[0] == 303  # to the login page


def test_a_local_user_is_checked_here_even_when_the_directory_knows_the_name(
    portal: Portal,
) -> None:
    searches = portal.slapd.log_text().count("(uid=alpha1)")
    c = Client(portal.web_port, source="127.0.0.4")
    assert c.login("alpha1", PEOPLE["alpha1"])[0] == 401  # the directory's password: no
    assert c.login("alpha1", LOCAL_PASSWORD)[0] == 303
    assert portal.user_row("alpha1")[:3] == ("viewer", 0, "local")  # type: ignore[index]
    assert Client(portal.web_port, source="127.0.0.4").login("localadm", LOCAL_PASSWORD)[0] == 303
    assert portal.slapd.log_text().count("(uid=alpha1)") == searches  # never asked


def test_a_directory_user_disabled_here_is_refused_without_asking_the_directory(
    portal: Portal,
) -> None:
    assert Client(portal.web_port, source="127.0.0.7").login("dora", PEOPLE["dora"])[0] == 303
    off = portal.fiona("user", "disable", "dora")
    assert off.returncode == 0, off.stderr
    binds = portal.slapd.log_text().count(f'BIND dn="{person_dn("dora")}"')
    status, html = Client(portal.web_port, source="127.0.0.7").login("dora", PEOPLE["dora"])
    assert status == 401 and "wrong user name or password" in html  # her groups still say yes
    assert portal.slapd.log_text().count(f'BIND dn="{person_dn("dora")}"') == binds
    refused = [e for e in portal.audit() if e["event"] == "login_refused"][-1]
    assert (refused["user"], refused["why"]) == ("dora", "disabled")
    assert portal.fiona("user", "enable", "dora").returncode == 0
    assert Client(portal.web_port, source="127.0.0.7").login("dora", PEOPLE["dora"])[0] == 303


def test_throttling_counts_directory_logins_too(portal: Portal) -> None:
    c = Client(portal.web_port, source="127.0.0.5")
    for _ in range(5):
        assert c.login("dora", "not dora's password")[0] == 401
    binds = portal.slapd.log_text().count(f'BIND dn="{person_dn("dora")}"')
    status, html = Client(portal.web_port, source="127.0.0.15").login("dora", PEOPLE["dora"])
    assert status == 429 and "too many failed logins" in html
    assert portal.slapd.log_text().count(f'BIND dn="{person_dn("dora")}"') == binds


def test_a_directory_that_is_down_gets_a_clear_message(portal: Portal) -> None:
    portal.slapd.stop()
    c = Client(portal.web_port, source="127.0.0.6")
    status, html = c.login("ada", PEOPLE["ada"])
    assert status == 503 and "directory (LDAP) is not reachable" in html
    log = portal.server.log_text()
    assert "login through the directory was not possible" in log and "Traceback" not in log
    refused = [e for e in portal.audit() if e["event"] == "login_refused"]
    assert refused[-1]["why"] == "directory not reachable" and refused[-1]["user"] == "ada"
    # Local users do not need the directory.
    assert c.login("localadm", LOCAL_PASSWORD)[0] == 303
    assert portal.secrets_leaked() == []
