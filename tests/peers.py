"""Real peers for tests and benchmarks: dcmtk binaries, free ports, a ``fiona serve`` process.

pynetdicom installs Python apps named ``storescu``/``echoscu``/``storescp`` that can shadow
dcmtk's on PATH (pyenv shims do), so dcmtk is looked up by asking each candidate its version.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class PeerMissing(RuntimeError):
    """A required external peer (a dcmtk binary) is not installed."""


def dcmtk(name: str) -> str:
    """Absolute path of dcmtk's ``name`` (storescu, echoscu, storescp, dcmdump...)."""
    candidates = [f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    found = shutil.which(name)
    if found:
        candidates.append(found)
    for path in candidates:
        if not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in out.lower():
            return path
    raise PeerMissing(f"dcmtk's {name} is not installed (Debian: apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    host: str = "127.0.0.1",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def nodelay_env() -> dict[str, str]:
    """Environment for dcmtk tools with Nagle off (dcmtk reads TCP_NODELAY)."""
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class FionaServer:
    """``fiona serve`` as a subprocess on a free loopback port, logging to a file."""

    data_dir: Path
    projects_dir: Path
    port: int = field(default_factory=free_port)
    ae_title: str = "FIONA"
    config: Path | None = None
    bind: str = "127.0.0.1"
    #: The web portal's port; 0 (the default here) turns it off, None leaves it to the config.
    web_port: int | None = 0
    #: More arguments of ``fiona serve`` (such as ``--sweep``).
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: The checkout whose ``engine`` runs (bench/scale.py's ``--baseline`` runs an older one).
    repo: Path = REPO
    #: Words run before the command (tests/netns.py: ``ip netns exec NAME``, which execs it:
    #: the process is fiona's own).
    prefix: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> FionaServer:
        args = [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            "--data",
            str(self.data_dir),
            "--projects",
            str(self.projects_dir),
            "--port",
            str(self.port),
            "--ae-title",
            self.ae_title,
            "--bind",
            self.bind,
        ]
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.web_port is not None:
            args += ["--web-port", str(self.web_port)]
        args += self.extra_args
        if self.log_path is None:  # two servers on one port and data dir set their own
            self.log_path = self.data_dir.parent / f"fiona-serve-{self.port}.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, *args], cwd=self.repo, stdout=log, stderr=subprocess.STDOUT
        )
        host = self.bind if self.bind not in ("0.0.0.0", "") else "127.0.0.1"
        wait_for_port(self.port, timeout, self.proc, host)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def send_raw_c_store(
    port: int,
    dataset_bytes: bytes,
    *,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.4",
    sop_instance: str = "1.2.826.0.1.3680043.8.498.1",
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    calling_ae: str = "RAWSCU",
    called_ae: str = "FIONA",
) -> int:
    """Send ``dataset_bytes`` as they are in one C-STORE; return the response status.

    dcmtk's storescu refuses to send files it cannot parse, so bad input reaches the receiver
    through this pynetdicom client instead: a real association over a real socket, with the
    dataset bytes put on the wire unexamined.
    """
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association was not accepted")
    # Pause the association's reactor as pynetdicom's own send_c_store does, or the reactor
    # takes the response off the queue before we read it.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        req = C_STORE()
        req.MessageID = 1
        req.Priority = 2
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.DataSet = BytesIO(dataset_bytes)
        context = assoc.accepted_contexts[0]
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        if rsp is None:
            raise ConnectionError("no C-STORE response")
        return int(rsp.Status)
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def archived_path(data_dir: Path, ds: Any) -> Path:
    """Where fiona archives the instance ``ds`` (a pydicom Dataset) under ``data_dir``."""
    return (
        data_dir
        / "archive"
        / ds.StudyInstanceUID
        / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.dcm"
    )


def dataset_part(file_bytes: bytes) -> bytes:
    """The bytes of a Part 10 file after its preamble and file meta group."""
    if file_bytes[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    # (0002,0000) File Meta Information Group Length: explicit VR LE 'UL', value at 140.
    group_length = int.from_bytes(file_bytes[140:144], "little")
    return file_bytes[144 + group_length :]


@dataclass
class OrthancServer:
    """Orthanc (Debian package) on free loopback ports with a temp config and storage."""

    work_dir: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    ae_title: str = "ORTHANC"
    #: A Lua script Orthanc runs (its callbacks: ``OnStoredInstance``, ``ReceivedInstanceFilter``).
    lua: str = ""
    #: More configuration, merged over the defaults below.
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> OrthancServer:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not os.access(binary, os.X_OK):
            raise PeerMissing("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "fiona-test",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            # Queries (a dicom destination's verify_count) only from AEs it knows, as a PACS.
            "DicomModalities": {"fiona": ["FIONA", "127.0.0.1", 104]},
            "Plugins": [],
        }
        if self.lua:
            script = self.work_dir / "fiona-test.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        config.update(self.extra)
        path = self.work_dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = (self.work_dir / "orthanc.log").open("ab")
        # Orthanc uses dcmtk's network layer, which leaves Nagle on unless TCP_NODELAY is set.
        self.proc = subprocess.Popen(
            [binary, str(path)], stdout=log, stderr=subprocess.STDOUT, env=nodelay_env()
        )
        wait_for_port(self.dicom_port, timeout, self.proc)
        wait_for_port(self.http_port, timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class StorescpServer:
    """dcmtk's ``storescp`` on a free loopback port, writing what it receives to ``out_dir``.

    ``args`` are extra storescp options (``+B`` to write data sets exactly as received, ``+xi``
    to accept Implicit VR Little Endian only, ``+tls key cert`` ...). ``nodelay`` sets dcmtk's
    TCP_NODELAY variable (Nagle off). storescp accepts any called AE title; it names each file
    ``<modality prefix>.<SOP Instance UID>``. Its log goes to ``<out_dir>.log``.
    """

    out_dir: Path
    args: tuple[str, ...] = ()
    nodelay: bool = True
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> StorescpServer:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1" if self.nodelay else "0"}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-od", str(self.out_dir), *self.args, str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_for_port(self.port, timeout, self.proc)
        return self

    @property
    def log_path(self) -> Path:
        return self.out_dir.with_name(self.out_dir.name + ".log")

    def files(self) -> list[Path]:
        """The files received so far, by name."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> StorescpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class DcmqrscpServer:
    """dcmtk's ``dcmqrscp`` (an image archive: C-STORE, C-FIND, C-MOVE, C-GET) on a free
    loopback port, configured in ``work_dir``. It is strict where Orthanc is lenient: a
    called AE title it does not serve is rejected, series queries must name their study.
    ``peers`` are (AE title, port) of move destinations on 127.0.0.1."""

    work_dir: Path
    ae_title: str = "DCMQR"
    port: int = field(default_factory=free_port)
    peers: tuple[tuple[str, int], ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> DcmqrscpServer:
        db = self.work_dir / "db"
        db.mkdir(parents=True, exist_ok=True)
        hosts = "".join(f"{ae.lower()} = ({ae}, 127.0.0.1, {port})\n" for ae, port in self.peers)
        config = self.work_dir / "dcmqrscp.cfg"
        config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            f"HostTable BEGIN\n{hosts}HostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {db} RW (1000, 1024mb) ANY\nAETable END\n"
        )
        log = (self.work_dir / "dcmqrscp.log").open("ab")
        self.proc = subprocess.Popen(
            [dcmtk("dcmqrscp"), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=nodelay_env(),
        )
        wait_for_port(self.port, timeout, self.proc)
        return self

    def store(self, *paths: Path) -> None:
        """Load files (or folders of them, recursively) with dcmtk's storescu."""
        self.load(self.ae_title, self.port, *paths)

    @staticmethod
    def load(ae_title: str, port: int, *paths: Path) -> None:
        """Send files (or folders of them, recursively) to any SCP on 127.0.0.1 with storescu."""
        subprocess.run(
            [dcmtk("storescu"), "-aec", ae_title, "+sd", "+r", "127.0.0.1", str(port)]
            + [str(p) for p in paths],
            check=True,
            capture_output=True,
            env=nodelay_env(),
            timeout=120,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
