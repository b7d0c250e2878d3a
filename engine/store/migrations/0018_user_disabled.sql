-- fiona index, version 18: a user can be disabled (fiona user disable NAME) instead of
-- removed: it keeps its row, grants and tokens for the record, but no password, token or
-- session lets it in until it is enabled again. NULL: enabled.
ALTER TABLE users ADD COLUMN disabled_at REAL;  -- seconds since the epoch (UTC)
