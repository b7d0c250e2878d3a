-- fiona index, version 4: the pseudonym table (original -> pseudonym, per project).
-- The index lives on the hospital side with the archive; pseudonyms leave, originals never do.
CREATE TABLE pseudonyms (
    id          INTEGER PRIMARY KEY,
    project     TEXT NOT NULL,
    original    TEXT NOT NULL,           -- the original Patient ID (0010,0020)
    pseudonym   TEXT NOT NULL,           -- what the project's exports carry instead
    created_at  REAL NOT NULL,           -- seconds since the epoch (UTC)
    UNIQUE (project, original),
    UNIQUE (project, pseudonym)
);
