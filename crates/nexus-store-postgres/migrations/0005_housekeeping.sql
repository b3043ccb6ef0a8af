-- Housekeeping (see `Store::prune_ended`): rows that ended before `p_before` and can never be used
-- again. Pairings and device tokens are tenant tables (pending pairings have no tenant yet), so
-- this runs as the owner under the `definer_lookup` policies, like the lookup functions of 0001.
-- Sign-in sessions, refresh tokens and stream tickets are control-plane tables without RLS.
CREATE FUNCTION nexus_prune_ended(p_before BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    v_total BIGINT := 0;
    v_rows BIGINT;
BEGIN
    DELETE FROM pairings WHERE expires_at <= p_before;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_total := v_total + v_rows;
    DELETE FROM device_tokens WHERE expires_at <= p_before;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_total := v_total + v_rows;
    DELETE FROM stream_tickets WHERE expires_at <= p_before;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_total := v_total + v_rows;
    DELETE FROM refresh_tokens WHERE session_id IN (
        SELECT id FROM auth_sessions WHERE expires_at <= p_before OR revoked_at <= p_before);
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_total := v_total + v_rows;
    DELETE FROM auth_sessions WHERE expires_at <= p_before OR revoked_at <= p_before;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    RETURN v_total + v_rows;
END;
$$;

REVOKE ALL ON FUNCTION nexus_prune_ended(BIGINT) FROM PUBLIC;
