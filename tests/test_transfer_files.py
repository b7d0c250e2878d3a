"""The file destinations (folder, zip, sftp) against real file systems and a real OpenSSH sshd.

A synthetic three-series study is delivered whole and as a first transfer plus a follow-up;
each delivered file must equal its source byte for byte, the manifest must list the right
checksums and ``md5sum -c MD5SUMS`` must pass (the sftp root is a local folder). Each instance
is confirmed only once its final name exists. Trust failures (unknown host, changed host key,
wrong user key) and a stopped server are DeliveryErrors without PHI; unsafe layout values
refuse the instances concerned and write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engine.transfer import DESTINATIONS
from engine.transfer.base import (
    DeliveryError,
    Destination,
    InstanceResult,
    OutgoingInstance,
    StudyBatch,
    destination_schema_file,
)
from engine.transfer.files import MANIFEST_JSON, MD5SUMS, Layout
from engine.transfer.folder import FolderDestination
from engine.transfer.sftp import SftpDestination
from engine.transfer.zip import ZipDestination
from tests import synth
from tests.outgoing import outgoing
from tests.peers import PeerMissing
from tests.sshd import SshServer

SUBJECT = "SUBJ0001"
SPEC = synth.make_study_spec(11)
SERIES = [synth.MR_SERIES["localizer"], synth.MR_SERIES["t2_tse"], synth.MR_SERIES["flair"]]


# --------------------------------------------------------------------------- fixtures


def _missing(exc: PeerMissing) -> None:
    """Skip locally, fail under CI (the same rule as conftest.need_peer)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(str(exc))
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[OutgoingInstance]:
    """The study's files as the outbox hands them over (three series, 27 instances)."""
    paths = synth.write_study(
        synth.make_study(SPEC, SERIES, size=32), tmp_path_factory.mktemp("study")
    )
    return [outgoing(path) for path in paths]


def batch(instances: list[OutgoingInstance], follow_up: int = 0, **changes: Any) -> StudyBatch:
    made = StudyBatch(
        transfer_id=1 + follow_up,
        project="neuro",
        study_uid=synth.study_uid(SPEC),
        subject=SUBJECT,
        event="baseline",
        follow_up=follow_up,
        instances=tuple(instances),
    )
    return replace(made, **changes)


def series_split(sources: list[OutgoingInstance]) -> tuple[list[OutgoingInstance], ...]:
    """(first two series, third series): a first transfer and its follow-up."""
    last = sources[-1].series_uid
    return (
        [i for i in sources if i.series_uid != last],
        [i for i in sources if i.series_uid == last],
    )


class Confirmations:
    """The ``confirm`` callback; checks at each call that the file is already in place."""

    def __init__(self, in_place: Any = None) -> None:
        self.results: list[InstanceResult] = []
        self.in_place = in_place

    def __call__(self, result: InstanceResult) -> None:
        if result.ok and self.in_place is not None:
            assert self.in_place(result.sop_instance_uid), "confirmed before it was in place"
        self.results.append(result)

    def ok(self) -> set[str]:
        return {r.sop_instance_uid for r in self.results if r.ok}

    def failed(self) -> dict[str, str]:
        return {r.sop_instance_uid: r.detail for r in self.results if not r.ok}


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    server = SshServer(tmp_path / "sshd")
    try:
        server.start()
    except PeerMissing as exc:
        _missing(exc)
    yield server
    server.stop()


def sftp_options(server: SshServer, root: Path, known_hosts: str | None = None) -> dict[str, Any]:
    hosts = server.work_dir / "known_hosts"
    hosts.write_text(server.known_hosts_line() if known_hosts is None else known_hosts)
    return {
        "type": "sftp",
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.user,
        "key_file": str(server.user_key),
        "known_hosts": str(hosts),
        "path": str(root),
        "connect_timeout": 5,
        "auth_timeout": 5,
        "io_timeout": 10,
    }


