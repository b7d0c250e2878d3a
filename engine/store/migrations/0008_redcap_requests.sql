-- fiona index, version 8: REDCap transfer requests fiona has acted on (engine/redcap/requests.py).
-- One row per request row in REDCap (record, event, repeat instance), so a request is queued once
-- even when writing its status back to REDCap failed and REDCap still shows it as new.
CREATE TABLE redcap_requests (
    source      TEXT NOT NULL,                -- the project whose REDCap holds the request
    record      TEXT NOT NULL,                -- REDCap record ID
    event       TEXT NOT NULL DEFAULT '',     -- redcap_event_name ('' in a classic project)
    instrument  TEXT NOT NULL DEFAULT '',     -- redcap_repeat_instrument ('' if not repeating)
    instance    TEXT NOT NULL DEFAULT '',     -- redcap_repeat_instance
    project     TEXT NOT NULL,                -- the fiona project the study was queued for
    run_id      INTEGER NOT NULL REFERENCES pipeline_runs(id),
    status      TEXT NOT NULL DEFAULT 'queued', -- last status fiona wrote: queued, done, error
    created_at  REAL NOT NULL,                -- seconds since the epoch (UTC)
    updated_at  REAL NOT NULL,
    PRIMARY KEY (source, record, event, instrument, instance)
);
