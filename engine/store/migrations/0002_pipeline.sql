-- fiona index, version 2: pipeline runs, one per (study, project, follow-up), and their steps.
-- A run's steps are recorded one by one, so a restart resumes at the first step not done.
CREATE TABLE pipeline_runs (
    id          INTEGER PRIMARY KEY,
    study_uid   TEXT NOT NULL,                -- (0020,000D)
    project     TEXT NOT NULL,
    subject     TEXT NOT NULL DEFAULT '',
    event       TEXT NOT NULL DEFAULT '',
    follow_up   INTEGER NOT NULL DEFAULT 0,   -- 0: the study's first run; n: its n-th follow-up
    series      TEXT NOT NULL DEFAULT '[]',   -- JSON list of the series UIDs of this run
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'running', 'done', 'quarantined', 'failed')),
    reason      TEXT NOT NULL DEFAULT '',     -- code of the last retry or of the quarantine
    detail      TEXT NOT NULL DEFAULT '',     -- never a header value
    attempts    INTEGER NOT NULL DEFAULT 0,   -- unfinished tries of the current step
    next_try_at REAL,                         -- seconds since the epoch (UTC); NULL: now
    state_json  TEXT NOT NULL DEFAULT '{}',   -- the steps' shared state (RunContext.state)
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (study_uid, project, follow_up)
);
CREATE INDEX pipeline_runs_by_state ON pipeline_runs(state, next_try_at);

-- The last outcome of each step of a run (a retried step's row is replaced when it finishes).
CREATE TABLE pipeline_steps (
    run_id      INTEGER NOT NULL REFERENCES pipeline_runs(id),
    idx         INTEGER NOT NULL,             -- position in the project's pipeline, from 0
    name        TEXT NOT NULL,                -- the step type
    state       TEXT NOT NULL CHECK (state IN ('done', 'quarantined', 'retry', 'error')),
    reason      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '',
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