def make(
    kind: str,
    tmp_path: Path,
    server: SshServer | None = None,
    known_hosts: str | None = None,
    **options: Any,
) -> Destination:
    """A destination of ``kind`` delivering below ``tmp_path/out`` (a local folder); an sftp
    one trusts ``known_hosts`` (the server's own line by default)."""
    root = tmp_path / "out"
    root.mkdir(exist_ok=True)
    base = {"type": kind}
    if kind == "sftp" and server is not None:
        base = sftp_options(server, root, known_hosts)
    base.setdefault("path", str(root))
    return DESTINATIONS[kind]("dest", {**base, **options}, tmp_path / "project.yaml")


def study_dir(root: Path, b: StudyBatch) -> Path:
    return root / b.project / b.subject / b.study_uid


# --------------------------------------------------------------------------- checks


def assert_delivered(
    study: Path, instances: list[OutgoingInstance], layout: str = "series"
) -> None:
    """Each instance's file equals its source; the manifest lists it with right checksums."""
    manifest = json.loads((study / MANIFEST_JSON).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    for inst in instances:
        rel = (
            f"{inst.series_uid}/{inst.sop_instance_uid}.dcm"
            if layout == "series"
            else f"{inst.sop_instance_uid}.dcm"
        )
        assert (study / rel).read_bytes() == inst.path.read_bytes()
        assert listed[rel]["size"] == inst.size
    assert manifest["file_count"] == len(manifest["files"])
    assert manifest["total_bytes"] == sum(f["size"] for f in manifest["files"])
    run = subprocess.run(["md5sum", "--quiet", "-c", MD5SUMS], cwd=study, capture_output=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _sha256_ok(study, manifest)


def _sha256_ok(study: Path, manifest: dict[str, Any]) -> bool:
    import hashlib

    return all(
        hashlib.sha256((study / f["path"]).read_bytes()).hexdigest() == f["sha256"]
        for f in manifest["files"]
    )


def assert_no_phi(text: str) -> None:
    for value in (SPEC.patient_name, SPEC.patient_id, SPEC.accession_number, SPEC.birth_date):
        assert value not in text


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".part") or p.name.startswith(".tmp")]


# --------------------------------------------------------------------------- folder


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        (None, "series"),
        ("{study_layout}/{series_uid}", "series"),
        ("{project}/{subject}/{study_uid}/{series_uid}", "series"),
        ("{study_layout}", "flat"),
    ],
)
def test_folder_delivers_a_study(
    tmp_path: Path, sources: list[OutgoingInstance], layout: str | None, shape: str
) -> None:
    dest = make("folder", tmp_path, **({} if layout is None else {"layout": layout}))
    b = batch(sources)
    study = study_dir(tmp_path / "out", b)
    confirm = Confirmations(lambda uid: any(study.rglob(f"{uid}.dcm")))
    dest.send(b, frozenset(), confirm)
    assert confirm.ok() == {i.sop_instance_uid for i in sources}
    assert_delivered(study, sources, shape)
    assert dest.verify(b) is None
    assert leftovers(tmp_path / "out") == []
    manifest = (study / MANIFEST_JSON).read_text()
    assert_no_phi(manifest)
    assert json.loads(manifest)["subject"] == SUBJECT


def test_folder_layout_by_series_number(tmp_path: Path, sources: list[OutgoingInstance]) -> None:
    dest = make("folder", tmp_path, layout="{study_layout}/{series_number}_{modality}")
    b = batch(sources)
    dest.send(b, frozenset(), Confirmations())
    study = study_dir(tmp_path / "out", b)
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == ["1_MR", "2_MR", "3_MR"]
    run = subprocess.run(["md5sum", "--quiet", "-c", MD5SUMS], cwd=study, capture_output=True)
    assert run.returncode == 0


