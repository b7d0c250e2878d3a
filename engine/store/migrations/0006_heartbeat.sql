-- fiona index, version 6: the service watching itself (heartbeats) and retention (deleted studies).
-- The heartbeat job appends one row per beat and keeps the last heartbeat.keep rows.
CREATE TABLE heartbeats (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,                -- seconds since the epoch (UTC)
    echo_ok     INTEGER NOT NULL,             -- 1: our own SCP answered C-ECHO with Success
    echo_detail TEXT NOT NULL DEFAULT '',     -- why the echo failed (never a header value)
    free_bytes  INTEGER NOT NULL,             -- free in the data folder (for unprivileged users)
    total_bytes INTEGER NOT NULL,
    report      TEXT NOT NULL DEFAULT '{}'    -- the whole heartbeat as JSON (counts, times)
);

-- Retention deletes a study's files, never its rows: they stay as the record of what was received.
ALTER TABLE studies ADD COLUMN deleted_at REAL;  -- seconds since the epoch (UTC); NULL: on disk
ALTER TABLE studies ADD COLUMN deleted_reason TEXT NOT NULL DEFAULT ''; -- 'age' or 'watermark'
