"""The retrieval worker honours a PACS's time windows and studies per hour (no PACS needed:
one that cannot be reached shows whether the worker tried it)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from engine.config.loader import load_site
from engine.retrieve.worker import RetrieveWorker
from engine.store.index import open_index
from engine.store.retrievals import RetrievalStore, RowSpec, RowState
from tests.peers import free_port

MONDAY_NOON = dt.datetime(2026, 12, 7, 12, 0)
MONDAY_NIGHT = dt.datetime(2026, 12, 7, 22, 0)


def _site(tmp_path: Path, limits: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        "data_dir: data\npacs:\n"
        f"  - {{name: clinical, ae_title: PACS, host: 127.0.0.1, port: {free_port()},"
        f" limits: {limits}}}\n"
    )
    return path


@pytest.mark.parametrize(
    ("windows", "when", "tried"),
    [
        ('["Mon-Fri 19:00-07:00"]', MONDAY_NOON, False),
        ('["Mon-Fri 19:00-07:00"]', MONDAY_NIGHT, True),
        ("[Sat-Sun]", MONDAY_NIGHT, False),
        ("[]", MONDAY_NOON, True),
    ],
)
def test_time_windows(tmp_path: Path, windows: str, when: dt.datetime, tried: bool) -> None:
    site = load_site(_site(tmp_path, f"{{windows: {windows}}}"))
    index = open_index("", site.data_dir / "index.sqlite")
    store = RetrievalStore(index)
    job = store.create_job("clinical", "", "list.csv", [RowSpec(2, accession="A1")], "t", 0.0)
    worker = RetrieveWorker(site, index, local_now=lambda: when)
    worker()
    worker.drain()
    (row,) = store.rows(job)
    assert row.state is RowState.QUEUED
    assert row.attempts == (1 if tried else 0)
    assert ("cannot connect" in row.reason) is tried
    index.close()


@pytest.mark.parametrize(("finished_ago", "tried"), [(600.0, False), (7200.0, True)])
def test_studies_per_hour(tmp_path: Path, finished_ago: float, tried: bool) -> None:
    site = load_site(_site(tmp_path, "{studies_per_hour: 2}"))
    index = open_index("", site.data_dir / "index.sqlite")
    store = RetrievalStore(index)
    now = 1_800_000_000.0
    rows = [RowSpec(2, accession="A1"), RowSpec(3, accession="A2")]
    job = store.create_job("clinical", "", "list.csv", rows, "t", now - 8000)
    done = store.rows(job)[0]
    # The first row retrieved two studies, finished_ago seconds ago.
    store.update(done.id, now - finished_ago, RowState.DONE, studies=2)
    worker = RetrieveWorker(site, index, clock=lambda: now, local_now=lambda: MONDAY_NOON)
    worker()
    worker.drain()
    second = store.rows(job)[1]
    assert second.state is RowState.QUEUED
    assert second.attempts == (1 if tried else 0)
    index.close()
