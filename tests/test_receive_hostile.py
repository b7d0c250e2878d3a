"""Hostile and faulty input to a running `fiona serve`: mismatched and deeply nested datasets,
oversized and never-ending PDUs and messages, and slow clients holding association slots.

Each attack comes over a real socket (pynetdicom's client putting bytes on the wire as they
are, or a raw socket speaking the upper layer by hand); after each, a real dcmtk client must
still be served.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests import synth
from tests.dbutil import connect_index
from tests.peers import FionaServer, dataset_part, free_port, send_raw_c_store
from tests.test_header import nest_sequences
from tests.test_metrics import scrape, value
from tests.test_receive import echo, store
from tests.test_tls import tls_files  # noqa: F401  (a fixture)

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def index_rows(server: FionaServer, sql: str) -> list[tuple[object, ...]]:
    with connect_index(server.data_dir / "index.sqlite") as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def mr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic 64x64 MR instance, explicit VR little endian."""
    spec = synth.make_study_spec(13)
    (ds,) = synth.make_study(spec, [synth.MR_SERIES["localizer"]])[:1]
    return synth.write_dataset(ds, tmp_path_factory.mktemp("mr") / "mr.dcm")


def test_mismatched_sop_class_and_instance_are_quarantined_with_0xA900(
    echoscu: str, fiona: FionaServer, mr_file: Path
) -> None:
    ds = pydicom.dcmread(mr_file, stop_before_pixels=True)
    assert ds.SOPClassUID == MR
    body = dataset_part(mr_file.read_bytes())
    # An MR dataset on a CT presentation context, announced with its own instance UID.
    assert send_raw_c_store(fiona.port, body, sop_class=CT, sop_instance=ds.SOPInstanceUID) == (
        0xA900
    )
    # The right context, but the command names another instance than the dataset holds.
    other = "1.2.826.0.1.3680043.8.498.99"
    assert send_raw_c_store(fiona.port, body, sop_class=MR, sop_instance=other) == 0xA900
    assert echo(echoscu, fiona).returncode == 0
    rows = index_rows(fiona, "SELECT reason, detail FROM quarantine ORDER BY reason")
    assert [r[0] for r in rows] == ["sop_class_mismatch", "sop_instance_mismatch"]
    assert "presentation context" in str(rows[0][1]) and "Affected SOP Instance" in str(rows[1][1])
    assert index_rows(fiona, "SELECT count(*) FROM instances") == [(0,)]
    # The matching C-STORE is still a plain success.
    ok = send_raw_c_store(fiona.port, body, sop_class=MR, sop_instance=ds.SOPInstanceUID)
    assert ok == 0x0000
    assert index_rows(fiona, "SELECT sop_instance_uid FROM instances") == [(ds.SOPInstanceUID,)]


def test_deeply_nested_sequences_are_unparseable_without_a_traceback(
    echoscu: str, fiona: FionaServer, mr_file: Path
) -> None:
    ds = pydicom.dcmread(mr_file, stop_before_pixels=True)
    nested = nest_sequences(mr_file.read_bytes(), 300)
    status = send_raw_c_store(
        fiona.port, dataset_part(nested), sop_class=MR, sop_instance=ds.SOPInstanceUID
    )
    assert status == 0xC210
    assert echo(echoscu, fiona).returncode == 0
    assert index_rows(fiona, "SELECT reason, detail FROM quarantine") == [
        ("unparseable", "sequences nested deeper than 64 levels")
    ]
    log = fiona.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert fiona.alive()


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxL", kind, len(body)) + body


# --------------------------------------------------------------------------- raw upper layer


