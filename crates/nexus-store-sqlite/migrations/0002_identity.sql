-- Identity, device token pairs, and the audit trail.
-- Times are Unix milliseconds; JSON is stored as the exact text we wrote.

-- Pairing: what the device told us about itself at start (shown to the confirming user).
ALTER TABLE pairings ADD COLUMN client_ip TEXT;
ALTER TABLE pairings ADD COLUMN agent_version TEXT;

-- Device tokens become pairs: one current access token, one current refresh token, and the spent
-- refresh tokens of the device (kept so that presenting one again is recognised as reuse). Rows of
-- one device: kind = 'access' (at most one), kind = 'refresh' with used_at NULL (at most one, the
-- current one), kind = 'refresh' with used_at set (spent; pruned once past their expiry).
-- Tokens issued before this migration had no expiry and no refresh token: they become access tokens
-- that expire on 9999-12-31, so devices paired earlier keep working until they are revoked or pair
-- again (they cannot refresh; a new pairing gives them a pair).
ALTER TABLE device_tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'access' CHECK (kind IN ('access', 'refresh'));
ALTER TABLE device_tokens ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 253402300799999;
ALTER TABLE device_tokens ADD COLUMN used_at INTEGER;
CREATE INDEX device_tokens_by_device ON device_tokens (device_id, kind);

-- Identity: control-plane data, not tenant data. These tables are read before a tenant is known
-- (sign-in, membership checks), so they carry no tenant column. (In PostgreSQL they are the tables
-- without row-level security; see its 0002.)
CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE projects (
    org         TEXT NOT NULL REFERENCES orgs (id),
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org, id)
);

CREATE TABLE users (
    id                    TEXT PRIMARY KEY,
    -- Normalised by the domain (`Email`: trimmed, lowercased) before it gets here.
    email                 TEXT NOT NULL UNIQUE,
    display_name          TEXT,
    password_hash         TEXT NOT NULL,
    password_changed_at   INTEGER NOT NULL,
    created_at            INTEGER NOT NULL,
    totp_secret           TEXT,
    totp_enabled          INTEGER NOT NULL DEFAULT 0,
    -- The last accepted TOTP time step; only ever raised, by one conditional UPDATE.
    totp_last_step        INTEGER,
    failed_logins         INTEGER NOT NULL DEFAULT 0,
    last_failed_login_at  INTEGER,
    disabled              INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE org_members (
    org         TEXT NOT NULL REFERENCES orgs (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (org, user_id)
);
CREATE INDEX org_members_by_user ON org_members (user_id);

-- Unused recovery codes (hashes); spending one deletes it.
CREATE TABLE user_recovery_codes (
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  TEXT NOT NULL,
    PRIMARY KEY (user_id, code_hash)
) WITHOUT ROWID;

CREATE TABLE auth_sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id),
    created_at    INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    ip            TEXT,
    user_agent    TEXT,
    mfa           INTEGER NOT NULL
);
CREATE INDEX auth_sessions_by_user ON auth_sessions (user_id, created_at);

-- Every refresh token a session was given: the current one (used_at NULL) and the spent ones, so
-- presenting a spent one is recognised as reuse.
CREATE TABLE refresh_tokens (
    hash        TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    issued_at   INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

-- One-time tickets for EventSource streams; the tenant and session are data here, not a scope.
CREATE TABLE stream_tickets (
    hash          TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    auth_session  TEXT NOT NULL,
    tenant        TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    expires_at    INTEGER NOT NULL
);
CREATE INDEX stream_tickets_by_expiry ON stream_tickets (expires_at);

-- The audit trail. `position` is global and only grows (the pagination cursor, newest first);
-- `seq`/`prev_hash`/`hash` chain the entries of one scope (`AuditEntry::chain`). The single
-- writer task serialises appends, so a scope's chain cannot fork. Append-only: the triggers below
-- refuse UPDATE and DELETE, and the code has no path that issues either.
CREATE TABLE audit_log (
    position        INTEGER PRIMARY KEY,
    scope           TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT NOT NULL UNIQUE,
    ts              INTEGER NOT NULL,
    actor_type      TEXT NOT NULL,
    actor_id        TEXT NOT NULL,
    action          TEXT NOT NULL,
    target_type     TEXT,
    target_id       TEXT,
    result          TEXT NOT NULL,
    ip              TEXT,
    user_agent      TEXT,
    correlation_id  TEXT,
    details         TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    hash            TEXT NOT NULL,
    UNIQUE (scope, seq)
);
CREATE INDEX audit_log_by_scope ON audit_log (scope, position);

-- The newest entry of each scope, so an append does not have to search the log.
CREATE TABLE audit_heads (
    scope      TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL,
    last_hash  TEXT NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
