"""What operators run and read: status, quarantine, audit, backup, ``db``,
``explain``'s command, and the service watching itself (heartbeat, retention, ``/metrics``).

These read what ``fiona serve`` writes (index rows, the status file, the audit log) and never
import the service (docs/architecture.md).
"""