def associate_rq(calling_ae: str = "RAWSCU", sop_class: str = MR) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``sop_class`` in explicit VR little endian as context 1."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    from engine.net.upper import our_user_items

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = "FIONA"
    context = build_context(sop_class, ["1.2.840.10008.1.2.1"])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    primitive.user_information = our_user_items(16384)[:2]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body; (0, b"") when the server closed the connection."""
    header = recv_exactly(sock, 6)
    if len(header) < 6:
        return 0, b""
    kind, length = struct.unpack(">BxL", header)
    return kind, recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def raw_association(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A socket with an association accepted on it (context 1: MR image storage)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    sock.sendall(associate_rq())
    kind, _ = read_pdu(sock)
    assert kind == 0x02, f"association not accepted (PDU type 0x{kind:02X})"
    return sock


def c_store_command(sop_instance: str = "1.2.826.0.1.3680043.8.498.7") -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian) announcing a data set."""

    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, elem, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    body = b"".join(
        (
            element(0x0002, uid(MR)),
            element(0x0100, struct.pack("<H", 0x0001)),
            element(0x0110, struct.pack("<H", 1)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0x0000)),
            element(0x1000, uid(sop_instance)),
        )
    )
    return element(0x0000, struct.pack("<L", len(body))) + body


def p_data(control: int, value: bytes, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU holding one PDV (``control``: bit 0 command, bit 1 last fragment)."""
    return pdu(0x04, struct.pack(">LBB", len(value) + 2, context_id, control) + value)


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set), VmRSS and Threads of process ``pid`` from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def serve_with(
    tmp_path: Path, projects: Path, site_yaml: str, web_port: int | None = 0
) -> FionaServer:
    """``fiona serve`` with ``site_yaml``; the web off (``web_port`` 0), or as the file's
    ``web`` section says (None)."""
    site = tmp_path / "site.yaml"
    site.write_text(site_yaml)
    return FionaServer(tmp_path / "data", projects, config=site, web_port=web_port).start()


GIB = 1 << 30
MIB = 1 << 20


def response_status(body: bytes) -> int:
    """The Status (0000,0900) of the command in a P-DATA-TF body holding one PDV."""
    command = body[6:]
    pos = 0
    while pos < len(command):
        _, elem, length = struct.unpack_from("<HHL", command, pos)
        if elem == 0x0900:
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    raise AssertionError("no status in the response")


@pytest.mark.parametrize("site_yaml", ["{}\n", "max_pdu: 0\n"], ids=["default", "max_pdu_0"])
def test_pdus_claiming_4_gib_cost_no_memory(
    tmp_path: Path, storescu: str, empty_projects: Path, mr_file: Path, site_yaml: str
) -> None:
    server = serve_with(tmp_path, empty_projects, site_yaml)
    try:
        assert server.proc is not None
        before = memory_kib(server.proc.pid)
        attackers = [raw_association(server.port) for _ in range(2)]
        for sock in attackers:
            # A P-DATA-TF header claiming 0xFFFFFFFF bytes, then a little of its body.
            sock.sendall(struct.pack(">BxL", 0x04, 0xFFFFFFFF) + bytes(64 * 1024))
        if site_yaml.startswith("max_pdu: 0"):
            # Nothing advertised to enforce: the body is read as it comes, 4 MiB of it here.
            for sock in attackers:
                sock.sendall(bytes(4 * MIB))
                sock.close()
        else:
            for sock in attackers:
                assert read_pdu(sock)[0] in (0x07, 0)  # A-ABORT (or closed) before the body
                sock.close()
            assert "PDU of 4294967295 bytes exceeds 1048576" in server.log_text()
        sent = store(storescu, server, [mr_file])
        assert sent.returncode == 0, sent.stderr
        after = memory_kib(server.proc.pid)
        assert after["VmHWM"] - before["VmHWM"] < 100 * 1024, (before, after)
        assert server.alive() and "Traceback" not in server.log_text()
    finally:
        server.stop()


def test_a_data_set_that_never_ends_is_refused_past_max_instance_mb(
    tmp_path: Path, storescu: str, empty_projects: Path, mr_file: Path
) -> None:
    status_port = free_port()
    server = serve_with(
        tmp_path,
        empty_projects,
        f"limits:\n  max_instance_mb: 8\nweb:\n  enabled: true\n  port: {status_port}\n",
        web_port=None,
    )
    try:
        assert server.proc is not None
        before = memory_kib(server.proc.pid)
        sock = raw_association(server.port)
        sock.sendall(p_data(0x03, c_store_command()))
        chunk = p_data(0x00, bytes(MIB - 64))  # 1 MiB fragments, none of them the last
        for _ in range(160):
            sock.sendall(chunk)
        during = memory_kib(server.proc.pid)
        sock.sendall(p_data(0x02, b"\0" * 64))  # the last fragment, at last
        kind, body = read_pdu(sock)
        assert kind == 0x04 and response_status(body) == 0xA700
        sock.sendall(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
        sock.close()
        sent = store(storescu, server, [mr_file])
        assert sent.returncode == 0, sent.stderr
        after = memory_kib(server.proc.pid)
        # 160 MiB sent; at most the 8 MiB limit and a PDU are ever held.
        assert during["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, during)
        assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)
        assert "over 8388608 bytes" in server.log_text()
        assert index_rows(server, "SELECT count(*) FROM instances") == [(1,)]
        # Refused by the network layer, not the handler: the metrics count it all the same.
        _, samples = scrape(status_port)
        assert value(samples, "fiona_instances_rejected_total", status="0xA700") == 1
    finally:
        server.stop()


class Slowloris:
    """Clients that connect from ``source`` and send ``request`` (an A-ASSOCIATE-RQ unless
    given) one byte at a time, one byte per client every ``interval`` seconds, from one thread,
    until stopped."""

    def __init__(
        self, port: int, source: str, count: int, interval: float, request: bytes = b""
    ) -> None:
        self.request = request or associate_rq()
        self.interval = interval
        self.socks = [
            socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
            for _ in range(count)
        ]
        self.sent = [0] * count
        self.closed = [False] * count
        self._stop = threading.Event()
        self._drip()  # the first byte of each now
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        for n, sock in enumerate(self.socks):
            if self.closed[n] or self.sent[n] >= len(self.request):
                continue
            try:
                sock.sendall(self.request[self.sent[n] : self.sent[n] + 1])
                self.sent[n] += 1
            except OSError:
                self.closed[n] = True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drip()

    def refused(self) -> int:
        """How many the server answered (A-ASSOCIATE-RJ) or closed; read without waiting."""
        count = 0
        for n, sock in enumerate(self.socks):
            if not self.closed[n]:
                try:
                    sock.setblocking(False)
                    data = sock.recv(64)
                    self.closed[n] = not data or data[0] in (0x03, 0x07)
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed[n] = True
            count += self.closed[n]
        return count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


def test_a_real_sender_gets_through_while_slowloris_clients_are_connected(
    storescu: str, fiona: FionaServer, mr_file: Path
) -> None:
    assert fiona.proc is not None
    threads_before = memory_kib(fiona.proc.pid)["Threads"]
    attack = Slowloris(fiona.port, "127.0.0.2", count=40, interval=2.0)
    try:
        # Connections over the per-address limit (8 by default) are refused at once, by the
        # accepting thread: no thread each.
        for _ in range(100):
            if attack.refused() >= 32:
                break
            time.sleep(0.1)
        assert attack.refused() == 32
        # 8 association threads, and room for the scheduler's own workers: not 40 more.
        assert memory_kib(fiona.proc.pid)["Threads"] < threads_before + 24
        sent = store(storescu, fiona, [mr_file])
        assert sent.returncode == 0, sent.stderr
        assert attack.refused() == 32  # the 8 allowed are still there, trickling
        assert index_rows(fiona, "SELECT count(*) FROM instances") == [(1,)]
        assert "connection from 127.0.0.2 refused" in fiona.log_text()
    finally:
        attack.stop()


def _logged(server: FionaServer, line: str, timeout: float = 10.0) -> bool:
    """Whether ``line`` reaches the server's log within ``timeout`` s: the client can see the
    connection closed a moment before the server's log line is written."""
    deadline = time.monotonic() + timeout
    while line not in server.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_association_set_up_has_one_deadline_however_slow_the_bytes(
    tmp_path: Path, echoscu: str, empty_projects: Path
) -> None:
    server = serve_with(tmp_path, empty_projects, "timeouts:\n  acse: 2\n")
    try:
        # One byte every 0.1 s: no read ever waits 2 s, and the whole request takes 20 s.
        attack = Slowloris(server.port, "127.0.0.3", count=1, interval=0.1)
        try:
            while attack.refused() == 0 and attack.sent[0] < len(attack.request):
                time.sleep(0.1)
            assert attack.refused() == 1, "the server waited for the whole request"
            assert attack.sent[0] < len(attack.request)
        finally:
            attack.stop()
        assert _logged(server, "association set-up from 127.0.0.3 not complete within 2 s")
        assert echo(echoscu, server).returncode == 0
    finally:
        server.stop()


def client_hello() -> bytes:
    """The first flight of a TLS client (its ClientHello records), as it would go on the wire."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_a_tls_handshake_has_the_same_deadline(
    tmp_path: Path,
    empty_projects: Path,
    tls_files: tuple[Path, Path],  # noqa: F811  (the fixture imported above)
) -> None:
    key, cert = tls_files
    site = f"tls:\n  enabled: true\n  cert_file: {cert}\n  key_file: {key}\ntimeouts:\n  acse: 2\n"
    server = serve_with(tmp_path, empty_projects, site)
    try:
        hello = client_hello()
        attack = Slowloris(server.port, "127.0.0.4", count=1, interval=0.1, request=hello)
        try:
            while attack.refused() == 0 and attack.sent[0] < len(hello):
                time.sleep(0.1)
            assert attack.refused() == 1, "the server waited for the whole ClientHello"
            assert attack.sent[0] < len(hello)
        finally:
            attack.stop()
        assert _logged(server, "association set-up from 127.0.0.4 not complete within 2 s")
    finally:
        server.stop()


def test_a_sender_over_the_limit_is_told_so_by_a_rejection(
    tmp_path: Path, echoscu: str, empty_projects: Path
) -> None:
    server = serve_with(tmp_path, empty_projects, "limits:\n  max_associations: 1\n")
    try:
        # The held connection must own the one slot when echoscu comes: at start the
        # heartbeat's own echo may hold it (the held connection is then refused at once), and
        # under load the accept loop may take the held connection after echoscu's.
        refused = None
        for _ in range(20):
            hold = socket.create_connection(
                ("127.0.0.1", server.port), timeout=0.5, source_address=("127.0.0.5", 0)
            )
            try:
                hold.recv(1)  # a refusal answers (A-ASSOCIATE-RJ) or closes at once
            except TimeoutError:
                refused = echo(echoscu, server)  # the held connection is still open
                if refused.returncode != 0:
                    break
            finally:
                hold.close()
            time.sleep(0.25)
        assert refused is not None, "the held connection never kept the slot"
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
        assert "connection from 127.0.0.1 refused" in server.log_text()
    finally:
        server.stop()


def test_a_command_set_that_never_ends_is_aborted(echoscu: str, fiona: FionaServer) -> None:
    sock = raw_association(fiona.port)
    try:
        chunk = p_data(0x01, bytes(16 * 1024))  # command fragments, none of them the last
        for _ in range(64):  # 1 MiB in all, if nothing stops it
            try:
                sock.sendall(chunk)
            except OSError:
                break
        kind, _ = read_pdu(sock)
        assert kind in (0x07, 0)  # A-ABORT, or closed
    finally:
        sock.close()
    assert "command set longer than 65536 bytes" in fiona.log_text()
    assert echo(echoscu, fiona).returncode == 0
