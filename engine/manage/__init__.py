"""Management: the audit log, and later status, heartbeat and retention."""