def test_folder_skips_instances_already_confirmed(
    tmp_path: Path, sources: list[OutgoingInstance]
) -> None:
    dest = make("folder", tmp_path)
    b = batch(sources)
    dest.send(b, frozenset(), Confirmations())
    study = study_dir(tmp_path / "out", b)
    before = {p: p.stat().st_ino for p in study.rglob("*.dcm")}
    already = frozenset(i.sop_instance_uid for i in sources[:10])
    confirm = Confirmations()
    dest.send(b, already, confirm)
    # Confirmed ones are left alone; the others are written again (same bytes, new inode).
    assert confirm.ok() == {i.sop_instance_uid for i in sources[10:]}
    for inst in sources:
        path = study / inst.series_uid / f"{inst.sop_instance_uid}.dcm"
        assert (path.stat().st_ino == before[path]) == (inst.sop_instance_uid in already)
    assert_delivered(study, sources)


def test_folder_follow_up_merges_the_manifest(
    tmp_path: Path, sources: list[OutgoingInstance]
) -> None:
    first, later = series_split(sources)
    dest = make("folder", tmp_path)
    dest.send(batch(first), frozenset(), Confirmations())
    study = study_dir(tmp_path / "out", batch(first))
    assert json.loads((study / MANIFEST_JSON).read_text())["file_count"] == len(first)
    dest.send(batch(later, follow_up=1), frozenset(), Confirmations())
    assert json.loads((study / MANIFEST_JSON).read_text())["file_count"] == len(sources)
    assert_delivered(study, sources)
    assert dest.verify(batch(later, follow_up=1)) is None


def test_folder_refuses_a_foreign_manifest(tmp_path: Path, sources: list[OutgoingInstance]) -> None:
    b = batch(sources)
    study = study_dir(tmp_path / "out", b)
    study.mkdir(parents=True)
    (study / MANIFEST_JSON).write_text('{"format": "something else"}')
    with pytest.raises(DeliveryError, match="not a fiona manifest"):
        make("folder", tmp_path).send(b, frozenset(), Confirmations())
    assert (study / MANIFEST_JSON).read_text() == '{"format": "something else"}'


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_missing_root_is_a_delivery_error(
    tmp_path: Path, sources: list[OutgoingInstance], kind: str
) -> None:
    dest = DESTINATIONS[kind]("dest", {"type": kind, "path": "gone"}, tmp_path / "project.yaml")
    with pytest.raises(DeliveryError, match="does not exist") as err:
        dest.send(batch(sources), frozenset(), Confirmations())
    assert not (tmp_path / "gone").exists()
    assert synth.study_uid(SPEC) not in str(err.value)


def test_folder_verify_finds_a_truncated_file(
    tmp_path: Path, sources: list[OutgoingInstance]
) -> None:
    dest = make("folder", tmp_path)
    b = batch(sources)
    dest.send(b, frozenset(), Confirmations())
    first = sources[0]
    victim = study_dir(tmp_path / "out", b) / first.series_uid / f"{first.sop_instance_uid}.dcm"
    victim.write_bytes(b"short")
    assert dest.verify(b) == "1 file(s) missing or of another size"


# --------------------------------------------------------------------------- unsafe values


@pytest.mark.parametrize("kind", ["folder", "zip"])
@pytest.mark.parametrize("subject", ["../escape", "a/b", ".hidden", "x" * 200, "name with space"])
def test_unsafe_study_value_refuses_every_instance(
    tmp_path: Path, sources: list[OutgoingInstance], kind: str, subject: str
) -> None:
    dest = make(kind, tmp_path)
    confirm = Confirmations()
    dest.send(batch(sources, subject=subject), frozenset(), confirm)
    assert confirm.ok() == set()
    assert set(confirm.failed()) == {i.sop_instance_uid for i in sources}
    assert all("{subject}" in d and subject not in d for d in confirm.failed().values())
    assert sorted(tmp_path.iterdir()) == [tmp_path / "out"]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_unsafe_series_value_refuses_that_series_only(
    tmp_path: Path, sources: list[OutgoingInstance], kind: str
) -> None:
    bad_series = sources[0].series_uid
    instances = [replace(i, modality="M/R") if i.series_uid == bad_series else i for i in sources]
    dest = make(kind, tmp_path, layout="{study_layout}/{modality}_{series_number}")
    confirm = Confirmations()
    dest.send(batch(instances), frozenset(), confirm)
    refused = {i.sop_instance_uid for i in sources if i.series_uid == bad_series}
    assert set(confirm.failed()) == refused
    assert confirm.ok() == {i.sop_instance_uid for i in sources} - refused
    assert all("{modality}" in detail for detail in confirm.failed().values())
    assert not any(p.name == "M" for p in (tmp_path / "out").rglob("*"))


