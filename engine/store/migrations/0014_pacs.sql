-- fiona index, version 12: Modality Performed Procedure Steps (MPPS, PS3.4 F.7) as the
-- receiver's MPPS SCP records them. Only UIDs, the step's status and our own times: no
-- patient, procedure or operator attribute of the step is kept.
CREATE TABLE mpps (
    id               INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,   -- the step's SOP Instance UID (0000,1000)
    status           TEXT NOT NULL,          -- (0040,0252): IN PROGRESS, COMPLETED, DISCONTINUED
    calling_ae       TEXT NOT NULL DEFAULT '',
    created_at       REAL NOT NULL,          -- seconds since the epoch (UTC): its N-CREATE
    updated_at       REAL NOT NULL,          -- its last N-SET (or N-CREATE)
    ended_at         REAL                    -- when it became COMPLETED or DISCONTINUED
);

-- The studies a step belongs to: Study Instance UID (0020,000D) of each item of its
-- Scheduled Step Attributes Sequence (0040,0270).
CREATE TABLE mpps_studies (
    mpps_ref  INTEGER NOT NULL REFERENCES mpps(id) ON DELETE CASCADE,
    study_uid TEXT NOT NULL,
    PRIMARY KEY (mpps_ref, study_uid)
);
CREATE INDEX mpps_studies_by_study ON mpps_studies(study_uid);

-- The instances a step made: Performed Series Sequence (0040,0340) > Series Instance UID and
-- the Referenced SOP Instance UIDs (0008,1155) of its Referenced Image Sequence (0008,1140)
-- and Referenced Non-Image Composite SOP Instance Sequence (0040,0220).
CREATE TABLE mpps_instances (
    mpps_ref         INTEGER NOT NULL REFERENCES mpps(id) ON DELETE CASCADE,
    series_uid       TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (mpps_ref, sop_instance_uid)
);

-- Retrieval jobs (fiona retrieve NAME --list FILE.csv): one row per line of the list, worked
-- through by fiona serve within the PACS's limits; a restart carries on from the rows' state.
CREATE TABLE retrieve_jobs (
    id          INTEGER PRIMARY KEY,
    pacs        TEXT NOT NULL,               -- the pacs entry's name
    project     TEXT NOT NULL DEFAULT '',    -- --project: rows without their own project
    list_name   TEXT NOT NULL DEFAULT '',    -- the list file's name (not its folder)
    created_at  REAL NOT NULL,               -- seconds since the epoch (UTC)
    created_by  TEXT NOT NULL DEFAULT ''     -- the OS account that queued it
);

CREATE TABLE retrieve_rows (
    id                 INTEGER PRIMARY KEY,
    job_ref            INTEGER NOT NULL REFERENCES retrieve_jobs(id) ON DELETE CASCADE,
    line               INTEGER NOT NULL,     -- line of the list file
    accession          TEXT NOT NULL DEFAULT '',  -- (0008,0050)
    study_uid          TEXT NOT NULL DEFAULT '',  -- (0020,000D)
    patient_id         TEXT NOT NULL DEFAULT '',  -- (0010,0020), with study_date
    study_date         TEXT NOT NULL DEFAULT '',  -- a DICOM date range
    project            TEXT NOT NULL DEFAULT '',
    subject            TEXT NOT NULL DEFAULT '',
    event              TEXT NOT NULL DEFAULT '',
    modality           TEXT NOT NULL DEFAULT '',  -- series filter (0008,0060)
    series_description TEXT NOT NULL DEFAULT '',  -- series filter (0008,103E), wildcards
    state              TEXT NOT NULL DEFAULT 'queued', -- queued querying retrieving done partial failed
    reason             TEXT NOT NULL DEFAULT '',  -- why partial or failed (no PHI)
    studies            INTEGER NOT NULL DEFAULT 0,
    expected           INTEGER NOT NULL DEFAULT 0, -- instances the PACS listed for the row
    arrived            INTEGER NOT NULL DEFAULT 0, -- of those, held by fiona
    attempts           INTEGER NOT NULL DEFAULT 0, -- C-MOVE rounds
    updated_at         REAL NOT NULL,
    done_at            REAL                        -- when it became done, partial or failed
);
CREATE INDEX retrieve_rows_by_state ON retrieve_rows(state, job_ref);
