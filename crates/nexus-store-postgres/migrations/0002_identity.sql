-- Identity (organizations, projects, members, users, login sessions, stream tickets), device token
-- pairs, and the audit trail (PostgreSQL). The same tables and columns as the SQLite 0002, plus the
-- per-scope head rows that keep the audit chain from forking across replicas, and access control.
--
-- Which tables have row-level security
-- ------------------------------------
-- 1. Tenant data keeps the 0001 rule (`tenant = current_setting('nexus.tenant', true)`, FORCEd).
-- 2. The audit trail (`audit_log`, `audit_heads`) is keyed by *scope*, not tenant: `org:project`
--    (a tenant), `org:*` (an organization) or `*` (the system). Its policy is
--    `scope = current_setting('nexus.tenant', true)`: a row is visible and writable only in a
--    transaction whose `nexus.tenant` names exactly that scope. The application appends each record
--    after setting `nexus.tenant` to the record's scope key (`set_config(..., true)` with a bind
--    parameter; keys are checked to be `[A-Za-z0-9._-]`, `:` and `*` only), inside the transaction
--    of the change it records; it reads one scope per statement the same way (a tenant admin's view
--    of [tenant, its org] is two statements merged by position). So a query that forgets its scope
--    filter still sees one scope only, and a transaction of tenant A can never read or write the
--    audit rows of tenant B. Org and system entries are written and read outside any tenant
--    (sign-in, command-line verification) under their own keys (`org:*`, `*`), which no tenant
--    key can equal (tenant parts cannot contain `*`).
--    The one pre-scope lookup, "which scopes have entries" (for verifying everything), is the
--    SECURITY DEFINER function `nexus_audit_scopes()`, which returns scope keys only.
-- 3. Identity tables (orgs, projects, org_members, users, user_recovery_codes, auth_sessions,
--    refresh_tokens, stream_tickets) are control-plane data, read before any tenant is known
--    (sign-in, membership checks, the stream ticket exchange): they have no tenant column and NO
--    row-level security. `stream_tickets` carries a tenant and session as data (what the ticket
--    opens), not as an access scope.
--
-- The audit trail is append-only
-- ------------------------------
-- `PostgresStore::migrate` grants the application role only SELECT and INSERT on `audit_log` and
-- revokes UPDATE, DELETE and TRUNCATE (it re-applies grants after every migration, since a migration
-- does not know the deployment's role name), so even a compromised application cannot rewrite
-- history; the code has no UPDATE or DELETE of audit rows either. `audit_heads` must be updatable:
-- it only caches the newest (seq, hash) of each scope, and the chain in `audit_log` is what gets
-- verified; a tampered head cannot fork the chain either, since UNIQUE (scope, seq) refuses a second
-- entry at a seq. Editing or removing an entry as the owner breaks the chain where `verify_chain`
-- finds it.
--
-- Chain serialisation: an append locks its scope's head row (INSERT ... ON CONFLICT DO UPDATE ...
-- RETURNING) until COMMIT, so concurrent writers of one scope, on any replica, take turns and each
-- chains after the committed previous entry; writers of different scopes do not wait for each other.
-- A transaction that appends to several scopes locks their heads in key order (no deadlocks).
-- `position` comes from an identity sequence: it orders each scope's entries like their seqs, and is
-- the newest-first pagination cursor across scopes.

-- Pairing: what the device told us about itself at start.
ALTER TABLE pairings ADD COLUMN client_ip TEXT;
ALTER TABLE pairings ADD COLUMN agent_version TEXT;

-- Device tokens become pairs (see the SQLite 0002 for the rows a device has). Tokens issued before
-- this migration had no expiry and no refresh token: they become access tokens expiring on
-- 9999-12-31, so devices paired earlier keep working until they are revoked or pair again.
ALTER TABLE device_tokens
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'access' CHECK (kind IN ('access', 'refresh')),
    ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 253402300799999,
    ADD COLUMN used_at BIGINT;