# --------------------------------------------------------------------------- zip


def test_zip_delivers_one_archive_per_transfer(
    tmp_path: Path, sources: list[OutgoingInstance]
) -> None:
    first, later = series_split(sources)
    dest = make("zip", tmp_path)
    out = tmp_path / "out"
    stem = f"neuro_{SUBJECT}_{synth.study_uid(SPEC)}"
    confirm = Confirmations(lambda uid: (out / f"{stem}.zip").exists())
    dest.send(batch(first), frozenset(), confirm)
    assert confirm.ok() == {i.sop_instance_uid for i in first}
    dest.send(batch(later, follow_up=1), frozenset(), Confirmations())
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.zip", f"{stem}_followup1.zip"]
    for name, part in ((f"{stem}.zip", first), (f"{stem}_followup1.zip", later)):
        with zipfile.ZipFile(out / name) as archive:
            assert archive.testzip() is None
            assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
            archive.extractall(tmp_path / "unzipped" / name)
        study = study_dir(tmp_path / "unzipped" / name, batch(part))
        assert_delivered(study, part)  # that archive's files only
        manifest = json.loads((study / MANIFEST_JSON).read_text())
        assert manifest["file_count"] == len(part)
        assert_no_phi(json.dumps(manifest))
    assert leftovers(out) == []


def test_zip_writes_nothing_when_all_are_confirmed(
    tmp_path: Path, sources: list[OutgoingInstance]
) -> None:
    dest = make("zip", tmp_path)
    confirm = Confirmations()
    dest.send(batch(sources), frozenset(i.sop_instance_uid for i in sources), confirm)
    assert confirm.results == []
    assert list((tmp_path / "out").iterdir()) == []


def test_zip_retry_holds_every_instance(tmp_path: Path, sources: list[OutgoingInstance]) -> None:
    """A retry after a crash between the rename and the last confirmation."""
    dest = make("zip", tmp_path)
    already = frozenset(i.sop_instance_uid for i in sources[:5])
    confirm = Confirmations()
    dest.send(batch(sources), already, confirm)
    assert confirm.ok() == {i.sop_instance_uid for i in sources[5:]}
    (archive,) = (tmp_path / "out").iterdir()
    with zipfile.ZipFile(archive) as z:
        assert sum(n.endswith(".dcm") for n in z.namelist()) == len(sources)


# --------------------------------------------------------------------------- sftp


