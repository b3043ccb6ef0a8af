-- Commands and approvals (issue 5), PostgreSQL: the same tables and columns as the SQLite 0003
-- (`command_records`, `approvals`, `command_policies`), under the 0001 tenant rule, plus two
-- sweeper functions. Times are Unix milliseconds; JSON is stored as the exact text we wrote.
--
-- The delivery queue
-- ------------------
-- `commands` (0001) stays the per-device queue with its gapless, commit-ordered seqs from
-- `command_queues`. A row is written only when a command becomes runnable (proposed without
-- approval, or approved), in the transaction that makes it runnable, so a pull cursor never skips
-- a command approved after later ones were queued. A row is taken out of the queue (`acked_at`
-- set) when the device acks it or the command ends. Command ids are chosen by clients (their
-- idempotency key) and are unique per tenant, not across tenants: the queue's global UNIQUE (id)
-- becomes UNIQUE (tenant, id), or one tenant could learn that another used an id.
--
-- Concurrency
-- -----------
-- Every state change is one conditional UPDATE (`WHERE status = ...`). Under READ COMMITTED a
-- second writer of the same row waits for the first one's row lock and then re-evaluates its
-- WHERE clause against the committed row, so of any number of concurrent decisions on an approval
-- exactly one matches (`status = 'pending' AND expires_at > now`), a cancel racing a delivery
-- either cancels a queued command or finds it delivered, and an ack counts once. A delivery locks
-- the records it hands out (FOR UPDATE) and re-checks their status, so a cancelled command is
-- never delivered.
--
-- The sweeper's cross-tenant reads
-- --------------------------------
-- Expiring approvals and timing out commands must happen "even if nobody asks", i.e. outside any
-- tenant. The application gets no unscoped access to these tables for that; instead two SECURITY
-- DEFINER functions return only what the sweeper needs to act, keyed by time:
--   nexus_due_approvals(now, limit) → (tenant, id) of pending approvals with expires_at <= now;
--   nexus_due_commands(now, limit)  → (tenant, id, status) of queued/delivered/acked commands whose
--                                     deadline <= now.
-- No parameters, contents, users or devices come back, and at most 1000 rows per call. The sweeper
-- then acts on each one in an ordinary tenant-scoped transaction (conditional, so concurrent
-- sweepers on several replicas and a racing human decision cannot both win). The functions run as
-- the owner under a SELECT-only owner policy, `definer_lookup`, as in 0001.

ALTER TABLE commands DROP CONSTRAINT commands_id_key;
ALTER TABLE commands ADD CONSTRAINT commands_tenant_id_key UNIQUE (tenant, id);

-- One row per proposed command; (tenant, id) is the client's idempotency key. `position` only
-- grows (the newest-first list cursor; not commit-ordered, which a list does not need). `attempt`
-- counts deliveries (an ack must name the current one); `deadline` is the current state's deadline
-- (queued: delivery, delivered/acked: execution; NULL otherwise).
CREATE TABLE command_records (
    position        BIGINT GENERATED ALWAYS AS IDENTITY,
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
    requested_at    BIGINT NOT NULL,
    request_hash    TEXT NOT NULL,
    approval_id     TEXT,
    replaces        TEXT,
    attempt         INTEGER NOT NULL DEFAULT 0,
    updated_at      BIGINT NOT NULL,
    deadline        BIGINT,
    result          TEXT,
    PRIMARY KEY (tenant, id),
    UNIQUE (position)
);
CREATE INDEX command_records_by_tenant ON command_records (tenant, position);
CREATE INDEX command_records_by_status ON command_records (tenant, status, position);
CREATE INDEX command_records_by_device ON command_records (tenant, device_id, position);
CREATE INDEX command_records_due ON command_records (deadline)
    WHERE status IN ('queued', 'delivered', 'acked') AND deadline IS NOT NULL;

-- One approval per command that needs one. An expired approval has status 'expired' and
-- `decided_at` = when it was expired (no `decided_by`).
CREATE TABLE approvals (
    tenant        TEXT NOT NULL,
    id            TEXT NOT NULL,
    command_id    TEXT NOT NULL,
    device_id     TEXT NOT NULL,
    type          TEXT NOT NULL,
    risk          TEXT NOT NULL CHECK (risk IN ('GREEN', 'YELLOW', 'RED')),
    summary       TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    decided_by    TEXT,
    decided_at    BIGINT,
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
    updated_at  BIGINT NOT NULL
);

ALTER TABLE command_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_records FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON command_records USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE approvals ENABLE ROW LEVEL SECURITY;
ALTER TABLE approvals FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON approvals USING (tenant = current_setting('nexus.tenant', true));

ALTER TABLE command_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE command_policies FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON command_policies USING (tenant = current_setting('nexus.tenant', true));

-- The owner-only, read-only policies the sweeper functions below run under (see the header).
CREATE POLICY definer_lookup ON command_records FOR SELECT TO CURRENT_USER USING (true);
CREATE POLICY definer_lookup ON approvals FOR SELECT TO CURRENT_USER USING (true);

CREATE FUNCTION nexus_due_approvals(p_now BIGINT, p_limit INTEGER)
RETURNS TABLE (tenant TEXT, id TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT a.tenant, a.id FROM approvals a
     WHERE a.status = 'pending' AND a.expires_at <= p_now
     ORDER BY a.expires_at
     LIMIT LEAST(GREATEST(p_limit, 0), 1000)
$$;

CREATE FUNCTION nexus_due_commands(p_now BIGINT, p_limit INTEGER)
RETURNS TABLE (tenant TEXT, id TEXT, status TEXT)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
AS $$
    SELECT c.tenant, c.id, c.status FROM command_records c
     WHERE c.status IN ('queued', 'delivered', 'acked') AND c.deadline IS NOT NULL
       AND c.deadline <= p_now
     ORDER BY c.deadline
     LIMIT LEAST(GREATEST(p_limit, 0), 1000)
$$;

REVOKE ALL ON FUNCTION nexus_due_approvals(BIGINT, INTEGER) FROM PUBLIC;
REVOKE ALL ON FUNCTION nexus_due_commands(BIGINT, INTEGER) FROM PUBLIC;
