-- fiona index, version 5: the outbox. One transfer per (study run, destination); its instances.
-- A transfer is retried with backoff until its destination confirmed every instance; beyond the
-- destination's limit it is a dead letter (state 'failed', study quarantined transfer_failed).
CREATE TABLE transfers (
    id           INTEGER PRIMARY KEY,
    project      TEXT NOT NULL,
    destination  TEXT NOT NULL,               -- its name under the project's destinations
    study_uid    TEXT NOT NULL,               -- (0020,000D) as archived (stays on this side)
    export_uid   TEXT NOT NULL,               -- (0020,000D) as sent (de-identified)
    run_id       INTEGER,                     -- the pipeline run that queued it
    follow_up    INTEGER NOT NULL DEFAULT 0,  -- 0: the study's first transfer; n: later series
    subject      TEXT NOT NULL DEFAULT '',    -- the pseudonym the files carry (never an original)
    event        TEXT NOT NULL DEFAULT '',
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'sending', 'done', 'failed', 'cancelled')),
    attempts     INTEGER NOT NULL DEFAULT 0,  -- tries that ended in an error
    next_try_at  REAL NOT NULL,               -- seconds since the epoch (UTC)
    last_error   TEXT NOT NULL DEFAULT '',    -- never a header value
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL,
    UNIQUE (run_id, destination)
);
CREATE INDEX transfers_due ON transfers(state, next_try_at);
CREATE INDEX transfers_by_study ON transfers(study_uid);

CREATE TABLE transfer_items (
    transfer_id      INTEGER NOT NULL REFERENCES transfers(id),
    sop_instance_uid TEXT NOT NULL,           -- (0008,0018) as sent
    sop_class_uid    TEXT NOT NULL,           -- (0008,0016)
    transfer_syntax  TEXT NOT NULL,           -- (0002,0010)
    series_uid       TEXT NOT NULL,           -- (0020,000E) as sent
    series_number    INTEGER,                 -- (0020,0011)
    modality         TEXT NOT NULL DEFAULT '',
    path             TEXT NOT NULL,           -- the file sent, relative to the data dir
    size             INTEGER NOT NULL,        -- bytes
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sent', 'failed')),
    status           INTEGER,                 -- DIMSE status of the last try (DICOM peers)
    detail           TEXT NOT NULL DEFAULT '',
    sent_at          REAL,
    PRIMARY KEY (transfer_id, sop_instance_uid)
);
CREATE INDEX transfer_items_by_uid ON transfer_items(sop_instance_uid, state);
