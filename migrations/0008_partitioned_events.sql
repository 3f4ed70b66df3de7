-- The event store for hundreds of millions of events: ticketflow_events becomes a table
-- partitioned by range of position (notification_id), and each aggregate's version is guarded
-- by its row in ticketflow_streams. See docs/adr/0014-lock-free-append.md.
--
-- Appends go through ticketflow_append(): one statement per command, no table lock.

-- 1. The table as it was becomes the first partition, under a name of its own.
ALTER TABLE ticketflow_events RENAME TO ticketflow_events_p0000;
ALTER INDEX ticketflow_events_pkey RENAME TO ticketflow_events_p0000_pkey;
ALTER INDEX ticketflow_events_notification_id_idx
    RENAME TO ticketflow_events_p0000_notification_id_idx;
-- The parent's row trigger is cloned onto every partition, this one included.
DROP TRIGGER ticketflow_events_no_update_or_delete ON ticketflow_events_p0000;
ALTER TRIGGER ticketflow_events_no_truncate ON ticketflow_events_p0000
    RENAME TO ticketflow_events_p0000_no_truncate;

CREATE TABLE ticketflow_events (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text,
    state bytea,
    notification_id bigint NOT NULL
) PARTITION BY RANGE (notification_id);

ALTER TABLE ticketflow_events
    ALTER COLUMN notification_id
    SET DEFAULT nextval('ticketflow_events_notification_id_seq'::regclass);
ALTER SEQUENCE ticketflow_events_notification_id_seq OWNED BY ticketflow_events.notification_id;

-- Unique across the whole table: the partition key is the indexed column.
CREATE UNIQUE INDEX ticketflow_events_notification_id_idx
    ON ticketflow_events (notification_id ASC);

CREATE TRIGGER ticketflow_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ticketflow_events
    FOR EACH ROW EXECUTE FUNCTION ticketflow_events_are_append_only();

CREATE TRIGGER ticketflow_events_no_truncate
    BEFORE TRUNCATE ON ticketflow_events
    FOR EACH STATEMENT EXECUTE FUNCTION ticketflow_events_are_append_only();

-- Positions per partition: an aggregate's events live wherever their positions fall, so
-- (originator_id, originator_version) is unique per partition only; ticketflow_streams makes it
-- unique across partitions.
CREATE TABLE ticketflow_events_partitioning (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    partition_size bigint NOT NULL CHECK (partition_size > 0)
);
INSERT INTO ticketflow_events_partitioning (partition_size) VALUES (10000000);

-- Creates the partitions that hold positions up to `ahead` partitions past the newest position
-- handed out, each with its unique (originator_id, originator_version) index and its TRUNCATE
-- guard. Each is built on its own and then attached, which locks ticketflow_events in SHARE
-- UPDATE EXCLUSIVE mode only: appends and reads carry on. Safe to call at any time, from
-- anywhere (the command service does every few thousand appends); a transaction-level advisory
-- lock makes concurrent calls wait for each other.
CREATE FUNCTION ticketflow_events_add_partitions(ahead integer DEFAULT 2) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    size bigint;
    last_position bigint;
    upper_bound bigint;
    wanted bigint;
    created integer := 0;
    name text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('ticketflow_events_add_partitions'));
    SELECT partition_size INTO size FROM ticketflow_events_partitioning;
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
        INTO last_position FROM ticketflow_events_notification_id_seq;
    wanted := (last_position / size + 1 + ahead) * size;
    SELECT coalesce(max((regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                      'TO \(''?(\d+)''?\)'))[1]::bigint), 0)
        INTO upper_bound
        FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'ticketflow_events'::regclass;
    WHILE upper_bound < wanted LOOP
        name := format('ticketflow_events_p%s', lpad((upper_bound / size)::text, 4, '0'));
        EXECUTE format(
            'CREATE TABLE %I (LIKE ticketflow_events INCLUDING DEFAULTS,'
            ' CONSTRAINT %I CHECK (notification_id IS NOT NULL'
            '  AND notification_id >= %s AND notification_id < %s))'
            ' WITH (autovacuum_vacuum_threshold = 100000000,'
            '  autovacuum_vacuum_scale_factor = 0.5, autovacuum_analyze_threshold = 1000,'
            '  autovacuum_analyze_scale_factor = 0.01)',
            name, name || '_bound', upper_bound, upper_bound + size);
        EXECUTE format(
            'CREATE UNIQUE INDEX %I ON %I (originator_id, originator_version)',
            name || '_pkey', name);
        EXECUTE format(
            'CREATE UNIQUE INDEX %I ON %I (notification_id ASC)',
            name || '_notification_id_idx', name);
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE TRUNCATE ON %I'
            ' FOR EACH STATEMENT EXECUTE FUNCTION ticketflow_events_are_append_only()',
            name || '_no_truncate', name);
        EXECUTE format(
            'ALTER TABLE ticketflow_events ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
            name, upper_bound, upper_bound + size);
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', name, name || '_bound');
        upper_bound := upper_bound + size;
        created := created + 1;
    END LOOP;
    RETURN created;