ALTER TABLE device_tokens ALTER COLUMN kind DROP DEFAULT, ALTER COLUMN expires_at DROP DEFAULT;
DROP INDEX device_tokens_by_device;
CREATE INDEX device_tokens_by_device ON device_tokens (device_id, kind);

-- The pairing start function gains the two new columns (replaced, not overloaded).
DROP FUNCTION nexus_pairing_create(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT);
CREATE FUNCTION nexus_pairing_create(
    p_id TEXT, p_code TEXT, p_tenant TEXT, p_device_name TEXT, p_device_type TEXT,
    p_capabilities TEXT, p_nonce_hash TEXT, p_created_at BIGINT, p_expires_at BIGINT, p_now BIGINT,
    p_client_ip TEXT, p_agent_version TEXT
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    UPDATE pairings SET code = NULL
     WHERE code = p_code AND (expires_at <= p_now OR state = 'completed');
    INSERT INTO pairings (id, code, tenant, device_name, device_type, capabilities, nonce_hash,
                          state, device_id, created_at, expires_at, client_ip, agent_version)
    VALUES (p_id, p_code, p_tenant, p_device_name, p_device_type, p_capabilities, p_nonce_hash,
            'pending', NULL, p_created_at, p_expires_at, p_client_ip, p_agent_version);
$$;

-- The device an access token hash belongs to, with the token's expiry (the caller checks it).
DROP FUNCTION nexus_device_credential(TEXT);
CREATE FUNCTION nexus_device_credential(p_token_hash TEXT)
RETURNS TABLE (token_hash TEXT, tenant TEXT, device_id TEXT, expires_at BIGINT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT t.token_hash, t.tenant, t.device_id, t.expires_at FROM device_tokens t
     WHERE t.token_hash = p_token_hash AND t.kind = 'access'
$$;

-- Trades a device's current refresh token for a new pair. The refresh call carries no tenant, so
-- this is a pre-tenant lookup like the one above, keyed by the device id AND the presented refresh
-- token hash; it touches only that device's token rows and answers one row:
--   'rotated': the token was current and unexpired; it is spent and the new pair stored
--              (tenant, new access hash and expiry);
--   'reused':  a spent, unexpired refresh token of this device; nothing changes
--              (tenant, current access hash and expiry);
--   'invalid': anything else (unknown, expired, another device's, or the device has no tokens).
-- The conditional UPDATE (used_at IS NULL) makes two concurrent rotations of one token answer one
-- 'rotated' and one 'reused': the second waits for the first's row lock and then matches nothing.
CREATE FUNCTION nexus_device_rotate(
    p_device_id TEXT, p_presented TEXT, p_access_hash TEXT, p_access_expires_at BIGINT,
    p_refresh_hash TEXT, p_refresh_expires_at BIGINT, p_now BIGINT
) RETURNS TABLE (outcome TEXT, tenant TEXT, token_hash TEXT, expires_at BIGINT)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant TEXT;
    v_expires BIGINT;
    v_used BIGINT;
BEGIN
    UPDATE device_tokens t SET used_at = p_now
     WHERE t.token_hash = p_presented AND t.device_id = p_device_id AND t.kind = 'refresh'
       AND t.used_at IS NULL AND t.expires_at > p_now
    RETURNING t.tenant INTO v_tenant;
    IF FOUND THEN
        -- The old access token goes; spent refresh tokens stay (reuse detection) until they expire.
        DELETE FROM device_tokens t
         WHERE t.device_id = p_device_id
           AND (t.kind = 'access' OR (t.used_at IS NOT NULL AND t.expires_at <= p_now));
        INSERT INTO device_tokens (token_hash, tenant, device_id, created_at, kind, expires_at)
        VALUES (p_access_hash, v_tenant, p_device_id, p_now, 'access', p_access_expires_at),
               (p_refresh_hash, v_tenant, p_device_id, p_now, 'refresh', p_refresh_expires_at);
        RETURN QUERY SELECT 'rotated'::TEXT, v_tenant, p_access_hash, p_access_expires_at;
        RETURN;
    END IF;
    SELECT t.tenant, t.expires_at, t.used_at INTO v_tenant, v_expires, v_used
      FROM device_tokens t
     WHERE t.token_hash = p_presented AND t.device_id = p_device_id AND t.kind = 'refresh';
    IF FOUND AND v_used IS NOT NULL AND p_now < v_expires THEN
        RETURN QUERY
            SELECT 'reused'::TEXT, t.tenant, t.token_hash, t.expires_at FROM device_tokens t
             WHERE t.device_id = p_device_id AND t.kind = 'access';
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT 'invalid'::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
END;
$$;

-- Identity: control-plane data without row-level security (see the header).
CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE projects (
    org         TEXT NOT NULL REFERENCES orgs (id),
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (org, id)
);

CREATE TABLE users (
    id                    TEXT PRIMARY KEY,
    -- Normalised by the domain (`Email`: trimmed, lowercased) before it gets here.
    email                 TEXT NOT NULL UNIQUE,
    display_name          TEXT,
    password_hash         TEXT NOT NULL,
    password_changed_at   BIGINT NOT NULL,
    created_at            BIGINT NOT NULL,
    totp_secret           TEXT,
    totp_enabled          BOOLEAN NOT NULL DEFAULT false,
    -- The last accepted TOTP time step; only ever raised, by one conditional UPDATE, so two
    -- replicas cannot both accept one code.
    totp_last_step        BIGINT,
    failed_logins         INTEGER NOT NULL DEFAULT 0,
    last_failed_login_at  BIGINT,
    disabled              BOOLEAN NOT NULL DEFAULT false
);

CREATE TABLE org_members (
    org         TEXT NOT NULL REFERENCES orgs (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    role        TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (org, user_id)
);
CREATE INDEX org_members_by_user ON org_members (user_id);

-- Unused recovery codes (hashes); spending one deletes it (one conditional DELETE).
CREATE TABLE user_recovery_codes (
    user_id    TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  TEXT NOT NULL,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE auth_sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id),
    created_at    BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    ip            TEXT,
    user_agent    TEXT,
    mfa           BOOLEAN NOT NULL
);
CREATE INDEX auth_sessions_by_user ON auth_sessions (user_id, created_at);

-- Every refresh token a session was given: the current one (used_at NULL) and the spent ones.
CREATE TABLE refresh_tokens (
    hash        TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    issued_at   BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX refresh_tokens_by_session ON refresh_tokens (session_id);

CREATE TABLE stream_tickets (
    hash          TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    auth_session  TEXT NOT NULL,
    tenant        TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    expires_at    BIGINT NOT NULL
);
CREATE INDEX stream_tickets_by_expiry ON stream_tickets (expires_at);

-- The audit trail (see the header). `details` is the exact JSON text we wrote (TEXT, not jsonb), so
-- an entry reads back exactly as it was hashed.
CREATE TABLE audit_log (
    position        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope           TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    id              TEXT NOT NULL UNIQUE,
    ts              BIGINT NOT NULL,
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

CREATE TABLE audit_heads (
    scope      TEXT PRIMARY KEY,
    last_seq   BIGINT NOT NULL,
    last_hash  TEXT NOT NULL
);

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY scope_isolation ON audit_log USING (scope = current_setting('nexus.tenant', true));

ALTER TABLE audit_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_heads FORCE ROW LEVEL SECURITY;
CREATE POLICY scope_isolation ON audit_heads USING (scope = current_setting('nexus.tenant', true));

-- The owner-only policy the function below runs under (as `definer_lookup` in 0001).
CREATE POLICY definer_lookup ON audit_heads TO CURRENT_USER USING (true) WITH CHECK (true);

-- Every scope that has entries (keys only), for verifying all chains.
CREATE FUNCTION nexus_audit_scopes() RETURNS SETOF TEXT
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT scope FROM audit_heads ORDER BY scope $$;

REVOKE ALL ON FUNCTION nexus_pairing_create(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT, TEXT, TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_device_credential(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_device_rotate(TEXT, TEXT, TEXT, BIGINT, TEXT, BIGINT, BIGINT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_audit_scopes() FROM PUBLIC;
