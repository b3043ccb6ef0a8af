-- Commands and approvals (issue 5): the server's record of every proposed command, the approvals of
-- risky ones, and each tenant's command policy. Times are Unix milliseconds; JSON is stored as the
-- exact text we wrote.
--
-- `commands` (0001) stays the per-device delivery queue: a row is written only when a command
-- becomes runnable (proposed without approval, or approved), so the pull cursor `seq` never skips a
-- command that was approved after later ones were queued. Its body is what the device receives;
-- what happens to the command is in `command_records`. A queue row is taken out of the queue
-- (`acked_at` set) when the device acks it or the command ends.

-- The queue's command ids were unique across all tenants; command ids are chosen by clients (their
-- idempotency key), so they are unique per tenant only. SQLite cannot drop a constraint: the table
-- is rebuilt with the same rows and seqs, and its AUTOINCREMENT counter carries over, so no seq a
-- device has seen is ever handed out again.
CREATE TABLE commands_new (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    id           TEXT NOT NULL,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    acked_at     INTEGER,
    UNIQUE (tenant, id)
);
INSERT INTO commands_new (seq, tenant, device_id, id, body, created_at, acked_at)
    SELECT seq, tenant, device_id, id, body, created_at, acked_at FROM commands ORDER BY seq;
DELETE FROM sqlite_sequence WHERE name = 'commands_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'commands_new', MAX(seq) FROM (
        SELECT seq FROM sqlite_sequence WHERE name = 'commands'
        UNION ALL SELECT COALESCE(MAX(seq), 0) FROM commands_new
    );
DROP TABLE commands;
ALTER TABLE commands_new RENAME TO commands;
CREATE INDEX commands_pending ON commands (tenant, device_id, seq) WHERE acked_at IS NULL;

-- One row per proposed command. (tenant, id) is the client's idempotency key. `position` only grows
-- (the newest-first list cursor). `status` follows `CommandStatus::can_become`; every change is one
-- conditional UPDATE (`WHERE status IN (...)`) in the single writer. `attempt` counts deliveries (an
-- ack must name the current one); `deadline` is the deadline of the current state (queued: delivery,
-- delivered/acked: execution; NULL otherwise).
CREATE TABLE command_records (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant          TEXT NOT NULL,
    id              TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    type            TEXT NOT NULL,
    params          TEXT NOT NULL,
    risk            TEXT NOT NULL CHECK (risk IN ('GREEN', 'YELLOW', 'RED')),
    status          TEXT NOT NULL CHECK (status IN (
                        'pending_approval', 'queued', 'delivered', 'acked', 'succeeded', 'failed',
                        'denied', 'expired', 'cancelled', 'delivery_timed_out', 'execution_timed_out')),
    session_id      TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    requested_by    TEXT NOT NULL,
    requested_at    INTEGER NOT NULL,
    request_hash    TEXT NOT NULL,
    approval_id     TEXT,
    replaces        TEXT,
    attempt         INTEGER NOT NULL DEFAULT 0,
    updated_at      INTEGER NOT NULL,
    deadline        INTEGER,
    result          TEXT,
    UNIQUE (tenant, id)
);
CREATE INDEX command_records_by_tenant ON command_records (tenant, position);
CREATE INDEX command_records_by_status ON command_records (tenant, status, position);
CREATE INDEX command_records_by_device ON command_records (tenant, device_id, position);
-- The sweeper's query: commands past the deadline of a state that has one.
CREATE INDEX command_records_due ON command_records (deadline)
    WHERE status IN ('queued', 'delivered', 'acked') AND deadline IS NOT NULL;

-- One approval per command that needs one. Deciding is one conditional UPDATE
-- (`WHERE status = 'pending' AND expires_at > now`), so exactly one decision wins. An approval that
-- expires gets status 'expired' and `decided_at` = when it was expired (no `decided_by`).
CREATE TABLE approvals (
    tenant        TEXT NOT NULL,
    id            TEXT NOT NULL,
    command_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    type          TEXT NOT NULL,
    risk          TEXT NOT NULL CHECK (risk IN ('GREEN', 'YELLOW', 'RED')),
    summary       TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    decided_by    TEXT,
    decided_at    INTEGER,
    reason        TEXT,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, command_id)
);
CREATE INDEX approvals_by_status ON approvals (tenant, status, requested_at);
CREATE INDEX approvals_due ON approvals (expires_at) WHERE status = 'pending';

-- A tenant's saved command policy (`CommandPolicySettings` as JSON); no row means the default.
CREATE TABLE command_policies (
    tenant      TEXT PRIMARY KEY,
    policy      TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;