def test_sftp_delivers_a_study(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    first, later = series_split(sources)
    dest = make("sftp", tmp_path, sshd)
    study = study_dir(tmp_path / "out", batch(first))
    confirm = Confirmations(lambda uid: any(study.rglob(f"{uid}.dcm")))
    dest.send(batch(first), frozenset(), confirm)
    assert confirm.ok() == {i.sop_instance_uid for i in first}
    assert_delivered(study, first)
    assert dest.verify(batch(first)) is None
    dest.send(batch(later, follow_up=1), frozenset(), Confirmations())
    assert_delivered(study, sources)  # the follow-up merged into the manifest
    assert json.loads((study / MANIFEST_JSON).read_text())["file_count"] == len(sources)
    assert dest.verify(batch(later, follow_up=1)) is None
    assert leftovers(tmp_path / "out") == []
    assert_no_phi((study / MANIFEST_JSON).read_text())


def test_sftp_skips_instances_already_confirmed(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd)
    b = batch(sources)
    already = frozenset(i.sop_instance_uid for i in sources[:10])
    confirm = Confirmations()
    dest.send(b, already, confirm)
    assert confirm.ok() == {i.sop_instance_uid for i in sources[10:]}
    study = study_dir(tmp_path / "out", b)
    sent = {p.stem for p in study.rglob("*.dcm")}
    assert sent == {i.sop_instance_uid for i in sources[10:]}
    # The manifest covers the whole study, the instances sent before included.
    manifest = json.loads((study / MANIFEST_JSON).read_text())
    assert manifest["file_count"] == len(sources)


def test_sftp_verify_finds_a_truncated_file(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd)
    b = batch(sources)
    dest.send(b, frozenset(), Confirmations())
    study = study_dir(tmp_path / "out", b)
    (study / sources[3].series_uid / f"{sources[3].sop_instance_uid}.dcm").write_bytes(b"x")
    assert dest.verify(b) == "1 file(s) missing or of another size"
    (study / MANIFEST_JSON).unlink()
    assert dest.verify(b) == f"no {MANIFEST_JSON} in the remote study folder"


def _refused(dest: Destination, sources: list[OutgoingInstance], match: str) -> str:
    confirm = Confirmations()
    with pytest.raises(DeliveryError, match=match) as err:
        dest.send(batch(sources), frozenset(), confirm)
    assert confirm.results == []
    message = str(err.value)
    assert synth.study_uid(SPEC) not in message
    assert_no_phi(message)
    return message


def test_sftp_refuses_a_changed_host_key(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    other = SshServer(tmp_path / "other")
    other.work_dir.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other.host_key)], check=True
    )
    line = f"[127.0.0.1]:{sshd.port} " + " ".join(
        other.host_key.with_suffix(".pub").read_text().split()[:2]
    )
    dest = make("sftp", tmp_path, sshd, known_hosts=line + "\n")
    _refused(dest, sources, "differs from the one in known_hosts")
    assert list((tmp_path / "out").iterdir()) == []


def test_sftp_refuses_an_unknown_host(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd, known_hosts="")
    _refused(dest, sources, r"is not in the known_hosts file")
    assert (sshd.work_dir / "known_hosts").read_text() == ""  # nothing learnt


