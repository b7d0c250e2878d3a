-- Several fiona nodes sharing one index (README "Several nodes", engine/store/nodes.py and
-- engine/store/leases.py). Times are REAL seconds since the epoch (UTC).

-- Every serving process: its id (site node.name, or host/pid), where it runs, its heartbeat.
CREATE TABLE nodes (
    id             TEXT PRIMARY KEY,
    host           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    version        TEXT NOT NULL DEFAULT '',
    started_at     REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    stopped_at     REAL               -- set by a clean stop; NULL while it runs (or crashed)
);

-- Jobs that run once in the cluster: the node holding a row's lease runs that job.
CREATE TABLE locks (
    name        TEXT PRIMARY KEY,
    claimed_by  TEXT,
    lease_until REAL,
    acquired_at REAL NOT NULL
);

-- Work claimed by a node until lease_until; NULL claimed_by: nobody holds it.
ALTER TABLE pipeline_runs ADD COLUMN claimed_by TEXT;
ALTER TABLE pipeline_runs ADD COLUMN lease_until REAL;
ALTER TABLE transfers ADD COLUMN claimed_by TEXT;
ALTER TABLE transfers ADD COLUMN lease_until REAL;
ALTER TABLE retrieve_rows ADD COLUMN claimed_by TEXT;
ALTER TABLE retrieve_rows ADD COLUMN lease_until REAL;
CREATE INDEX pipeline_runs_by_claim ON pipeline_runs(claimed_by);
CREATE INDEX transfers_by_claim ON transfers(claimed_by);
CREATE INDEX retrieve_rows_by_claim ON retrieve_rows(claimed_by);

-- Which node took each heartbeat.
ALTER TABLE heartbeats ADD COLUMN node TEXT NOT NULL DEFAULT '';
