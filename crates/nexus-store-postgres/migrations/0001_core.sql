-- Core schema (PostgreSQL): pairing, devices, command queues, report events.
-- The same tables and columns as the SQLite 0001 (times are Unix milliseconds, JSON is stored as the
-- exact text we wrote), plus two counter tables that make id assignment safe across replicas
-- (`sessions`, `command_queues`; see the comments there), and row-level security on every table.
--
-- Tenant isolation
-- ----------------
-- Every table carries `tenant` (org:project) and has ENABLE + FORCE ROW LEVEL SECURITY with the policy
-- `tenant = current_setting('nexus.tenant', true)`. The application sets `nexus.tenant` with
-- `set_config(..., true)` (SET LOCAL) as the first statement of every tenant-scoped transaction, so a
-- query that forgets its `WHERE tenant = ...` still sees one tenant only, and a connection with no
-- tenant set sees nothing. The application connects as a role that is neither superuser, nor BYPASSRLS,
-- nor the owner of these tables (`PostgresStore::migrate` grants it DML; `connect` checks all three).
-- FORCE makes the policies bind the owner too, so a server started as the owner by mistake is isolated
-- all the same. Note that TRUNCATE ignores RLS: it is never granted to the application.
--
-- Lookups before a tenant is known
-- --------------------------------
-- A device starting to pair has no tenant; a user confirming a code does not know which pairing it is;
-- a device presenting its token is not yet known to belong to any tenant. Instead of taking `pairings`
-- and `device_tokens` out of RLS (a forgotten filter would then list every pending pairing or token of
-- every tenant), the application gets no unscoped access to them at all: those five operations go
-- through the SECURITY DEFINER functions at the end of this file. Each is keyed by the exact secret or
-- identifier the caller already holds (pairing id, pairing code, token hash), reads or changes at most
-- one row, and returns only that row, so "select everything" cannot be expressed through them.
-- They run as the schema owner; because FORCE binds the owner as well, the two tables carry one extra
-- policy, `definer_lookup`, for the owner only (`TO CURRENT_USER`, i.e. the role running this
-- migration). The application role is not the owner and not a member of it, so that policy never
-- applies to it. Everything after the lookup (the device, its token, its events) is tenant-scoped.

CREATE TABLE pairings (
    id            TEXT PRIMARY KEY,
    -- NULL once the code is released (completed or expired), so live codes stay unique.
    code          TEXT UNIQUE,
    -- NULL while pending (unless the device named its tenant at start); fixed when confirmed.
    tenant        TEXT,
    device_name   TEXT NOT NULL,
    device_type   TEXT NOT NULL,
    capabilities  TEXT NOT NULL,
    nonce_hash    TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'completed')),
    device_id     TEXT,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL
);

CREATE TABLE devices (
    tenant             TEXT NOT NULL,
    id                 TEXT NOT NULL PRIMARY KEY,
    name               TEXT NOT NULL,
    device_type        TEXT NOT NULL,
    capabilities       TEXT NOT NULL,
    paired_at          BIGINT NOT NULL,
    last_heartbeat_at  BIGINT,
    reported_status    TEXT,
    agent_version      TEXT,
    metrics            TEXT NOT NULL DEFAULT 'null'
);
CREATE INDEX devices_by_tenant ON devices (tenant, paired_at);

CREATE TABLE device_tokens (
    token_hash  TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    device_id   TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL
);
CREATE INDEX device_tokens_by_device ON device_tokens (device_id);

-- One row per device queue: `last_seq` is the seq of its newest command. `seq` is the device's pull
-- cursor ("everything after seq k"), so it must grow in commit order, which a shared sequence does not
-- guarantee with concurrent writers (seq 7 may commit after seq 8 was already pulled, and would then
-- never be delivered). Taking the next seq by updating this row holds its lock until COMMIT, so the
-- writers of one device queue take turns and seqs commit in order, without gaps.
CREATE TABLE command_queues (
    tenant     TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    last_seq   BIGINT NOT NULL,
    PRIMARY KEY (tenant, device_id)
);

CREATE TABLE commands (
    tenant       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    id           TEXT NOT NULL UNIQUE,
    body         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    acked_at     BIGINT,
    PRIMARY KEY (tenant, device_id, seq)
);
CREATE INDEX commands_pending ON commands (tenant, device_id, seq) WHERE acked_at IS NULL;

