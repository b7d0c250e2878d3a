"""bench/scale.py still runs: its smallest size (``--quick``) end to end, so it cannot rot.

No timing is asserted (the figures of a shared test machine mean nothing); only that every
receiver was measured, the two fiona processes shared the port and the index held every file
once (the benchmark checks that itself and fails otherwise).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import need_peer
from tests.peers import REPO


@pytest.mark.sqlite_only(
    "each round of bench/scale.py needs a fresh index; on PostgreSQL its rounds would share the"
    " test's one database (bench/scale.py --index-url is run by hand)"
)
def test_the_scale_benchmark_runs_in_its_quick_size() -> None:
    need_peer("storescu")
    need_peer("storescp")
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for receiver in ("storescp", "fiona1", "fiona2"):
        assert f" {receiver} " in out, out
    assert "instances/commit" in out, out
    assert "fiona x2 / fiona x1:" in out and "fiona1 / storescp --fork:" in out, out
