-- evp_append: the whole expected-version append in one round trip.
--
-- 1. a retry (every event id already in the ledger, in this stream) returns the original
--    versions and positions and writes nothing;
-- 2. the stream row is locked (or created; if another writer created it meanwhile, its
--    committed version is used);
-- 3. the expected version is checked: 'any', 'no_stream' or 'exact' p_expected;
-- 4. unique reservations are claimed;
-- 5. events and outbox rows are written in version order (one INSERT each, set-based), the
--    stream's version moves on, and relays are woken at commit.
-- Failures raise and so roll everything back: EV409 wrong expected version (DETAIL: the
-- actual version, empty for no stream), EV423 reservation held (DETAIL: the holder),
-- EV422 ids partly appended before or to another stream (DETAIL: that stream).

DROP FUNCTION IF EXISTS evp_append(text, text, bigint, integer, uuid[], text[], integer[], bytea[], text[], text[],
                                   timestamptz[], text[], text[]);

CREATE OR REPLACE FUNCTION evp_append(
    p_stream text, p_kind text, p_expected bigint, p_partition integer,
    p_ids uuid[], p_types text[], p_schema_ids integer[], p_values bytea[],
    p_actors text[], p_subjects text[], p_subject_sets text[], p_occurred timestamptz[],
    p_scopes text[], p_reserved text[], p_reserved_for text[]
) RETURNS TABLE (r_duplicate boolean, r_first bigint, r_last bigint, r_positions bigint[])
LANGUAGE plpgsql
-- Every lookup here is by a key with an index. A session caches the function's plans; one
-- made while the ledger was small (a fresh database, before autovacuum's first ANALYZE)
-- scans evp_events in full and stays, so each append costs more as the log grows (measured:
-- 31 -> 142 µs an event over the first 40k events). Index paths keep it flat.
SET enable_seqscan = off
AS $$
DECLARE
    n integer := cardinality(p_ids);
    v_current bigint;
    v_found integer;
    v_other text;
    v_holder text;
    v_positions bigint[] := '{}';
BEGIN
    SELECT count(*), min(e.stream_id) FILTER (WHERE e.stream_id <> p_stream) INTO v_found, v_other
      FROM evp_events e WHERE e.event_id = ANY (p_ids);
    IF v_found > 0 THEN
        IF v_found <> n OR v_other IS NOT NULL THEN
            RAISE EXCEPTION 'event ids were partly appended before, or to another stream'
                USING ERRCODE = 'EV422', DETAIL = coalesce(v_other, '');
        END IF;
        RETURN QUERY
            SELECT true, min(e.version), max(e.version), array_agg(e.position ORDER BY u.ord)
              FROM unnest(p_ids) WITH ORDINALITY AS u (id, ord) JOIN evp_events e ON e.event_id = u.id;
        RETURN;
    END IF;

    SELECT s.version INTO v_current FROM evp_streams s WHERE s.stream_id = p_stream FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO evp_streams (stream_id, version) VALUES (p_stream, 0) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT s.version INTO v_current FROM evp_streams s WHERE s.stream_id = p_stream FOR UPDATE;
        END IF;
    END IF;

    IF (p_kind = 'no_stream' AND coalesce(v_current, 0) > 0)
       OR (p_kind = 'exact' AND coalesce(v_current, 0) <> p_expected) THEN
        RAISE EXCEPTION 'wrong expected version' USING ERRCODE = 'EV409', DETAIL = coalesce(v_current::text, '');
    END IF;

    FOR i IN 1 .. coalesce(cardinality(p_scopes), 0) LOOP
        INSERT INTO evp_reservations AS r (scope, value, stream_id, subject_id)
            VALUES (p_scopes[i], p_reserved[i], p_stream, p_reserved_for[i])
            ON CONFLICT (scope, value) DO UPDATE SET scope = EXCLUDED.scope
            RETURNING r.stream_id INTO v_holder;
        IF v_holder <> p_stream THEN
            RAISE EXCEPTION '% is already reserved', p_scopes[i] USING ERRCODE = 'EV423', DETAIL = v_holder;
        END IF;
    END LOOP;

    v_current := coalesce(v_current, 0);
    -- Set-based: one INSERT for the events and one for their outbox rows, whatever the
    -- batch size. Positions are drawn in version order (ORDER BY ord), so per stream the
    -- global order and the version order agree.
    WITH inserted AS (
        INSERT INTO evp_events (stream_id, version, event_id, event_type, schema_id, value, actor, subject_id,
                                subject_ids, occurred_at, partition)
        SELECT p_stream, v_current + u.ord, u.id, u.typ, u.sid, u.val, u.act, u.subj,
               ARRAY(SELECT json_array_elements_text(u.subjects::json)), u.occ, p_partition
          FROM unnest(p_ids, p_types, p_schema_ids, p_values, p_actors, p_subjects, p_subject_sets, p_occurred)
               WITH ORDINALITY AS u (id, typ, sid, val, act, subj, subjects, occ, ord)
         ORDER BY u.ord
        RETURNING position, version
    ), boxed AS (
        INSERT INTO evp_outbox (position, partition) SELECT i.position, p_partition FROM inserted i
    )
    SELECT array_agg(i.position ORDER BY i.version) INTO v_positions FROM inserted i;
    UPDATE evp_streams SET version = v_current + n, updated_at = now() WHERE stream_id = p_stream;
    PERFORM pg_notify('evp_outbox', p_partition::text);
    RETURN QUERY SELECT false, v_current + 1, v_current + n, v_positions;
END;
$$;
