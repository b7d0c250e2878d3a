"""Socket tuning for the receiver, applied per association when its connection opens.

Scanners rarely set TCP_NODELAY. A sender with Nagle on holds its second small segment (the
data PDU after the command PDU) until our ACK arrives, and Linux delays ACKs by up to 40 ms: the
link then stalls at ~20 messages/s. Re-arming TCP_QUICKACK after every read makes us ACK at once,
whatever the peer does; TCP_NODELAY makes our own responses leave at once.

pynetdicom reads PDUs 4 KiB at a time into a growing bytearray; reading into one buffer of the
PDU's size with large ``recv_into`` calls costs far fewer Python steps on 0.5 MB images. Only
this association's socket wrapper is changed (an instance attribute), not the library.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Seconds the DUL reactor sleeps when idle (pynetdicom's default is 1 ms per loop).
DUL_IDLE_SLEEP = 0.0002
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_CHUNK = 1 << 20


def _fast_recv(assoc_socket: Any) -> Callable[[int], bytearray]:
    def recv(nr_bytes: int) -> bytearray:
        sock = assoc_socket.socket
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], min(nr_bytes - got, _CHUNK))
            if _QUICKACK is not None:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            if not n:
                # Connection closed: return what was read, as pynetdicom's own recv does.
                del view
                return buf[:got]
            got += n
        return buf

    return recv


def tune_server_socket(assoc: Any) -> None:
    """Tune an accepted association's socket (best effort: failures are only logged)."""
    try:
        assoc_socket = assoc.dul.socket
        sock = assoc_socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        assoc_socket.recv = _fast_recv(assoc_socket)
        assoc.dul._run_loop_delay = DUL_IDLE_SLEEP
    except (AttributeError, OSError) as exc:
        log.debug("could not tune socket: %s", exc)
