-- Indexes for the web portal's reads on a big index (bench/web.py measures them).
-- The dashboard's received and sent per hour (engine/store/activity.py): range scans by time.
CREATE INDEX instances_by_received ON instances(received_at);
CREATE INDEX transfer_items_by_sent ON transfer_items(sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX transfers_by_finished ON transfers(finished_at) WHERE finished_at IS NOT NULL;
-- The study list (engine/store/studies.py): newest first without sorting every study, Study
-- Date ranges; studies of a project, of a modality.
CREATE INDEX studies_by_received ON studies(last_received_at);
CREATE INDEX studies_by_date ON studies(study_date);
CREATE INDEX series_by_modality ON series(modality, study_ref);
-- Counts per project (status, dashboard, /metrics): one pass over an index each.
CREATE INDEX study_routes_by_project ON study_routes(project, state, completed_at, study_uid);
CREATE INDEX transfers_by_project ON transfers(project, study_uid, state);
CREATE INDEX transfers_by_project_state ON transfers(project, state, finished_at);
CREATE INDEX transfers_by_destination ON transfers(project, destination, state);
CREATE INDEX pipeline_runs_by_project ON pipeline_runs(project, state);
CREATE INDEX studies_deleted ON studies(deleted_at) WHERE deleted_at IS NOT NULL;
-- The quarantine list by state (held items are few among the resolved).
CREATE INDEX quarantine_by_state ON quarantine(state, project);
