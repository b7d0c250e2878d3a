"""bench/label.py still runs: a small corpus end to end, so it cannot rot.

No timing is asserted; only that both modes were measured and the benchmark found their labels
equal (it fails otherwise).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.peers import REPO


@pytest.mark.sqlite_only("labels through SQLite only; once per CI is enough")
def test_the_label_benchmark_runs_on_a_small_corpus() -> None:
    done = subprocess.run(
        [sys.executable, "bench/label.py", "--files", "120", "--size", "16", "--runs", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "whole " in done.stdout and "selective " in done.stdout, done.stdout
    assert "labels equal over 3 series" in done.stdout, done.stdout
