-- fiona index, version 11: the web portal's login sessions and its login throttle.
-- A session is found by the SHA-256 of its random id (the cookie's value is never stored).
CREATE TABLE web_sessions (
    id_hash    TEXT PRIMARY KEY,            -- SHA-256 (hex) of the session id in the cookie
    user       TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf       TEXT NOT NULL,               -- the token every form of the session carries
    created_at REAL NOT NULL,               -- seconds since the epoch (UTC)
    seen_at    REAL NOT NULL                -- last request, for the idle expiry
);
CREATE INDEX web_sessions_by_user ON web_sessions(user);

-- Failed logins, per key ('user:NAME' or 'addr:IP'); reset by a good login of that user.
CREATE TABLE login_failures (
    key          TEXT PRIMARY KEY,
    failures     INTEGER NOT NULL,
    last_at      REAL NOT NULL,             -- seconds since the epoch (UTC)
    locked_until REAL NOT NULL DEFAULT 0
);