END;
$$;

-- 2. The old table holds the positions below the first boundary above its newest one.
DO $$
DECLARE
    size bigint;
    bound bigint;
BEGIN
    SELECT partition_size INTO size FROM ticketflow_events_partitioning;
    SELECT (coalesce(max(notification_id), 0) / size + 1) * size INTO bound
        FROM ticketflow_events_p0000;
    EXECUTE format(
        'ALTER TABLE ticketflow_events_p0000 ADD CONSTRAINT ticketflow_events_p0000_bound'
        ' CHECK (notification_id IS NOT NULL AND notification_id < %s)', bound);
    EXECUTE format(
        'ALTER TABLE ticketflow_events ATTACH PARTITION ticketflow_events_p0000'
        ' FOR VALUES FROM (MINVALUE) TO (%s)', bound);
    ALTER TABLE ticketflow_events_p0000 DROP CONSTRAINT ticketflow_events_p0000_bound;
END;
$$;

SELECT ticketflow_events_add_partitions();

-- 3. One row per aggregate: the version its last append reached.
CREATE TABLE ticketflow_streams (
    originator_id uuid PRIMARY KEY,
    version bigint NOT NULL CHECK (version > 0)
);

INSERT INTO ticketflow_streams (originator_id, version)
SELECT originator_id, max(originator_version) FROM ticketflow_events GROUP BY originator_id;

-- 4. The append: checks and moves each aggregate's version, inserts the events and returns
-- each event's position. (The readers' wake-up NOTIFY is sent by the caller after the commit:
-- PostgreSQL serialises the commits of notifying transactions, so one NOTIFY in every append
-- would make concurrent appends take turns at commit.) A version that is not the next one raises
-- unique_violation (SQLSTATE 23505), as the old primary key did. Each aggregate's row in
-- ticketflow_streams is locked until the transaction ends, so two appends to one aggregate
-- are decided one after the other; appends to different aggregates do not wait for each other.
-- The INSERT takes ROW EXCLUSIVE on ticketflow_events before it draws a position, which is what
-- the gap-safe reader's SHARE lock waits for (docs/adr/0002-gap-safe-event-log.md).
CREATE FUNCTION ticketflow_append(
    ids uuid[], versions bigint[], topics text[], states bytea[]
) RETURNS TABLE (originator_id uuid, originator_version bigint, notification_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    stream record;
    moved integer;
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
    RETURN QUERY
    INSERT INTO ticketflow_events AS t (originator_id, originator_version, topic, state)
    SELECT e.id, e.version, e.topic, e.state
    FROM unnest(ids, versions, topics, states) WITH ORDINALITY AS e(id, version, topic, state, n)
    ORDER BY e.n
    RETURNING t.originator_id, t.originator_version, t.notification_id;
END;
$$;
