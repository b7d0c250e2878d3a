"""Event counters for Prometheus, in one registry every layer may record into.

This module sits at the bottom of the engine (it imports nothing from it), so the receiver, the
pipeline runner and the outbox worker count their events here without importing the layers that
serve them. Counts that already live in the index (studies, runs, transfers, quarantine, disk,
heartbeat) are not counted here: :mod:`engine.manage.metrics` reads them at scrape time and
serves both on the status page's ``GET /metrics``.

Label values are DIMSE status codes, step types, project and destination names and destination
types only: never a UID, an AE title of a sender, or any header value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "REGISTRY",
    "instance_received",
    "is_failure",
    "step_finished",
    "transfer_attempt",
    "transfer_failed",
]

#: The engine's own registry (not prometheus_client's global one): its counters and the
#: process's CPU, memory and open files.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
# No ``*_created`` series: they double every counter and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_INSTANCES = Counter(
    "fiona_instances_received",
    "C-STORE requests answered by the receiver, by DIMSE status (hex)",
    ["status"],
    registry=REGISTRY,
)
_REJECTED = Counter(
    "fiona_instances_rejected",
    "C-STORE requests answered with a failure status, by DIMSE status (hex)",
    ["status"],
    registry=REGISTRY,
)
_BYTES = Counter(
    "fiona_received_bytes",
    "Dataset bytes of the C-STORE requests answered by the receiver",
    registry=REGISTRY,
)
_TRANSFER_LABELS = ["project", "destination", "type"]
_ATTEMPTS = Counter(
    "fiona_transfer_attempts",
    "Transfers started on a destination (first tries and retries)",
    _TRANSFER_LABELS,
    registry=REGISTRY,
)
_FAILURES = Counter(
    "fiona_transfer_failures",
    "Transfer attempts that failed (retried later, or given up at the retry limit)",
    _TRANSFER_LABELS,
    registry=REGISTRY,
)
_STEP_SECONDS = Histogram(
    "fiona_pipeline_step_duration_seconds",
    "Wall time of one pipeline step's run, by step type (whatever its outcome)",
    ["step"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)


def is_failure(status: int) -> bool:
    """Whether a C-STORE status is a failure (PS3.7 C.4.2: not Success 0x0000 and not a
    Warning: 0x0001, 0x0107, 0x0116 or 0xB000-0xBFFF)."""
    return not (status in (0x0000, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF)


def instance_received(status: int, nbytes: int) -> int:
    """Count one C-STORE answered with ``status`` for a dataset of ``nbytes`` bytes; returns
    ``status`` (so a handler can ``return instance_received(...)``)."""
    label = f"0x{status:04X}"
    _INSTANCES.labels(label).inc()
    if is_failure(status):
        _REJECTED.labels(label).inc()
    _BYTES.inc(nbytes)
    return status


def transfer_attempt(project: str, destination: str, kind: str) -> None:
    """Count a transfer started on ``project``'s destination ``destination`` of type ``kind``."""
    _ATTEMPTS.labels(project, destination, kind).inc()


def transfer_failed(project: str, destination: str, kind: str) -> None:
    """Count a failed transfer attempt (see :func:`transfer_attempt`)."""
    _FAILURES.labels(project, destination, kind).inc()


def step_finished(step: str, seconds: float) -> None:
    """Record how long a pipeline step of type ``step`` ran, in seconds."""
    _STEP_SECONDS.labels(step).observe(seconds)
