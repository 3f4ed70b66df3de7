-- A tamper-evident history: every event carries hash = sha256(prev_hash || canonical bytes),
-- chaining it to the previous event of its tenant, computed in the append's transaction; chain
-- heads are signed at intervals. See docs/adr/0020-audit-chain.md.

-- 1. The chain's columns. `tenant` is the tenant the event's state names; `recorded_at` is the
-- store's clock when the event was appended, never earlier than its tenant's previous event.
ALTER TABLE ticketflow_events
    ADD COLUMN tenant text,
    ADD COLUMN recorded_at timestamptz,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash bytea;

-- A tenant's events in position order (exports, live verification), on every partition.
CREATE INDEX ticketflow_events_tenant_idx ON ticketflow_events (tenant, notification_id);

-- 2. One row per tenant: the newest event of its chain. Appends lock it (FOR UPDATE) before
-- they draw positions, so a tenant's chain order is its position order and never forks.
CREATE TABLE ticketflow_chain_heads (
    tenant text PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0),
    events bigint NOT NULL CHECK (events >= 0),
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    recorded_at timestamptz NOT NULL
);

-- 3. Canonical bytes (ADR 20). lp(b) = uint32 big-endian length || b; integers are 8-byte
-- big-endian; recorded_at is microseconds since 1970-01-01T00:00:00Z.
CREATE FUNCTION ticketflow_event_canonical(
    event_tenant text, event_position bigint, aggregate_id uuid, event_version bigint,
    event_topic text, event_recorded_at timestamptz, event_state bytea
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT int4send(19) || convert_to('ticketflow.event.v1', 'UTF8')
        || int4send(octet_length(convert_to(event_tenant, 'UTF8')))
        || convert_to(event_tenant, 'UTF8')
        || int8send(event_position)
        || uuid_send(aggregate_id)
        || int8send(event_version)
        || int4send(octet_length(convert_to(coalesce(event_topic, ''), 'UTF8')))
        || convert_to(coalesce(event_topic, ''), 'UTF8')
        || int8send((extract(epoch FROM event_recorded_at) * 1000000)::bigint)
        || sha256(coalesce(event_state, '\x'::bytea))
$$;

-- The tenant an event belongs to: its state's top-level "tenant".
CREATE FUNCTION ticketflow_event_tenant(state bytea) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT convert_from(state, 'UTF8')::json ->> 'tenant'
$$;

-- 4. Every inserted event is chained, whoever inserts it. The caller should hold the tenant's
-- head row already (ticketflow_append locks it before its INSERT draws positions); an insert
-- that drew its position before another one of the same tenant took the head is refused
-- (serialization_failure: retry), so the chain can only follow position order.
CREATE FUNCTION ticketflow_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    head ticketflow_chain_heads%ROWTYPE;
BEGIN
    NEW.tenant := coalesce(NEW.tenant, ticketflow_event_tenant(NEW.state));
    IF NEW.tenant IS NULL THEN
        RAISE EXCEPTION 'event % v% names no tenant; it cannot be chained',
            NEW.originator_id, NEW.originator_version USING ERRCODE = 'not_null_violation';
    END IF;
    SELECT * INTO head FROM ticketflow_chain_heads AS h WHERE h.tenant = NEW.tenant FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO ticketflow_chain_heads (tenant, position, events, hash, recorded_at)
        VALUES (NEW.tenant, 0, 0, '\x0000000000000000000000000000000000000000000000000000000000000000', '-infinity')
        ON CONFLICT (tenant) DO NOTHING;
        SELECT * INTO head FROM ticketflow_chain_heads AS h WHERE h.tenant = NEW.tenant FOR UPDATE;
    END IF;
    IF NEW.notification_id <= head.position THEN
        RAISE EXCEPTION 'position % comes before the head of tenant %''s chain (%)',
            NEW.notification_id, NEW.tenant, head.position USING ERRCODE = 'serialization_failure';
    END IF;
    NEW.recorded_at := greatest(clock_timestamp(), head.recorded_at);
    NEW.prev_hash := head.hash;
    NEW.hash := sha256(head.hash || ticketflow_event_canonical(
        NEW.tenant, NEW.notification_id, NEW.originator_id, NEW.originator_version, NEW.topic,
        NEW.recorded_at, NEW.state));
    UPDATE ticketflow_chain_heads AS h
    SET position = NEW.notification_id, events = h.events + 1, hash = NEW.hash,
        recorded_at = NEW.recorded_at
    WHERE h.tenant = NEW.tenant;
    RETURN NEW;
END;
$$;

-- 5. The events recorded so far get their chains here, tenant by tenant in position order, with
-- the time their state records (made non-decreasing per tenant). The append-only guard is off
-- for this one statement of this transaction.
ALTER TABLE ticketflow_events DISABLE TRIGGER ticketflow_events_no_update_or_delete;
DO $$
DECLARE
    event record;
    head ticketflow_chain_heads%ROWTYPE;
    event_tenant text;
    stated timestamptz;
    moment timestamptz;
    chained bytea;
BEGIN
    FOR event IN
        SELECT notification_id, originator_id, originator_version, topic, state
        FROM ticketflow_events ORDER BY notification_id
    LOOP
        event_tenant := ticketflow_event_tenant(event.state);
        IF event_tenant IS NULL THEN
            RAISE EXCEPTION 'event at position % names no tenant', event.notification_id;
        END IF;
        SELECT * INTO head FROM ticketflow_chain_heads AS h WHERE h.tenant = event_tenant;
        IF NOT FOUND THEN
            head := ROW(event_tenant, 0, 0,
                '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
                '-infinity'::timestamptz);
            INSERT INTO ticketflow_chain_heads VALUES (head.*);
        END IF;
        BEGIN
            stated := (convert_from(event.state, 'UTF8')::json -> 'timestamp' ->> '_data_')::timestamptz;
        EXCEPTION WHEN others THEN
            stated := NULL;
        END;
        moment := greatest(coalesce(stated, now()), head.recorded_at);
        chained := sha256(head.hash || ticketflow_event_canonical(
            event_tenant, event.notification_id, event.originator_id, event.originator_version,
            event.topic, moment, event.state));
        UPDATE ticketflow_events AS e
        SET tenant = event_tenant, recorded_at = moment, prev_hash = head.hash, hash = chained
        WHERE e.notification_id = event.notification_id;
        UPDATE ticketflow_chain_heads AS h
        SET position = event.notification_id, events = h.events + 1, hash = chained,
            recorded_at = moment
        WHERE h.tenant = event_tenant;
    END LOOP;
END;
$$;
ALTER TABLE ticketflow_events ENABLE TRIGGER ticketflow_events_no_update_or_delete;

CREATE TRIGGER ticketflow_events_chain
    BEFORE INSERT ON ticketflow_events
    FOR EACH ROW EXECUTE FUNCTION ticketflow_events_chain();

-- 6. The append of migrations/0008_partitioned_events.sql, plus the chain heads: after the
-- versions are checked, the heads of the batch's tenants are locked (FOR UPDATE, in tenant
-- order) before the INSERT draws positions, so positions of one tenant are drawn in chain order.
CREATE OR REPLACE FUNCTION ticketflow_append(
    ids uuid[], versions bigint[], topics text[], states bytea[]
) RETURNS TABLE (originator_id uuid, originator_version bigint, notification_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    stream record;
    moved integer;
    event_tenants text[];
    batch_tenants text[];
    locked integer;
BEGIN
    FOR stream IN
        SELECT e.id, min(e.version) AS first, max(e.version) AS last, count(*) AS events
        FROM unnest(ids, versions) AS e(id, version)
        GROUP BY e.id ORDER BY e.id
    LOOP
        IF stream.last - stream.first + 1 <> stream.events THEN
            RAISE EXCEPTION 'versions of % are not consecutive', stream.id
                USING ERRCODE = 'unique_violation';
        END IF;
        IF stream.first = 1 THEN
            INSERT INTO ticketflow_streams AS s (originator_id, version)
            VALUES (stream.id, stream.last)
            ON CONFLICT ON CONSTRAINT ticketflow_streams_pkey DO NOTHING;
        ELSE
            UPDATE ticketflow_streams AS s SET version = stream.last
            WHERE s.originator_id = stream.id AND s.version = stream.first - 1;
        END IF;
        GET DIAGNOSTICS moved = ROW_COUNT;
        IF moved <> 1 THEN
            RAISE EXCEPTION 'version % of % is already recorded', stream.first, stream.id
                USING ERRCODE = 'unique_violation';
        END IF;
    END LOOP;
    event_tenants := ARRAY(
        SELECT ticketflow_event_tenant(s.state)
        FROM unnest(states) WITH ORDINALITY AS s(state, n) ORDER BY s.n);
    batch_tenants := ARRAY(SELECT DISTINCT t FROM unnest(event_tenants) AS t ORDER BY t);
    PERFORM 1 FROM ticketflow_chain_heads AS h
    WHERE h.tenant = ANY (batch_tenants) ORDER BY h.tenant FOR UPDATE;
    GET DIAGNOSTICS locked = ROW_COUNT;
    IF locked < cardinality(batch_tenants) THEN
        INSERT INTO ticketflow_chain_heads AS h (tenant, position, events, hash, recorded_at)
        SELECT t, 0, 0,
            '\x0000000000000000000000000000000000000000000000000000000000000000', '-infinity'
        FROM unnest(batch_tenants) AS t WHERE t IS NOT NULL ORDER BY t
        ON CONFLICT (tenant) DO NOTHING;
        PERFORM 1 FROM ticketflow_chain_heads AS h
        WHERE h.tenant = ANY (batch_tenants) ORDER BY h.tenant FOR UPDATE;
    END IF;
    RETURN QUERY
    INSERT INTO ticketflow_events AS t (originator_id, originator_version, topic, state, tenant)
    SELECT e.id, e.version, e.topic, e.state, e.tenant
    FROM unnest(ids, versions, topics, states, event_tenants) WITH ORDINALITY
        AS e(id, version, topic, state, tenant, n)
    ORDER BY e.n
    RETURNING t.originator_id, t.originator_version, t.notification_id;
END;
$$;

-- 7. Signed checkpoints and the keys that sign them. Both are append-only.
CREATE FUNCTION ticketflow_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TABLE ticketflow_audit_keys (
    key_id text PRIMARY KEY,
    algorithm text NOT NULL CHECK (algorithm = 'Ed25519'),
    public_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ticketflow_audit_checkpoints (
    tenant text NOT NULL,
    position bigint NOT NULL,
    events bigint NOT NULL,
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    key_id text NOT NULL REFERENCES ticketflow_audit_keys (key_id),
    signature bytea NOT NULL,
    signed_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, position)
);

CREATE TRIGGER ticketflow_audit_keys_append_only
    BEFORE UPDATE OR DELETE ON ticketflow_audit_keys
    FOR EACH ROW EXECUTE FUNCTION ticketflow_audit_append_only();
CREATE TRIGGER ticketflow_audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON ticketflow_audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION ticketflow_audit_append_only();
