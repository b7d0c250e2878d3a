-- fiona index, version 3: series labels, study routes to projects, completeness.
-- Instance ids (instances.id) only grow, so "up to id N" marks what a scan has seen.
ALTER TABLE studies ADD COLUMN routed_upto INTEGER NOT NULL DEFAULT 0; -- instances seen by routing
ALTER TABLE studies ADD COLUMN judged_at REAL;  -- when routing was decided (claimed, held or let be)
CREATE INDEX studies_unjudged ON studies(last_received_at) WHERE judged_at IS NULL;

ALTER TABLE series ADD COLUMN labels TEXT NOT NULL DEFAULT '[]'; -- JSON list, site rule sets
ALTER TABLE series ADD COLUMN label_state TEXT; -- engine.rules.SeriesLabels as JSON

ALTER TABLE quarantine ADD COLUMN project TEXT NOT NULL DEFAULT '';

-- One row per (study, project) that claims it.
CREATE TABLE study_routes (
    study_uid    TEXT NOT NULL,
    project      TEXT NOT NULL,
    subject      TEXT NOT NULL DEFAULT '',
    event        TEXT NOT NULL DEFAULT '',
    reasons      TEXT NOT NULL DEFAULT '[]',  -- JSON list: why the project claims the study
    state        TEXT NOT NULL DEFAULT 'open', -- 'open' (receiving) or 'complete'
    opened_at    REAL NOT NULL,                -- seconds since the epoch (UTC)
    completed_at REAL,
    runs         INTEGER NOT NULL DEFAULT 0,   -- pipeline runs created (the next is a follow-up)
    done_upto    INTEGER NOT NULL DEFAULT 0,   -- instances.id already handed to a run
    PRIMARY KEY (study_uid, project)
);
CREATE INDEX study_routes_by_state ON study_routes(state);

-- Small engine state: 'tracker_mark' is the highest instances.id a routing scan has seen.
CREATE TABLE engine_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
