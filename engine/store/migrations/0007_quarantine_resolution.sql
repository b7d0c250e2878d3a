-- fiona index, version 7: what became of a quarantine item (fiona quarantine release|discard).
-- quarantine.state is 'held', 'released' or 'discarded'; these say when and by whom, and when the
-- kept bytes and sidecar were purged (quarantine.keep_days after the release or discard).
ALTER TABLE quarantine ADD COLUMN resolved_at REAL;   -- seconds since the epoch (UTC); NULL: held
ALTER TABLE quarantine ADD COLUMN resolved_by TEXT NOT NULL DEFAULT ''; -- the operator (OS account)
ALTER TABLE quarantine ADD COLUMN resolution TEXT NOT NULL DEFAULT '';  -- what the release did
ALTER TABLE quarantine ADD COLUMN purged_at REAL;      -- files deleted by purge(); NULL: on disk
CREATE INDEX quarantine_resolved ON quarantine(state, resolved_at) WHERE purged_at IS NULL;
