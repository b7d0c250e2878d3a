"""bench/scale.py still runs: its smallest size (``--quick``) end to end, so it cannot rot.

No timing is asserted (the figures of a shared test machine mean nothing); only that every
receiver was measured, on both index engines (each PostgreSQL round on a fresh database of the
session's cluster), the two fiona processes shared the port and the index held every file
once (the benchmark checks that itself and fails otherwise).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import need_peer
from tests.peers import REPO
from tests.pg_server import PgCluster


@pytest.mark.sqlite_only(
    "runs its own rounds on both engines; once per CI is enough (the SQLite run)"
)
def test_the_scale_benchmark_runs_in_its_quick_size(pg_cluster: PgCluster) -> None:
    need_peer("storescu")
    need_peer("storescp")
    done = subprocess.run(
        [sys.executable, "bench/scale.py", "--quick", "--pg-url", pg_cluster.url()],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for receiver in ("storescp", "fiona1", "fiona2", "fiona1-pg", "fiona2-pg"):
        assert f" {receiver} " in out, out
    assert out.count("instances/commit") == 4, out
    for ratio in (
        "fiona x2 / fiona x1 (SQLite):",
        "fiona x2 / fiona x1 (PostgreSQL):",
        "PostgreSQL / SQLite, fiona x1:",
        "fiona1 / storescp --fork:",
        "index add path alone (PostgreSQL)",
        "durable-write floor, ",
        "machine busy ",
    ):
        assert ratio in out, out
