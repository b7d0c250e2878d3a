"""Socket tuning and PDU reading for DICOM connections (both directions).

Scanners rarely set TCP_NODELAY. A sender with Nagle on holds its second small segment (the
data PDU after the command PDU) until our ACK arrives, and Linux delays ACKs by up to 40 ms: the
link then stalls at ~20 messages/s. Re-arming TCP_QUICKACK after every read makes us ACK at once,
whatever the peer does; TCP_NODELAY makes our own responses leave at once.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

log = logging.getLogger(__name__)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_CHUNK = 1 << 20  # bytes per recv_into into a large body
_BUFFER = 1 << 16  # the read-ahead buffer: holds a command PDU and a small image's data PDU
PDU_HEADER = struct.Struct(">BxL")  # PDU type, reserved, body length (PS3.8 9.3)


def tune_accepted_socket(sock: socket.socket) -> None:
    """Set TCP_NODELAY and keep-alive on a connected socket (best effort)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        log.debug("could not tune socket: %s", exc)


class PduReader:
    """Reads whole PDUs (type, body) from a tuned socket with as few system calls as it can.

    Small PDUs (a command, a 64x64 image) are carved out of one buffered ``recv_into`` that
    takes whatever has arrived; the rest of a large body is read straight into the body's own
    buffer, never past it. TCP_QUICKACK is re-armed after every read (see the module doc).
    Each body is a fresh ``bytearray``, so callers may keep views of it. A body longer than
    :data:`_CHUNK` grows as its bytes arrive, so a header that claims gigabytes costs nothing
    until they come. ``deadline`` (a ``time.monotonic()`` value, or None) bounds every read
    until it is cleared: past it, :class:`TimeoutError`, however slowly the bytes trickle in.
    """

    def __init__(self, sock: socket.socket) -> None:
        tune_accepted_socket(sock)
        self.sock = sock
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self.deadline: float | None = None

    def read(self, limit: int = 0) -> tuple[int, bytearray]:
        """The next PDU's type and body. ``limit`` (bytes, 0 = none) bounds the body length:
        :class:`PduTooLong` is raised before it is read. :class:`EOFError` when the peer
        closes the connection before a whole PDU arrived."""
        self._buffer_at_least(6)
        pdu_type, length = PDU_HEADER.unpack_from(self._buf, self._start)
        if limit and length > limit:
            raise PduTooLong(length, limit)
        self._start += 6
        body = bytearray(min(length, max(_CHUNK, self._end - self._start)))
        have = min(length, self._end - self._start)
        body[:have] = self._view[self._start : self._start + have]
        self._start += have
        while have < length:
            if have == len(body):  # grow (at most doubling) only as the bytes arrive
                body.extend(bytes(min(have, length - have)))
            self._recv_exactly(memoryview(body)[have:])
            have = len(body)
        return pdu_type, body

    def _buffer_at_least(self, count: int) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + count > _BUFFER:  # move the unread tail to the front
            unread = self._end - self._start
            self._buf[:unread] = self._buf[self._start : self._end]
            self._start, self._end = 0, unread
        while self._end - self._start < count:
            got = self._recv_into(self._view[self._end :])
            if not got:
                raise EOFError("closed by the peer")
            self._end += got

    def _recv_exactly(self, view: memoryview) -> None:
        got, wanted = 0, len(view)
        while got < wanted:
            n = self._recv_into(view[got : got + _CHUNK])
            if not n:
                raise EOFError("closed by the peer")
            got += n

    def _recv_into(self, view: memoryview) -> int:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            self.sock.settimeout(remaining)
        n = self.sock.recv_into(view)
        if _QUICKACK is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return n


class PduTooLong(Exception):
    """A PDU announced a body longer than the reader's limit."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"PDU of {length} bytes exceeds {limit}")
        self.length = length
        self.limit = limit