-- One row per (tenant, session): `last_event_id` is the id of the session's newest committed event.
-- See `append.rs` for how it makes event ids gapless and commit-ordered across replicas.
CREATE TABLE sessions (
    tenant         TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    last_event_id  BIGINT NOT NULL,
    PRIMARY KEY (tenant, session_id)
);

CREATE TABLE events (
    tenant       TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    event_id     BIGINT NOT NULL,
    report_id    TEXT NOT NULL,
    device_id    TEXT,
    data         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (tenant, session_id, event_id),
    UNIQUE (tenant, session_id, report_id)
);

CREATE TABLE session_devices (
    tenant        TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    last_seen_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, session_id, device_id)
);

-- Row-level security: one policy per table (USING also serves as WITH CHECK, so rows can only be
-- written into the tenant that is set).
ALTER TABLE pairings ENABLE ROW LEVEL SECURITY;
ALTER TABLE pairings FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON pairings USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE devices FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON devices USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE device_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE device_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_tokens USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE command_queues ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_queues FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON command_queues USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE commands ENABLE ROW LEVEL SECURITY;
ALTER TABLE commands FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON commands USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON sessions USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE events ENABLE ROW LEVEL SECURITY;
ALTER TABLE events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE session_devices ENABLE ROW LEVEL SECURITY;
ALTER TABLE session_devices FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON session_devices USING (tenant = current_setting('nexus.tenant', true));

-- The owner-only policies the lookup functions below run under (see the header).
CREATE POLICY definer_lookup ON pairings TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY definer_lookup ON device_tokens TO CURRENT_USER USING (true) WITH CHECK (true);

-- Lookup functions (see the header). SECURITY DEFINER with a fixed search_path (pg_temp last) so a
-- caller cannot substitute its own objects; EXECUTE is revoked from PUBLIC and granted to the
-- application role by `PostgresStore::migrate`.

-- Starts a pairing: releases the code if an expired or completed pairing still holds it, then inserts
-- a pending pairing. A live holder makes the INSERT fail with unique_violation (the caller's Conflict).
CREATE FUNCTION nexus_pairing_create(
    p_id TEXT, p_code TEXT, p_tenant TEXT, p_device_name TEXT, p_device_type TEXT,
    p_capabilities TEXT, p_nonce_hash TEXT, p_created_at BIGINT, p_expires_at BIGINT, p_now BIGINT
) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    UPDATE pairings SET code = NULL
     WHERE code = p_code AND (expires_at <= p_now OR state = 'completed');
    INSERT INTO pairings (id, code, tenant, device_name, device_type, capabilities, nonce_hash,
                          state, device_id, created_at, expires_at)
    VALUES (p_id, p_code, p_tenant, p_device_name, p_device_type, p_capabilities, p_nonce_hash,
            'pending', NULL, p_created_at, p_expires_at);
$$;

CREATE FUNCTION nexus_pairing_by_id(p_id TEXT) RETURNS SETOF pairings
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT * FROM pairings WHERE id = p_id $$;

CREATE FUNCTION nexus_pairing_by_code(p_code TEXT) RETURNS SETOF pairings
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT * FROM pairings WHERE code = p_code $$;

-- pending -> confirmed, fixing tenant and device id. A pairing that named its tenant at start can
-- only be confirmed into that tenant. True if this call confirmed it.
CREATE FUNCTION nexus_pairing_confirm(p_id TEXT, p_tenant TEXT, p_device_id TEXT) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    WITH done AS (
        UPDATE pairings SET state = 'confirmed', tenant = p_tenant, device_id = p_device_id
         WHERE id = p_id AND state = 'pending' AND (tenant IS NULL OR tenant = p_tenant)
        RETURNING 1
    )
    SELECT count(*) = 1 FROM done
$$;

-- The device a token hash belongs to. (Completing a pairing needs no function: by then the pairing
-- has its tenant, so it runs in an ordinary tenant-scoped transaction.)
CREATE FUNCTION nexus_device_credential(p_token_hash TEXT)
RETURNS TABLE (token_hash TEXT, tenant TEXT, device_id TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT t.token_hash, t.tenant, t.device_id FROM device_tokens t WHERE t.token_hash = p_token_hash $$;

REVOKE ALL ON FUNCTION nexus_pairing_create(TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_pairing_by_id(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_pairing_by_code(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_pairing_confirm(TEXT, TEXT, TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_device_credential(TEXT) FROM PUBLIC;
