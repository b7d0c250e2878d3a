"""bench/e2e.py still runs: its smallest size (``--quick``) end to end, so it cannot rot.

No timing is asserted (the figures of a shared test machine mean nothing); only that every
receiver was measured, on both index engines (each PostgreSQL round on a fresh database of the
session's cluster): the benchmark itself fails unless Orthanc ends up with every instance of
every study, de-identified (no original Patient ID).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import need_peer
from tests.peers import REPO
from tests.pg_server import PgCluster


@pytest.mark.sqlite_only(
    "runs its own rounds on both engines; once per CI is enough (the SQLite run)"
)
@pytest.mark.slow
def test_the_end_to_end_benchmark_runs_in_its_quick_size(pg_cluster: PgCluster) -> None:
    need_peer("storescu")
    if not os.access(shutil.which("Orthanc") or "/usr/sbin/Orthanc", os.X_OK):
        message = "Orthanc is not installed (Debian: apt-get install orthanc)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        # A round that never finishes fails by the benchmark's own message, well before ours.
        [sys.executable, "bench/e2e.py", "--quick", "--timeout", "180",
         "--pg-url", pg_cluster.url()],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for receiver in ("orthanc", "fiona1", "fiona2", "fiona1-pg", "fiona2-pg"):
        assert f" {receiver} " in out, out
    assert "studies/min" in out and out.count("associations per process") == 4, out
    assert out.count("machine busy") == 4 and out.count("cores: fiona") == 4, out
    for ratio in (
        "fiona x2 / fiona x1 (SQLite)",
        "fiona x2 / fiona x1 (PostgreSQL)",
        "fiona1 / storescu straight into Orthanc:",
    ):
        assert ratio in out, out