def test_sftp_refuses_a_wrong_user_key(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    dest = make("sftp", tmp_path, sshd, key_file=str(wrong))
    _refused(dest, sources, "refused the key of user")


def test_sftp_server_stopped(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd)
    sshd.stop()
    _refused(dest, sources, "cannot connect to 127.0.0.1")
    assert dest.verify(batch(sources)) is not None


def test_sftp_missing_remote_root(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd, path=str(tmp_path / "gone"))
    _refused(dest, sources, "remote folder 'path' does not exist")
    assert not (tmp_path / "gone").exists()


def test_sftp_unsafe_value_writes_nothing(
    tmp_path: Path, sources: list[OutgoingInstance], sshd: SshServer
) -> None:
    dest = make("sftp", tmp_path, sshd)
    confirm = Confirmations()
    dest.send(batch(sources, subject="../../escape"), frozenset(), confirm)
    assert len(confirm.failed()) == len(sources)
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_sftp_rename_without_posix_rename(tmp_path: Path, sshd: SshServer) -> None:
    """Servers without OpenSSH's posix-rename: remove the old file, then rename."""
    dest = make("sftp", tmp_path, sshd)
    assert isinstance(dest, SftpDestination)
    with dest._session() as remote:
        remote.posix_rename = False
        remote.write(PurePosixPath("a/b/c.txt"), b"one")
        remote.write(PurePosixPath("a/b/c.txt"), b"two")
    assert (tmp_path / "out/a/b/c.txt").read_bytes() == b"two"
    assert leftovers(tmp_path / "out") == []


# --------------------------------------------------------------------------- config


def _key_pair(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    hosts = tmp_path / "known_hosts"
    blob = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    hosts.write_text(f"[sftp.example.org]:2222 {blob}\nplain.example.org {blob}\n")
    return key, hosts


CHECK_CASES = [
    # (type, options changed, path of the issue or None, words in its message)
    ("folder", {}, None, ""),
    ("folder", {"layout": "{study_layout}/{serie_uid}"}, "layout", "unknown field {serie_uid}"),
    ("folder", {"layout": "{project}/{series_uid}"}, "layout", "expected the study folder first"),
    ("folder", {"layout": "{study_layout}/../x"}, "layout", "'..'"),
    ("zip", {"study_layout": "{project}/{series_uid}"}, "study_layout", "may use only"),
    ("zip", {"study_layout": "{project}/{subject}"}, "study_layout", "{study_uid}"),
    ("folder", {"path": "afile"}, "path", "found a file"),
    ("sftp", {}, None, ""),
    ("sftp", {"host": "plain.example.org", "port": 22}, None, ""),
    ("sftp", {"port": 22}, "known_hosts", "no key for sftp.example.org"),
    ("sftp", {"host": "plain.example.org"}, "known_hosts", "no key for [plain.example.org]:2222"),
    ("sftp", {"known_hosts": "nowhere"}, "known_hosts", "found nothing"),
    ("sftp", {"key_file": "nowhere"}, "key_file", "found nothing"),
    ("sftp", {"key_file": "afile"}, "key_file", "not a private key"),
    ("sftp", {"key_file": "open_key"}, "key_file", "readable by other users"),
    ("sftp", {"layout": "{study_layout}/{bogus}"}, "layout", "unknown field {bogus}"),
]


@pytest.mark.parametrize(("kind", "changes", "where", "words"), CHECK_CASES)
def test_check(
    tmp_path: Path, kind: str, changes: dict[str, Any], where: str | None, words: str
) -> None:
    key, hosts = _key_pair(tmp_path)
    (tmp_path / "afile").write_text("not a folder, not a key")
    shutil.copyfile(key, tmp_path / "open_key")
    (tmp_path / "open_key").chmod(0o644)
    options: dict[str, Any] = {"type": kind, "path": "out"}
    if kind == "sftp":
        options |= {
            "host": "sftp.example.org",
            "port": 2222,
            "username": "fiona",
            "key_file": key.name,
            "known_hosts": hosts.name,
            "path": "/data",
        }
    options |= changes
    assert not list(Draft202012Validator(_fragment(kind)).iter_errors(options))
    issues = DESTINATIONS[kind].check(options, tmp_path / "project.yaml", ("destinations", "d"))
    if where is None:
        assert issues == []
        return
    assert [i.path for i in issues] == [f"destinations.d.{where}"]
    assert words in issues[0].message


def test_layout_constructor_validates() -> None:
    with pytest.raises(ValueError, match="layout: unknown field"):
        Layout.from_options({"layout": "{study_layout}/{nope}"})
    with pytest.raises(ValueError, match="study_layout"):
        FolderDestination("d", {"path": "/x", "study_layout": "{subject}"}, Path("/p.yaml"))


def _fragment(kind: str) -> dict[str, Any]:
    return dict(json.loads(destination_schema_file(kind).read_text()))


@pytest.mark.parametrize("kind", ["folder", "zip", "sftp"])
def test_schema_fragment(kind: str) -> None:
    schema = _fragment(kind)
    Draft202012Validator.check_schema(schema)
    assert schema["properties"]["type"] == {
        "description": schema["properties"]["type"]["description"],
        "const": kind,
    }
    assert all("description" in p for p in schema["properties"].values())
    assert schema["additionalProperties"] is False
    typo = {"type": kind, "path": "/x", "layuot": "{study_layout}"}
    assert any("layuot" in e.message for e in Draft202012Validator(schema).iter_errors(typo))


def test_registered() -> None:
    for kind, cls in (
        ("folder", FolderDestination),
        ("zip", ZipDestination),
        ("sftp", SftpDestination),
    ):
        assert DESTINATIONS[kind] is cls
