-- Indexes for the web portal's reads (bench/web.py measures them).
-- The dashboard's received and sent per hour (engine/store/activity.py): range scans by time.
CREATE INDEX instances_by_received ON instances(received_at);
CREATE INDEX transfer_items_by_sent ON transfer_items(sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX transfers_by_finished ON transfers(finished_at) WHERE finished_at IS NOT NULL;
