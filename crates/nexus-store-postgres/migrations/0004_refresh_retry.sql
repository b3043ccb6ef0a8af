-- Device refresh retries (see `Store::rotate_device_tokens`): each refresh token records the hash of
-- the refresh token it was traded for, so a retried trade (the answer to the first one was lost) can
-- be told apart from a stolen copy: the retry presents the parent of a still-unused token.
ALTER TABLE device_tokens ADD COLUMN replaces TEXT;

DROP FUNCTION nexus_device_rotate(TEXT, TEXT, TEXT, BIGINT, TEXT, BIGINT, BIGINT);

-- As in 0002, plus `p_retry_grace` and the outcome 'retried'. Concurrency: the conditional UPDATEs
-- take the token rows' locks, so of two concurrent trades of one token exactly one spends it, and
-- of two concurrent retries exactly one spends the unused successor; the loser sees 'reused'.
CREATE FUNCTION nexus_device_rotate(
    p_device_id TEXT, p_presented TEXT, p_access_hash TEXT, p_access_expires_at BIGINT,
    p_refresh_hash TEXT, p_refresh_expires_at BIGINT, p_now BIGINT, p_retry_grace BIGINT
) RETURNS TABLE (outcome TEXT, tenant TEXT, token_hash TEXT, expires_at BIGINT)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant TEXT;
    v_expires BIGINT;
    v_used BIGINT;
    v_outcome TEXT := 'rotated';
BEGIN
    UPDATE device_tokens t SET used_at = p_now
     WHERE t.token_hash = p_presented AND t.device_id = p_device_id AND t.kind = 'refresh'
       AND t.used_at IS NULL AND t.expires_at > p_now
    RETURNING t.tenant INTO v_tenant;
    IF NOT FOUND THEN
        SELECT t.tenant, t.expires_at, t.used_at INTO v_tenant, v_expires, v_used
          FROM device_tokens t
         WHERE t.token_hash = p_presented AND t.device_id = p_device_id AND t.kind = 'refresh';
        IF NOT FOUND OR v_used IS NULL OR p_now >= v_expires THEN
            RETURN QUERY SELECT 'invalid'::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
            RETURN;
        END IF;
        v_outcome := 'reused';
        IF p_retry_grace > 0 AND p_now - v_used <= p_retry_grace THEN
            -- A retry only while the trade's result is untouched: its refresh token unused.
            UPDATE device_tokens t SET used_at = p_now
             WHERE t.device_id = p_device_id AND t.kind = 'refresh' AND t.used_at IS NULL
               AND t.replaces = p_presented AND t.expires_at > p_now;
            IF FOUND THEN
                v_outcome := 'retried';
            END IF;
        END IF;
        IF v_outcome = 'reused' THEN
            RETURN QUERY
                SELECT 'reused'::TEXT, t.tenant, t.token_hash, t.expires_at FROM device_tokens t
                 WHERE t.device_id = p_device_id AND t.kind = 'access';
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'invalid'::TEXT, NULL::TEXT, NULL::TEXT, NULL::BIGINT;
            END IF;
            RETURN;
        END IF;
    END IF;
    -- The old access token goes; spent refresh tokens stay (reuse detection) until they expire.
    DELETE FROM device_tokens t
     WHERE t.device_id = p_device_id
       AND (t.kind = 'access' OR (t.used_at IS NOT NULL AND t.expires_at <= p_now));
    INSERT INTO device_tokens (token_hash, tenant, device_id, created_at, kind, expires_at, replaces)
    VALUES (p_access_hash, v_tenant, p_device_id, p_now, 'access', p_access_expires_at, NULL),
           (p_refresh_hash, v_tenant, p_device_id, p_now, 'refresh', p_refresh_expires_at, p_presented);
    RETURN QUERY SELECT v_outcome, v_tenant, p_access_hash, p_access_expires_at;
END;
$$;

REVOKE ALL ON FUNCTION nexus_device_rotate(TEXT, TEXT, TEXT, BIGINT, TEXT, BIGINT, BIGINT, BIGINT) FROM PUBLIC;
