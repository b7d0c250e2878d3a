"""``GET /metrics``: Prometheus metrics of ``fiona serve`` (on the web portal's port).

Two sources, served together by :func:`render`:

* the event counters of :mod:`engine.metrics` (C-STOREs by DIMSE status, bytes received,
  transfer attempts and failures per destination, pipeline step durations) and the process's
  CPU and memory, counted in this process since it started;
* :class:`IndexCollector`: what the index and the file system hold, read at scrape time: studies
  completed and pipeline runs per project by state, transfers (the outbox) per destination by
  state, held quarantine items by reason, items needing attention, free disk, and the last
  heartbeat's age and C-ECHO result.

Label values are project and destination names, states, reason codes, DIMSE statuses and step
types: never a UID, a sender's AE title or any header value.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from engine import metrics
from engine.config.model import SiteConfig
from engine.manage.attention import attention
from engine.manage.heartbeat import disk_usage
from engine.store.index import Index
from engine.store.nodes import NodeStore
from engine.store.quarantine import Reason

__all__ = ["IndexCollector", "render"]

_RUN_STATES = ("pending", "running", "done", "quarantined", "failed")
_TRANSFER_STATES = ("queued", "sending", "done", "failed", "cancelled")


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[object, ...]]) -> Metric:
    """A gauge family from ``(label values..., value)`` rows."""
    family = GaugeMetricFamily(name, doc, labels=labels)
    for *values, value in rows:
        family.add_metric([str(v) for v in values], float(value))  # type: ignore[arg-type]
    return family


def _each_state(
    rows: Iterable[tuple[object, ...]], states: tuple[str, ...]
) -> list[tuple[object, ...]]:
    """``(key..., state, n)`` rows with every state present for every key (0 when none), so
    a series falls to 0 instead of vanishing when its last item moves on."""
    found: dict[tuple[object, ...], dict[str, float]] = {}
    for *key, state, n in rows:
        found.setdefault(tuple(key), {})[str(state)] = float(n)  # type: ignore[arg-type]
    return [(*key, s, counts.get(s, 0.0)) for key, counts in found.items() for s in states]


class IndexCollector(Collector):
    """Gauges and counts read from the index and the file system at each scrape."""

    def __init__(self, site: SiteConfig, index: Index) -> None:
        self.site = site
        self.index = index

    def collect(self) -> Iterator[Metric]:
        yield from self._from_index()
        yield from self._attention()
        yield from self._disk()
        yield from self._nodes()

    def _nodes(self) -> Iterator[Metric]:
        """Each node's heartbeat age (nodes stopped cleanly are left out): an alert on it
        finds a node of the cluster that died while the others run on."""
        now = time.time()
        yield _gauge(
            "fiona_node_heartbeat_age_seconds",
            "Seconds since each running node's last heartbeat",
            ["node"],
            [
                (n["id"], now - n["last_heartbeat"])
                for n in NodeStore(self.index).nodes()
                if n["stopped_at"] is None
            ],
        )

    def _from_index(self) -> Iterator[Metric]:
        now = time.time()
        with self.index.reading() as db:
            # completed_at stays set when a follow-up reopens the route: this never falls.
            completed = db.execute(
                "SELECT project, count(*) FROM study_routes WHERE completed_at IS NOT NULL"
                " GROUP BY project"
            ).fetchall()
            runs = db.execute(
                "SELECT project, state, count(*) FROM pipeline_runs GROUP BY project, state"
            ).fetchall()
            transfers = db.execute(
                "SELECT project, destination, state, count(*) FROM transfers"
                " GROUP BY project, destination, state"
            ).fetchall()
            held = db.execute(
                "SELECT reason, count(*) FROM quarantine WHERE state='held' GROUP BY reason"
            ).fetchall()
            beat = db.execute(
                "SELECT at, echo_ok FROM heartbeats ORDER BY id DESC LIMIT 1"
            ).fetchone()
        done = CounterMetricFamily(
            "fiona_studies_completed",
            "Studies that became complete (quiet) at least once, per project",
            labels=["project"],
        )
        for project, n in completed:
            done.add_metric([str(project)], float(n))
        yield done
        yield _gauge(
            "fiona_pipeline_runs",
            "Pipeline runs per project by state (done, quarantined and failed are outcomes)",
            ["project", "state"],
            _each_state(runs, _RUN_STATES),
        )
        yield _gauge(
            "fiona_transfers",
            "Transfers per project and destination by state (queued and sending: outbox depth)",
            ["project", "destination", "state"],
            _each_state(transfers, _TRANSFER_STATES),
        )
        # Every known reason, 0 when none is held: a series falls to 0 instead of vanishing.
        by_reason = {reason.value: 0 for reason in Reason} | {str(r): n for r, n in held}
        yield _gauge(
            "fiona_quarantine_held",
            "Quarantine items held, by reason",
            ["reason"],
            sorted(by_reason.items()),
        )
        if beat is not None:
            yield _gauge(
                "fiona_heartbeat_age_seconds",
                "Seconds since the last heartbeat",
                [],
                [(now - beat[0],)],
            )
            yield _gauge(
                "fiona_heartbeat_echo_ok",
                "1 when the last heartbeat's C-ECHO of our own SCP succeeded",
                [],
                [(int(beat[1]),)],
            )

    def _attention(self) -> Iterator[Metric]:
        counts = attention(self.index, self.site.projects_dir)["counts"]
        yield _gauge(
            "fiona_attention_items",
            "Items that need a person, by kind (see fiona status)",
            ["kind"],
            sorted(counts.items()),
        )

    def _disk(self) -> Iterator[Metric]:
        try:
            disk = disk_usage(self.site.data_dir)
        except OSError:
            return
        yield _gauge(
            "fiona_disk_free_bytes",
            "Bytes free in the data folder's file system (for unprivileged users)",
            [],
            [(disk.free_bytes,)],
        )
        yield _gauge(
            "fiona_disk_total_bytes",
            "Size of the data folder's file system",
            [],
            [(disk.total_bytes,)],
        )


class _Both(Collector):
    """The engine's event registry followed by one index collector."""

    def __init__(self, index_collector: IndexCollector) -> None:
        self.index_collector = index_collector

    def collect(self) -> Iterator[Metric]:
        yield from metrics.REGISTRY.collect()
        yield from self.index_collector.collect()


def render(site: SiteConfig, index: Index, accept: str = "") -> tuple[bytes, str]:
    """(body, Content-Type) of the metrics in the format the HTTP ``Accept`` header asks for:
    OpenMetrics when a scraper asks for it, else Prometheus text format 0.0.4."""
    encode, content_type = choose_encoder(accept)
    return encode(_Both(IndexCollector(site, index))), content_type
