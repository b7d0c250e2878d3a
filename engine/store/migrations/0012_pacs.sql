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
