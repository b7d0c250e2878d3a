"""Network namespaces for cluster tests: each node a host of its own, on this machine only.

:class:`NetnsLab` makes a Linux bridge on the host and ``count`` namespaces (``ip netns add``),
each joined to the bridge by a veth pair: the host is ``<net>.1``, namespace ``i`` is
``<net>.<11 + i>``, all in one /24. PostgreSQL, Orthanc and the senders stay on the host,
listening on ``<net>.1`` besides 127.0.0.1; each node runs in its namespace
(``ip netns exec``) bound to its own address.

The /24 is link-local (169.254.0.0/16, RFC 3927): never forwarded by a router, so nothing of
the test can leave this machine, and no site network uses it for services. One not overlapping
any route of the host is chosen (169.254.169.0/24, the cloud metadata service's, is never
used). Names carry the test process's id, so parallel runs do not collide; everything is
removed when the lab closes, even after a failure (deleting a namespace deletes its end of
each veth pair, and so the pair; the bridge is deleted last).

Needs root (or CAP_NET_ADMIN) and iproute2: :func:`need_netns` skips locally and fails under
CI when either is missing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from types import TracebackType

import pytest

__all__ = ["NetnsLab", "need_netns"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def need_netns() -> None:
    """Skip (locally) or fail (under CI) unless this process can make network namespaces."""
    why = ""
    if shutil.which("ip") is None:
        why = "iproute2's ip is not installed (apt-get install -y iproute2)"
    else:
        probe = f"fiona-probe-{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            why = (
                "cannot make a network namespace (needs root or CAP_NET_ADMIN): "
                + made.stderr.strip()
            )
        else:
            _ip("netns", "del", probe, check=False)
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)


def _free_subnet() -> ipaddress.IPv4Network:
    """A link-local /24 no route of the host overlaps."""
    routes = json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    taken = []
    for route in routes:
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        try:
            taken.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
        except ValueError:
            continue
    start = os.getpid() % 90
    for k in range(90):
        third = 100 + (start + k) % 90
        if third == 169:
            continue
        net = ipaddress.ip_network(f"169.254.{third}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free link-local /24 for the test namespaces")


class NetnsLab:
    """A bridge and ``count`` namespaces on it (see the module doc); a context manager."""

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"fbr{tag}"
        self.names = [f"fiona-{tag}-n{i}" for i in range(count)]
        self._veths = [(f"fh{tag}n{i}", f"fn{tag}n{i}") for i in range(count)]
        self.net = _free_subnet()
        base = str(self.net.network_address).rsplit(".", 1)[0]
        #: The host's address on the bridge (PostgreSQL, Orthanc, the senders).
        self.host = f"{base}.1"
        #: Each namespace's address.
        self.addresses = [f"{base}.{11 + i}" for i in range(count)]

    def exec_prefix(self, i: int) -> list[str]:
        """The words running a command in namespace ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def __enter__(self) -> NetnsLab:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def _make(self) -> None:
        prefix = self.net.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name, (outside, inside), address in zip(
            self.names, self._veths, self.addresses, strict=True
        ):
            _ip("netns", "add", name)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", name)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", name, "addr", "add", f"{address}/{prefix}", "dev", inside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Delete the namespaces, the veth pairs and the bridge (what exists of them)."""
        for name, (outside, _) in zip(self.names, self._veths, strict=True):
            _ip("netns", "del", name, check=False)
            _ip("link", "del", outside, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
