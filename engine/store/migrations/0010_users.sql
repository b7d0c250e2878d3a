-- fiona index, version 10: the web API's users and their API tokens.
-- Passwords are argon2 hashes; a token is kept only as the SHA-256 of its secret part, and
-- found by its id (the token's first, public part).
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,            -- admin | coordinator | viewer
    phi           INTEGER NOT NULL DEFAULT 0, -- 1: may see patient names, IDs, birth dates
    password_hash TEXT NOT NULL,            -- argon2id, PHC string
    created_at    REAL NOT NULL             -- seconds since the epoch (UTC)
);

-- The projects a coordinator (or viewer) is granted; an admin needs none.
CREATE TABLE user_projects (
    user    TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    project TEXT NOT NULL,
    PRIMARY KEY (user, project)
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,          -- public id, the token's prefix (hex)
    user         TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    label        TEXT NOT NULL DEFAULT '',
    secret_hash  TEXT NOT NULL,             -- SHA-256 (hex) of the token's secret part
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
CREATE INDEX api_tokens_by_user ON api_tokens(user);
