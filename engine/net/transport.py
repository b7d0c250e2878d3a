"""Socket tuning for accepted connections.

Scanners rarely set TCP_NODELAY. A sender with Nagle on holds its second small segment (the
data PDU after the command PDU) until our ACK arrives, and Linux delays ACKs by up to 40 ms: the
link then stalls at ~20 messages/s. Re-arming TCP_QUICKACK after every read makes us ACK at once,
whatever the peer does; TCP_NODELAY makes our own responses leave at once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_CHUNK = 1 << 20


def tune_accepted_socket(sock: socket.socket) -> Callable[[int], bytearray]:
    """Set TCP_NODELAY and keep-alive; return a ``recv(n)`` that reads exactly ``n`` bytes.

    The returned function reads into one buffer with large ``recv_into`` calls, re-arming
    TCP_QUICKACK after each, and returns fewer bytes only when the peer closed the connection.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        log.debug("could not tune socket: %s", exc)
    quickack = _QUICKACK

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], min(nr_bytes - got, _CHUNK))
            if quickack is not None:
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            if not n:
                break
            got += n
        view.release()
        if got < nr_bytes:
            del buf[got:]
        return buf

    return recv
