"""The PDU reader over real loopback TCP: PDUs come whole and separate however the bytes arrive."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from engine.net.transport import PduReader, PduTooLong


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (sender, receiver)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield sender, receiver
    sender.close()
    receiver.close()


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxL", kind, len(body)) + body


def send_in_chunks(sock: socket.socket, data: bytes, sizes: list[int]) -> threading.Thread:
    """Send ``data`` in chunks of the given sizes (cycled), from a thread."""

    def run() -> None:
        pos, n = 0, 0
        while pos < len(data):
            size = sizes[n % len(sizes)]
            sock.sendall(data[pos : pos + size])
            pos += size
            n += 1

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_pdus_sent_in_one_write_are_read_one_by_one(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    bodies = [b"command" * 30, bytes(range(256)) * 40, b"", b"last"]
    sender.sendall(b"".join(pdu(0x04, body) for body in bodies) + pdu(0x05, b"\0\0\0\0"))
    reader = PduReader(receiver)
    for body in bodies:
        assert reader.read() == (0x04, bytearray(body))
    assert reader.read() == (0x05, bytearray(4))


def test_headers_and_bodies_split_anywhere_still_come_whole(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    big = bytes(n % 251 for n in range(3_000_000))  # larger than the read-ahead buffer
    stream = pdu(0x04, b"first") + pdu(0x04, big) + pdu(0x04, b"after the big one")
    thread = send_in_chunks(sender, stream, [1, 3, 7, 65_537, 100_000])
    reader = PduReader(receiver)
    first, second, third = reader.read(), reader.read(), reader.read()
    thread.join()
    assert first == (0x04, bytearray(b"first"))
    assert second[0] == 0x04 and second[1] == big
    assert third == (0x04, bytearray(b"after the big one"))


def test_each_body_is_its_own_buffer(pair: tuple[socket.socket, socket.socket]) -> None:
    # The receiver keeps views of data PDU bodies until the message is complete.
    sender, receiver = pair
    sender.sendall(pdu(0x04, b"A" * 100) + pdu(0x04, b"B" * 100))
    reader = PduReader(receiver)
    _, first = reader.read()
    view = memoryview(first)[10:20]
    _, second = reader.read()
    assert bytes(view) == b"A" * 10
    assert second == b"B" * 100


def test_a_body_over_the_limit_is_refused_before_it_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    sender.sendall(struct.pack(">BxL", 0x04, 10_000_000))  # announces 10 MB, sends none
    with pytest.raises(PduTooLong) as caught:
        PduReader(receiver).read(limit=1 << 20)
    assert (caught.value.length, caught.value.limit) == (10_000_000, 1 << 20)


@pytest.mark.parametrize("cut", [0, 3, 6, 50])
def test_a_peer_closing_inside_a_pdu_is_end_of_file(
    pair: tuple[socket.socket, socket.socket], cut: int
) -> None:
    sender, receiver = pair
    sender.sendall(pdu(0x04, b"x" * 100)[:cut])
    sender.close()
    with pytest.raises(EOFError):
        PduReader(receiver).read()


def test_a_deadline_bounds_a_read_however_slowly_the_bytes_trickle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    import time

    sender, receiver = pair
    stop = threading.Event()

    def trickle() -> None:  # one byte every 50 ms of a 10 KB PDU: 8 minutes in all
        for byte in pdu(0x01, bytes(10_000)):
            if stop.wait(0.05):
                return
            sender.sendall(bytes([byte]))

    thread = threading.Thread(target=trickle)
    thread.start()
    reader = PduReader(receiver)
    receiver.settimeout(5)  # no single read waits this long
    reader.deadline = time.monotonic() + 1.0
    try:
        with pytest.raises(TimeoutError):
            reader.read()
    finally:
        stop.set()
        thread.join()


def test_a_body_claiming_4_gib_is_not_allocated_before_it_arrives(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    import tracemalloc

    sender, receiver = pair
    sender.sendall(struct.pack(">BxL", 0x04, 0xFFFFFFFF) + bytes(100_000))
    sender.close()
    tracemalloc.start()
    try:
        with pytest.raises(EOFError):
            PduReader(receiver).read()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
