-- The order transfer_items were queued in, for PostgreSQL, which has no rowid (issue 18):
-- 1, 2, ... per transfer; rows queued before this migration keep 0 (sent in UID order).
ALTER TABLE transfer_items ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
