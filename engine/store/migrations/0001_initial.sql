-- fiona index, version 1: everything received, and everything quarantined.
CREATE TABLE patients (
    id           INTEGER PRIMARY KEY,
    patient_id   TEXT NOT NULL,           -- (0010,0020)
    patient_name TEXT NOT NULL DEFAULT '',-- (0010,0010)
    birth_date   TEXT NOT NULL DEFAULT '',-- (0010,0030)
    sex          TEXT NOT NULL DEFAULT '',-- (0010,0040)
    UNIQUE (patient_id, patient_name, birth_date)
);

CREATE TABLE studies (
    id                INTEGER PRIMARY KEY,
    study_uid         TEXT NOT NULL UNIQUE, -- (0020,000D)
    patient_ref       INTEGER NOT NULL REFERENCES patients(id),
    study_date        TEXT NOT NULL DEFAULT '',
    study_time        TEXT NOT NULL DEFAULT '',
    accession_number  TEXT NOT NULL DEFAULT '',
    description       TEXT NOT NULL DEFAULT '',
    first_received_at REAL NOT NULL,        -- seconds since the epoch (UTC)
    last_received_at  REAL NOT NULL,
    n_instances       INTEGER NOT NULL DEFAULT 0,
    state             TEXT NOT NULL DEFAULT 'receiving'
);

CREATE TABLE series (
    id                 INTEGER PRIMARY KEY,
    series_uid         TEXT NOT NULL UNIQUE, -- (0020,000E)
    study_ref          INTEGER NOT NULL REFERENCES studies(id),
    modality           TEXT NOT NULL DEFAULT '',
    series_number      INTEGER,
    description        TEXT NOT NULL DEFAULT '',
    first_received_at  REAL NOT NULL,
    last_received_at   REAL NOT NULL,
    n_instances        INTEGER NOT NULL DEFAULT 0,
    summary_written_at REAL                   -- NULL: the series JSON is not yet written
);
CREATE INDEX series_by_study ON series(study_ref);

CREATE TABLE instances (
    id               INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,   -- (0008,0018)
    sop_class_uid    TEXT NOT NULL,          -- (0008,0016)
    series_ref       INTEGER NOT NULL REFERENCES series(id),
    instance_number  INTEGER,
    transfer_syntax  TEXT NOT NULL DEFAULT '',
    path             TEXT NOT NULL,          -- relative to the data dir
    size             INTEGER NOT NULL,       -- bytes of the stored Part 10 file
    received_at      REAL NOT NULL,
    calling_ae       TEXT NOT NULL DEFAULT '',
    called_ae        TEXT NOT NULL DEFAULT '',
    peer_ip          TEXT NOT NULL DEFAULT '',
    via              TEXT NOT NULL,          -- 'dimse' or 'ingest'
    attrs            TEXT NOT NULL DEFAULT '{}' -- JSON of engine.dicom.header.SUMMARY_KEYWORDS
);
CREATE INDEX instances_by_series ON instances(series_ref);

CREATE TABLE quarantine (
    id               INTEGER PRIMARY KEY,
    qid              TEXT NOT NULL UNIQUE,
    reason           TEXT NOT NULL,          -- a code from engine.store.quarantine.Reason
    detail           TEXT NOT NULL DEFAULT '',
    path             TEXT NOT NULL,          -- relative to the data dir
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    received_at      REAL NOT NULL,
    calling_ae       TEXT NOT NULL DEFAULT '',
    called_ae        TEXT NOT NULL DEFAULT '',
    peer_ip          TEXT NOT NULL DEFAULT '',
    via              TEXT NOT NULL,
    sop_instance_uid TEXT,                   -- only when it was a valid UID
    study_uid        TEXT,
    state            TEXT NOT NULL DEFAULT 'held'
);
CREATE INDEX quarantine_by_reason ON quarantine(reason, state);

-- Received-again instances (identical or conflicting), for the record.
CREATE TABLE duplicates (
    id               INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    identical        INTEGER NOT NULL,
    action           TEXT NOT NULL,          -- 'ignored', 'kept_first', 'replaced', 'quarantined'
    received_at      REAL NOT NULL,
    calling_ae       TEXT NOT NULL DEFAULT '',
    peer_ip          TEXT NOT NULL DEFAULT ''
);
