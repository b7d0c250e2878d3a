"""bench/web.py still runs: its smallest size (``--quick``) end to end, so it cannot rot.

No timing is asserted (the figures of a shared test machine mean nothing); only that every
page answered 200 and the receiver's two runs happened.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import need_peer
from tests.peers import REPO


@pytest.mark.sqlite_only("bench/web.py builds its synthetic index as a SQLite file")
def test_the_web_benchmark_runs_in_its_quick_size() -> None:
    need_peer("storescu")
    done = subprocess.run(
        [sys.executable, "bench/web.py", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for page in ("api studies text", "api study", "page dashboard", "page quarantine", "metrics"):
        assert f"\n{page} " in out, out
    assert "ratio (target >= 0.90)" in out and "dashboard polled every 1 s" in out, out
