-- Core schema: pairing, devices, command queues, report events.
-- Times are Unix milliseconds. Every tenant table carries `tenant` (org:project).

CREATE TABLE pairings (
    id            TEXT PRIMARY KEY,
    -- NULL once the code is released (completed or expired), so live codes stay unique.
    code          TEXT UNIQUE,
    tenant        TEXT,
    device_name   TEXT NOT NULL,
    device_type   TEXT NOT NULL,
    capabilities  TEXT NOT NULL,
    nonce_hash    TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'completed')),
    device_id     TEXT,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL
);

CREATE TABLE devices (
    tenant             TEXT NOT NULL,
    id                 TEXT NOT NULL PRIMARY KEY,
    name               TEXT NOT NULL,
    device_type        TEXT NOT NULL,
    capabilities       TEXT NOT NULL,
    paired_at          INTEGER NOT NULL,
    last_heartbeat_at  INTEGER,
    reported_status    TEXT,
    agent_version      TEXT,
    metrics            TEXT NOT NULL DEFAULT 'null'
);
CREATE INDEX devices_by_tenant ON devices (tenant, paired_at);

CREATE TABLE device_tokens (
    token_hash  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    device_id   TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE commands (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    id           TEXT NOT NULL UNIQUE,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    acked_at     INTEGER
);
CREATE INDEX commands_pending ON commands (tenant, device_id, seq) WHERE acked_at IS NULL;

-- A rowid table: rows are appended in commit order, so the (large) report JSON lands on
-- sequential pages and each group commit dirties few pages; the lookups go through two narrow
-- indexes.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY,
    tenant       TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    event_id     INTEGER NOT NULL,
    report_id    TEXT NOT NULL,
    device_id    TEXT,
    data         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    UNIQUE (tenant, session_id, event_id),
    UNIQUE (tenant, session_id, report_id)
);

CREATE TABLE session_devices (
    tenant        TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, session_id, device_id)
) WITHOUT ROWID;
